"""The ``replicate`` backend: image-to-video models hosted on Replicate, through the official client.

Which models, and how each takes our parameters, is data: ``backends/data/replicate.toml`` (the
catalogue). ``request.model`` picks an entry (Kling v2.1 when unset)::

    backend = ReplicateBackend(settings)             # settings.replicate_api_token, replicate_base_url
    backend.refusals(request)                        # ["kwaivgi/kling-v2.1 cannot make a 7 s clip (...)"]
    handle = await backend.submit(request)           # a prediction; Handle.id is its id
    report = await backend.status(handle)            # starting → QUEUED, processing → RUNNING (+progress)
    result = await backend.result(handle)            # the MP4 in request.output_dir / request.output_name

How the calls map onto the HTTP API (``replicate`` 1.0.x, async methods):

- ``submit``: ``POST /v1/models/{owner}/{name}/predictions`` for official models, ``POST /v1/predictions``
  with the catalogue's version id for community models. The start image travels as a ``data:`` URI up
  to 256 KB and is uploaded through ``POST /v1/files`` above that. With ``request.webhook_url`` set,
  Replicate posts the finished prediction there (``webhook_events_filter=["completed"]``).
  A combination the model cannot honour is refused with :class:`UnsupportedRequest` naming it, before
  any HTTP call. Replicate takes no idempotency key: a create whose answer is lost (a timeout after the
  request left) can leave an orphan prediction that the job's retry does not find.
- ``status``: ``GET /v1/predictions/{id}``; ``failed`` is classified from the error text (moderation
  wording → :class:`ContentRefused`, invalid input → :class:`InvalidRequest`, anything else →
  :class:`BackendUnavailable`).
- ``result``: fetches the prediction again and downloads its output: ``data:`` URIs are decoded, http(s)
  URLs are fetched only from ``settings.provider_download_hosts`` (``*.host`` matches subdomains), never
  more than ``settings.max_output_bytes``. An output that is not a video (no output, the wrong type, an
  image, bytes ffmpeg cannot decode) raises :class:`BackendUnavailable`; a list yields its first item.
  The cost is the catalogue's price per second × the clip length asked for, or, for models billed by
  hardware time, ``metrics.predict_time`` × the GPU's price per second.
- ``cancel``: ``POST /v1/predictions/{id}/cancel``; a finished or unknown prediction is left alone.
- ``imagine`` (a prompt-only job's still, FLUX.1 [schnell] by default: the catalogue's ``kind = "image"``
  entries): one create with ``Prefer: wait`` (Replicate holds it until the picture is ready, at most
  60 s), then polls until ``still_timeout`` (canceled and :class:`BackendTimeout` after it). The output
  (PNG, WebP or JPEG; ``data:`` or a download from an allowed host) must decode as a picture; it is
  written as PNG at the request's ``output_path``. The cost is the catalogue's ``price_per_image``.

End frames: ``request.end_image_path`` goes to the model's ``end_image`` field (Kling switches to its
"pro" mode and price, ``with_end_image``); a model without one refuses the request by name, listing the
models of the catalogue that can.

HTTP errors: 429 → :class:`RateLimited` (``retry_after`` from ``Retry-After``, else from the body's
"available in N seconds", else 5 s); 5xx, connection errors → :class:`BackendUnavailable`; timeouts →
:class:`BackendTimeout`; 401/403 → :class:`PermanentBackendError` telling the owner to check
``ANIMABOT_REPLICATE_API_TOKEN``; 402 (no credit) → :class:`PermanentBackendError`; 404, 422 and other
4xx → :class:`InvalidRequest`.

Retries: there is one retry layer, the job system's. This module never loops. The client itself retries
GET (not POST) on 429/503/504, up to 10 times with exponential backoff or ``Retry-After``
(``replicate.client.RetryTransport``), so a 503 on ``status`` is usually absorbed there; a create is
never retried by the client.

Webhooks (:meth:`ReplicateBackend.verify_webhook`): Replicate signs ``f"{webhook-id}.{timestamp}.{body}"``
with HMAC-SHA256 under the account's ``whsec_`` secret (fetched once from
``GET /v1/webhooks/default/secret`` and cached). Missing headers or an unreadable body → 400, a bad
signature → 401, a timestamp more than 5 minutes off → 401, a ``webhook-id`` seen before by this process
→ 409. The set of seen ids is in memory and bounded (ids older than twice the tolerance are forgotten:
they fail the timestamp check anyway); across processes a replay is harmless, because the webhook is
only a hint: the job system polls the prediction and resumes a job idempotently.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import contextvars
import functools
import json
import logging
import math
import os
import re
import ssl
import time
import tomllib
import urllib.parse
import uuid
from collections import OrderedDict
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import certifi
import httpx
import replicate
from PIL import Image
from replicate.exceptions import ReplicateError
from replicate.helpers import base64_encode_file
from replicate.prediction import Prediction
from replicate.webhook import (
    InvalidSecretKeyError,
    InvalidSignatureError,
    InvalidTimestampError,
    Webhooks,
    WebhookSigningSecret,
    WebhookValidationError,
)

from backends import video
from backends.base import (
    Aspect,
    Backend,
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    CameraMove,
    Capabilities,
    ContentRefused,
    GenerationRequest,
    GenerationResult,
    Handle,
    ImageRequest,
    ImageResult,
    InvalidRequest,
    PermanentBackendError,
    RateLimited,
    State,
    StatusReport,
    UnsupportedRequest,
    WebhookNotice,
    WebhookRejected,
)
from backends.downloads import host_allowed

__all__ = ["CATALOGUE_FILE", "Catalogue", "CatalogueError", "ModelEntry", "ReplicateBackend", "host_allowed",
           "load_catalogue"]

CATALOGUE_FILE = Path(__file__).parent / "data" / "replicate.toml"

#: Start images up to this size are sent inline as ``data:`` URIs (Replicate's documented limit).
INLINE_IMAGE_BYTES = 256 * 1024
#: Seconds Replicate is asked to hold the create of a still (``Prefer: wait``; its maximum is 60).
STILL_WAIT = 60
#: Seconds a still may take in all before it is canceled and reported as timed out.
STILL_TIMEOUT = 180.0
#: How far a webhook's timestamp may be from now, seconds.
WEBHOOK_TOLERANCE = 300
#: Most webhook ids remembered for replay detection.
WEBHOOK_IDS_KEPT = 10_000
#: How often, at most, a bad signature makes us fetch the signing secret again (it may have rotated).
SECRET_REFRESH_SECONDS = 600.0
DEFAULT_RETRY_AFTER = 5.0
#: How far Replicate's clock may be from ours when looking for a lost create's prediction, seconds.
CLOCK_SKEW_S = 30.0
_MAX_REDIRECTS = 3
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_AVAILABLE_IN = re.compile(r"available in (\d+(?:\.\d+)?) ?s", re.IGNORECASE)
_REFUSAL = re.compile(
    r"nsfw|moderat|sensitive|flagged|safety|content polic|inappropriate|prohibited|\bE005\b",
    re.IGNORECASE,
)
_INVALID = re.compile(r"invalid|validation|must be|too (small|large)", re.IGNORECASE)
_VIDEO_TYPES = ("video/", "application/octet-stream", "binary/octet-stream")
_IMAGE_TYPES = ("image/", "application/octet-stream", "binary/octet-stream")

log = logging.getLogger(__name__)

#: The ``Retry-After`` of the last 429 this task received (set by an httpx response hook: the client's
#: ReplicateError keeps only the body).
_retry_after: contextvars.ContextVar[str | None] = contextvars.ContextVar("replicate_retry_after", default=None)


# -- the catalogue --------------------------------------------------------------------------------


class CatalogueError(ValueError):
    """The model catalogue is malformed; the message names the file, the model and the problem."""


@dataclass(frozen=True)
class ModelEntry:
    """One model of the catalogue, as read from ``replicate.toml`` (see the file for each key)."""

    id: str
    label: str
    kind: str
    official: bool
    version: str = ""
    output: str = "uri"
    start_image: str = ""
    end_image: str = ""
    prompt: str = ""
    negative: str = ""
    seed: str = ""
    duration_field: str = ""
    duration_unit: str = "seconds"
    durations: tuple[float, ...] = ()
    frames: tuple[int, ...] = ()
    frames_offset: int = 0
    duration_values: Mapping[int, Any] = field(default_factory=dict)
    duration_tolerance: float = 0.0
    fps: int = 24
    fps_field: str = ""
    aspect_field: str = ""
    aspects: tuple[Aspect, ...] = ()
    camera: str = "prompt"
    camera_field: str = ""
    camera_values: Mapping[str, Any] = field(default_factory=dict)
    cameras: tuple[CameraMove, ...] = tuple(CameraMove)
    motion: str = "prompt"
    motion_field: str = ""
    motion_values: tuple[Any, ...] = ()
    good_at: tuple[str, ...] = ()
    price_per_second: float = 0.0
    gpu_price_per_second: float = 0.0
    price_per_image: float = 0.0
    inputs: Mapping[str, Any] = field(default_factory=dict)
    with_end_image: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_video(self) -> bool:
        """Whether this is an image-to-video model (the others are refused as such)."""
        return self.kind == "video"

    @property
    def is_image(self) -> bool:
        """Whether this is a text-to-image model (what :meth:`ReplicateBackend.imagine` runs)."""
        return self.kind == "image"

    def clip_lengths(self) -> list[tuple[float, Any]]:
        """Every clip length this model makes, in seconds, with the value sent for it, shortest first."""
        if self.duration_unit == "seconds":
            return [(float(d), int(d) if float(d).is_integer() else d) for d in sorted(self.durations)]
        return [((n - self.frames_offset) / self.fps, self.duration_values.get(n, n)) for n in sorted(self.frames)]

    def clip_length(self, seconds: float) -> tuple[float, Any] | None:
        """The allowed length nearest ``seconds`` and its input value, or None when none is close enough."""
        lengths = self.clip_lengths()
        if not lengths:
            return None
        best = min(lengths, key=lambda item: abs(item[0] - seconds))
        return best if abs(best[0] - seconds) <= self.duration_tolerance + 1e-6 else None

    def describe_lengths(self) -> str:
        """The allowed lengths in words: ``"5 or 10 s"``, ``"5-7.5 s"``."""
        secs = [s for s, _ in self.clip_lengths()]
        if self.duration_unit == "frames" and len(secs) > 6:
            return f"{_num(secs[0])}-{_num(secs[-1])} s ({self.frames[0]}-{self.frames[-1]} frames at {self.fps} fps)"
        words = [_num(s) for s in secs]
        return (", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else words[0]) + " s"

    def refusals(self, request: GenerationRequest, *, end_frame_models: tuple[str, ...] = ()) -> list[str]:
        """Why this model cannot honour ``request``, each reason naming the model and what would work.

        ``end_frame_models`` are the catalogue's models that can end on a given frame, for the refusal.
        """
        if not self.is_video:
            return [f"{self.id} is a {self.kind} model, not an image-to-video one"]
        out: list[str] = []
        if self.clip_length(request.duration) is None:
            out.append(
                f"{self.id} cannot make a {_num(request.duration)} s clip (duration must be {self.describe_lengths()})"
            )
        if request.aspect not in self.aspects:
            allowed = " or ".join(a.value for a in self.aspects)
            out.append(f"{self.id} makes {allowed} clips, not aspect {request.aspect.value}")
        if request.camera not in self.cameras:
            why = "it takes no prompt" if self.camera == "none" else "it cannot be steered that way"
            allowed = ", ".join(c.value for c in self.cameras)
            out.append(f"{self.id} cannot follow camera {request.camera.value!r} ({why}; supported: {allowed})")
        if request.end_image_path is not None and not self.end_image:
            others = ", ".join(end_frame_models) or "none in the catalogue"
            out.append(f"{self.id} cannot end on a given frame (models that can: {others})")
        return out

    def build_input(self, request: GenerationRequest) -> tuple[dict[str, Any], list[str], float, float]:
        """``(input, ignored, seconds, price_per_second)`` for ``request``; call only when it has no refusals.

        ``input`` holds the start (and end) image as :class:`Path` objects, which the client inlines or
        uploads. ``ignored`` names the parameters the model has no field for (dropped).
        """
        inp: dict[str, Any] = dict(self.inputs)
        ignored: list[str] = []
        price = self.price_per_second
        length = self.clip_length(request.duration)
        assert length is not None, "build_input() on a refused request"
        seconds, value = length
        inp[self.start_image] = request.image_path
        end = request.end_image_path
        if end is not None:
            inp[self.end_image] = Path(end)
            inp.update(self.with_end_image.get("inputs", {}))
            price = float(self.with_end_image.get("price_per_second", price))
        _put(inp, ignored, self.prompt, request.prompt, "prompt")
        if request.negative_prompt:
            _put(inp, ignored, self.negative, request.negative_prompt, "negative prompt")
        _put(inp, ignored, self.seed, request.seed, "seed")
        inp[self.duration_field] = value
        if self.fps_field:
            inp[self.fps_field] = self.fps
        if self.aspect_field:
            inp[self.aspect_field] = request.aspect.value
        if self.camera == "field" and request.camera.value in self.camera_values:
            inp[self.camera_field] = list(self.camera_values[request.camera.value])
        if self.motion == "field" and self.motion_values:
            inp[self.motion_field] = self.motion_values[max(0, min(request.motion, len(self.motion_values) - 1))]
        return inp, ignored, seconds, price


@dataclass(frozen=True)
class Catalogue:
    """The parsed catalogue: its entries by id and the default model."""

    default: str
    models: Mapping[str, ModelEntry]

    def get(self, model: str | None) -> ModelEntry | None:
        """The entry ``model`` names (the default for None or ""), or None when unknown."""
        return self.models.get(model or self.default)

    @property
    def video_models(self) -> list[ModelEntry]:
        """The image-to-video entries."""
        return [m for m in self.models.values() if m.is_video]

    @property
    def image_models(self) -> list[ModelEntry]:
        """The text-to-image entries."""
        return [m for m in self.models.values() if m.is_image]

    @property
    def end_frame_models(self) -> tuple[str, ...]:
        """The image-to-video models that can end on a given frame."""
        return tuple(m.id for m in self.video_models if m.end_image)

    def refusals(self, request: GenerationRequest) -> list[str]:
        """Why the model ``request`` names cannot honour it."""
        entry = self.get(request.model)
        if entry is None:
            known = ", ".join(m.id for m in self.video_models)
            return [f"model {request.model!r} is not in the replicate catalogue (known: {known})"]
        return entry.refusals(request, end_frame_models=self.end_frame_models)


_ENTRY_KEYS = {f for f in ModelEntry.__dataclass_fields__ if f != "id"}


def load_catalogue(path: Path = CATALOGUE_FILE) -> Catalogue:
    """Read and check the catalogue; raise :class:`CatalogueError` naming what is wrong."""
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CatalogueError(f"{path.name}: {exc}") from exc
    models: dict[str, ModelEntry] = {}
    for model_id, spec in (raw.get("models") or {}).items():
        try:
            models[model_id] = _entry(model_id, spec)
        except (KeyError, TypeError, ValueError) as exc:
            raise CatalogueError(f"{path.name}: [models.{model_id!r}]: {exc}") from None
    default = raw.get("default", "")
    if default not in models or not models[default].is_video:
        raise CatalogueError(f"{path.name}: default {default!r} is not an image-to-video model of the catalogue")
    return Catalogue(default=default, models=models)


def _entry(model_id: str, spec: dict[str, Any]) -> ModelEntry:
    unknown = set(spec) - _ENTRY_KEYS - {"frames_range", "frames_step"}
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", model_id):
        raise ValueError("the id must be owner/name")
    values = dict(spec)
    if "frames_range" in values:
        lo, hi = values.pop("frames_range")
        values["frames"] = list(range(int(lo), int(hi) + 1, int(values.pop("frames_step", 1))))
    values.pop("frames_step", None)
    for key in ("durations", "frames", "good_at", "motion_values"):
        if key in values:
            values[key] = tuple(values[key])
    if "aspects" in values:
        values["aspects"] = tuple(Aspect(a) for a in values["aspects"])
    if "cameras" in values:
        values["cameras"] = tuple(CameraMove(c) for c in values["cameras"])
    if "duration_values" in values:
        values["duration_values"] = {int(k): v for k, v in values["duration_values"].items()}
    entry = ModelEntry(id=model_id, **values)
    if not entry.official and not _HEX64.match(entry.version):
        raise ValueError("a community model (official = false) needs its 64-hex version id")
    if entry.output not in ("uri", "array"):
        raise ValueError(f"output must be 'uri' or 'array', not {entry.output!r}")
    if entry.is_video:
        _check_video(entry)
    elif entry.is_image:
        _check_image(entry)
    return entry


def _check_video(entry: ModelEntry) -> None:
    for key in ("start_image", "duration_field"):
        if not getattr(entry, key):
            raise ValueError(f"a video model needs {key}")
    if entry.duration_unit not in ("seconds", "frames"):
        raise ValueError(f"duration_unit must be 'seconds' or 'frames', not {entry.duration_unit!r}")
    lengths = entry.clip_lengths()
    if not lengths or any(s <= 0 for s, _ in lengths):
        raise ValueError("no positive clip length (durations, frames or frames_range)")
    if not entry.aspects or not entry.cameras or not 1 <= entry.fps <= 120:
        raise ValueError("aspects and cameras must not be empty; fps must be 1..120")
    if entry.camera not in ("prompt", "field", "none"):
        raise ValueError(f"camera must be 'prompt', 'field' or 'none', not {entry.camera!r}")
    if entry.camera == "field" and not (entry.camera_field and entry.camera_values):
        raise ValueError("camera = 'field' needs camera_field and camera_values")
    if entry.motion == "field" and not (entry.motion_field and entry.motion_values):
        raise ValueError("motion = 'field' needs motion_field and motion_values")
    if entry.price_per_second < 0 or entry.gpu_price_per_second < 0:
        raise ValueError("prices must not be negative")


def _check_image(entry: ModelEntry) -> None:
    if not entry.prompt:
        raise ValueError("a text-to-image model needs prompt (the input field of the prompt)")
    if entry.aspect_field and not entry.aspects:
        raise ValueError("aspect_field needs the aspects the model makes")
    if entry.price_per_image < 0:
        raise ValueError("prices must not be negative")


def _num(x: float) -> str:
    return f"{x:.1f}".rstrip("0").rstrip(".")


def _put(inp: dict[str, Any], ignored: list[str], name: str, value: Any, what: str) -> None:
    if name:
        inp[name] = value
    else:
        ignored.append(what)


@dataclass(frozen=True)
class CatalogueCapabilities(Capabilities):
    """The union of the catalogue's models, judging each request against the model it names.

    ``refusals`` is per model, so routing (which asks the class's capabilities, with the route's model)
    and :meth:`ReplicateBackend.submit` refuse the same things in the same words.
    """

    catalogue: Catalogue | None = field(default=None, compare=False, repr=False)

    def refusals(self, request: GenerationRequest) -> list[str]:
        """Why the model ``request.model`` names cannot honour ``request``."""
        if self.catalogue is None:
            return super().refusals(request)
        return self.catalogue.refusals(request)


def _capabilities(catalogue: Catalogue) -> CatalogueCapabilities:
    videos = catalogue.video_models
    lengths = [s for m in videos for s, _ in m.clip_lengths()]
    default = catalogue.models[catalogue.default]
    return CatalogueCapabilities(
        cameras=frozenset(c for m in videos for c in m.cameras),
        durations=(math.floor(min(lengths) * 100) / 100, math.ceil(max(lengths) * 100) / 100),
        aspects=frozenset(a for m in videos for a in m.aspects),
        fps=24,
        good_at=frozenset(s for m in videos for s in m.good_at),
        cost_per_second_usd=default.price_per_second,
        needs_network=True,
        settings=("replicate_api_token",),
        min_short_side=300,  # Kling refuses smaller images
        end_frame=bool(catalogue.end_frame_models),
        catalogue=catalogue,
    )


CATALOGUE = load_catalogue()


# -- the backend ----------------------------------------------------------------------------------


class ReplicateBackend(Backend):
    """Image-to-video models on Replicate (Kling, Wan, Hailuo, Luma, SVD, LTX), picked by ``request.model``."""

    name = "replicate"
    description = "image-to-video models hosted on Replicate (Kling, Wan, Hailuo, Luma Ray, SVD, LTX)"
    capabilities = _capabilities(CATALOGUE)
    image_models = tuple(m.id for m in CATALOGUE.image_models)
    #: Seconds :meth:`imagine` may take in all.
    still_timeout = STILL_TIMEOUT

    def __init__(self, settings: Any, *, catalogue: Catalogue | None = None) -> None:
        super().__init__(settings)
        self.catalogue = catalogue or CATALOGUE
        self._client: replicate.Client | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._secret: WebhookSigningSecret | None = None
        self._secret_at = 0.0
        self._seen: OrderedDict[str, float] = OrderedDict()

    # -- setup ------------------------------------------------------------------------------------

    @property
    def client(self) -> replicate.Client:
        """The Replicate client of the running event loop (httpx pools cannot cross loops)."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            self._client = replicate.Client(
                api_token=getattr(self.settings, "replicate_api_token", "") or None,
                base_url=getattr(self.settings, "replicate_base_url", "") or None,
                transport=httpx.AsyncHTTPTransport(verify=_tls()),  # the client wraps it in its RetryTransport
                event_hooks={"response": [_note_retry_after]},
            )
            self._client_loop = loop
        return self._client

    @functools.cached_property
    def _download_hosts(self) -> tuple[str, ...]:
        return tuple(h.strip().lower() for h in getattr(self.settings, "provider_download_hosts", ()) or () if h)

    @property
    def _max_bytes(self) -> int:
        return int(getattr(self.settings, "max_output_bytes", 200 * 1024 * 1024))

    @classmethod
    def allowed_durations(cls, model: str | None) -> list[float]:
        """The clip lengths (s) ``model`` makes, for a caller building a long clip from segments."""
        entry = CATALOGUE.get(model)
        return [s for s, _ in entry.clip_lengths()] if entry and entry.is_video else []

    def refusals(self, request: GenerationRequest) -> list[str]:
        """Why the model ``request.model`` names cannot honour ``request`` (empty when it can)."""
        return self.catalogue.refusals(request)

    @classmethod
    def end_frame_models(cls) -> list[str]:
        """``replicate:<model>`` for each catalogued model that can end on a given frame."""
        return [f"{cls.name}:{m}" for m in CATALOGUE.end_frame_models]

    # -- the protocol -----------------------------------------------------------------------------

    async def submit(self, request: GenerationRequest) -> Handle:
        """Create the prediction and return at once; refuse what the model cannot do before any call."""
        refusals = self.refusals(request)
        if refusals:
            raise UnsupportedRequest("; ".join(refusals), backend=self.name)
        entry = self.catalogue.get(request.model)
        assert entry is not None
        if not request.image_path.is_file():
            raise InvalidRequest(f"source image {request.image_path} does not exist", backend=self.name)
        inp, ignored, seconds, price = entry.build_input(request)
        files = [v for v in inp.values() if isinstance(v, Path)]
        small = all(f.stat().st_size <= INLINE_IMAGE_BYTES for f in files)
        params: dict[str, Any] = {"file_encoding_strategy": "base64" if small else "url"}
        if request.webhook_url:
            params.update(webhook=request.webhook_url, webhook_events_filter=["completed"])
        async with self._calls("create a prediction", model=entry.id):
            if entry.official:
                prediction = await self.client.models.predictions.async_create(model=entry.id, input=inp, **params)
            else:
                prediction = await self.client.predictions.async_create(version=entry.version, input=inp, **params)
        return self._handle(prediction.id, entry, request, ignored=ignored, seconds=seconds, price=price)

    async def recover(self, request: GenerationRequest, *, since: float, known: Collection[str] = ()) -> Handle | None:
        """Find the prediction a lost create started: Replicate takes no idempotency key.

        The newest predictions are listed (one page, newest first) back to ``since``; each one of the same
        model that the job system does not already hold (``known``: an earlier attempt of this job has the
        same prompt) is fetched and adopted if its plain inputs (prompt, seed, duration, …) are the request's.
        """
        entry = self.catalogue.get(request.model)
        if entry is None or self.refusals(request):
            return None
        inp, ignored, seconds, price = entry.build_input(request)
        files = {k: v for k, v in inp.items() if isinstance(v, Path)}
        if any(f.stat().st_size > INLINE_IMAGE_BYTES for f in files.values()):
            return None  # uploaded, so the input holds a file URL: another job's prediction could look the same
        expected = {k: v for k, v in inp.items() if isinstance(v, str | int | float | bool)}
        for key, path in files.items():  # the data URI the client sent, byte for byte
            with path.open("rb") as fh:
                expected[key] = base64_encode_file(fh)
        async with self._calls("list recent predictions"):
            page = await self.client.predictions.async_list()
        for listed in page.results:
            created = _epoch(listed.created_at)
            if created is not None and created < since - CLOCK_SKEW_S:
                break  # newest first: the rest are older than the lost create
            if listed.model != entry.id or listed.status in ("failed", "canceled") or listed.id in known:
                continue  # a failed or canceled one is not worth adopting: it is submitted again
            async with self._calls("fetch a prediction"):
                full = await self.client.predictions.async_get(listed.id)
            if all((full.input or {}).get(k) == v for k, v in expected.items()):
                log.info("recovered Replicate prediction %s for %s", full.id, request.key)
                return self._handle(full.id, entry, request, ignored=ignored, seconds=seconds, price=price)
        return None

    def _handle(
        self, prediction_id: str, entry: Any, request: GenerationRequest, *, ignored: list[str], seconds: float,
        price: float,
    ) -> Handle:
        return Handle(
            self.name,
            prediction_id,
            {
                "model": entry.id,
                "output": str(request.output_dir / request.output_name),
                "output_kind": entry.output,
                "seconds": seconds,
                "fps": entry.fps,
                "width": request.width,
                "height": request.height,
                "price_per_second": price,
                "gpu_price_per_second": entry.gpu_price_per_second,
                "ignored": ignored,
                "submitted": time.time(),
            },
        )

    async def status(self, handle: Handle) -> StatusReport:
        """Where the prediction stands; a failure carries its classified error."""
        async with self._calls("check a prediction"):
            prediction = await self.client.predictions.async_get(handle.id)
        return self._report(prediction.status, prediction.error, prediction.logs)

    def _report(self, status: str, error: Any, logs: str | None) -> StatusReport:
        if status == "starting":
            return StatusReport(State.QUEUED, message="waiting for a GPU")
        if status == "processing":
            progress = Prediction.Progress.parse(logs) if logs else None
            return StatusReport(State.RUNNING, progress=progress.percentage if progress else None)
        if status == "succeeded":
            return StatusReport(State.SUCCEEDED, progress=1.0)
        if status == "canceled":
            return StatusReport(State.CANCELED, message="canceled")
        failure = self._classify_failure(str(error or "the prediction failed without an error message"))
        return StatusReport(State.FAILED, message=failure.message, error=failure)

    def _classify_failure(self, text: str) -> BackendError:
        text = text.strip()[:500]
        if _REFUSAL.search(text):
            return ContentRefused(f"Replicate's moderation refused it: {text}", backend=self.name)
        if _INVALID.search(text):
            return InvalidRequest(f"the model rejected the input: {text}", backend=self.name)
        return BackendUnavailable(f"the prediction failed: {text}", backend=self.name)

    async def result(self, handle: Handle) -> GenerationResult:
        """Download the output into the handle's output path, check it is a video, and cost it."""
        async with self._calls("fetch a prediction"):
            prediction = await self.client.predictions.async_get(handle.id)
        if prediction.status != "succeeded":
            raise BackendUnavailable(f"the prediction is {prediction.status}, not succeeded", backend=self.name)
        url = self._output_url(prediction.output)
        out = Path(handle.data["output"])
        out.parent.mkdir(parents=True, exist_ok=True)
        part = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.part.mp4")
        try:
            await self._download(url, part)
            try:
                info = await asyncio.to_thread(video.probe, part)
            except video.VideoError as exc:
                raise BackendUnavailable(f"the model's output is not a video: {exc}", backend=self.name) from exc
            os.replace(part, out)
        finally:
            part.unlink(missing_ok=True)
        metrics = prediction.metrics or {}
        return GenerationResult(
            video_path=out,
            width=info.width,
            height=info.height,
            fps=info.fps,
            frames=info.frames,
            cost_usd=_cost(handle.data, metrics, info.duration),
            metadata={
                "model": handle.data.get("model"),
                "prediction": handle.id,
                "predict_time": metrics.get("predict_time"),
                "ignored": handle.data.get("ignored", []),
            },
        )

    async def imagine(self, request: ImageRequest) -> ImageResult:
        """Paint a still with a text-to-image model of the catalogue and wait for it (see the module docstring)."""
        entry = self.catalogue.get(request.model or self.image_models[0])
        if entry is None or not entry.is_image:
            known = ", ".join(m.id for m in self.catalogue.image_models) or "none"
            raise UnsupportedRequest(
                f"{request.model!r} is not a text-to-image model of the replicate catalogue (known: {known})",
                backend=self.name,
            )
        inp: dict[str, Any] = {**dict(entry.inputs), entry.prompt: request.prompt}
        if entry.seed:
            inp[entry.seed] = request.seed
        if entry.negative and request.negative_prompt:
            inp[entry.negative] = request.negative_prompt
        if entry.aspect_field:
            aspect = request.aspect if request.aspect in entry.aspects else entry.aspects[0]
            inp[entry.aspect_field] = aspect.value
        deadline = time.monotonic() + self.still_timeout
        wait = max(1, min(STILL_WAIT, int(self.still_timeout)))  # never held past our own deadline
        async with self._calls("paint a picture", model=entry.id):
            if entry.official:
                prediction = await self.client.models.predictions.async_create(model=entry.id, input=inp, wait=wait)
            else:
                prediction = await self.client.predictions.async_create(version=entry.version, input=inp, wait=wait)
        while prediction.status in ("starting", "processing"):
            if time.monotonic() > deadline:
                with contextlib.suppress(BackendError):
                    await self.cancel(Handle(self.name, prediction.id))
                raise BackendTimeout(f"{entry.id} made no picture in {self.still_timeout:g} s", backend=self.name)
            await asyncio.sleep(0.5)
            async with self._calls("check a picture"):
                prediction = await self.client.predictions.async_get(prediction.id)
        report = self._report(prediction.status, prediction.error, None)
        if report.state is not State.SUCCEEDED:
            raise report.error or BackendUnavailable(f"the picture was {prediction.status}", backend=self.name)
        url = self._output_url(prediction.output)
        out = request.output_path
        out.parent.mkdir(parents=True, exist_ok=True)
        part = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            await self._download(url, part, kinds=_IMAGE_TYPES, what="picture")
            try:
                width, height = await asyncio.to_thread(_save_png, part, out)
            except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
                raise BackendUnavailable(f"{entry.id}'s output is not a picture: {exc}", backend=self.name) from exc
        finally:
            part.unlink(missing_ok=True)
        return ImageResult(
            image_path=out, width=width, height=height, cost_usd=round(entry.price_per_image, 6),
            metadata={"model": entry.id, "prediction": prediction.id},
        )

    async def cancel(self, handle: Handle) -> None:
        """Ask Replicate to cancel; a prediction that already ended or is unknown is left alone."""
        try:
            async with self._calls("cancel a prediction"):
                await self.client.predictions.async_cancel(handle.id)
        except InvalidRequest:
            return  # 404 or 422: gone or already over, nothing to stop

    async def aclose(self) -> None:
        """Close the client's connections."""
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client._async_client.aclose()

    # -- webhooks ---------------------------------------------------------------------------------

    async def verify_webhook(self, headers: Mapping[str, str], body: bytes) -> WebhookNotice:
        """Check Replicate's signature, the timestamp and replays; say which prediction changed.

        The notice carries no report: the job system polls the prediction on this hint.
        """
        lowered = {k.lower(): v for k, v in headers.items()}
        missing = [h for h in ("webhook-id", "webhook-timestamp", "webhook-signature") if not lowered.get(h)]
        if missing:
            raise WebhookRejected(400, f"missing {', '.join(missing)} header")
        webhook_id = lowered["webhook-id"]
        try:
            timestamp = int(lowered["webhook-timestamp"])
            text = body.decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            raise WebhookRejected(400, "malformed webhook-timestamp or body") from None
        if not text:
            raise WebhookRejected(400, "empty body")
        if abs(time.time() - timestamp) > WEBHOOK_TOLERANCE:
            raise WebhookRejected(401, f"stale webhook: its timestamp is {time.time() - timestamp:+.0f} s off")
        secret = await self._signing_secret()
        try:
            try:
                Webhooks.validate(headers=lowered, body=text, secret=secret, tolerance=WEBHOOK_TOLERANCE)
            except InvalidSignatureError:
                if time.monotonic() - self._secret_at < SECRET_REFRESH_SECONDS:
                    raise
                secret = await self._signing_secret(refresh=True)  # it may have been rotated
                Webhooks.validate(headers=lowered, body=text, secret=secret, tolerance=WEBHOOK_TOLERANCE)
        except InvalidSecretKeyError as exc:
            raise WebhookRejected(503, f"Replicate's signing secret is malformed: {exc}") from None
        except InvalidTimestampError:
            raise WebhookRejected(401, "stale webhook timestamp") from None
        except (WebhookValidationError, binascii.Error, ValueError):
            raise WebhookRejected(401, "bad webhook signature") from None
        self._forget_old_ids()
        if webhook_id in self._seen:
            raise WebhookRejected(409, f"webhook {webhook_id} was already received")
        try:
            payload = json.loads(text)
        except ValueError:
            raise WebhookRejected(400, "the body is not JSON") from None
        if not isinstance(payload, dict) or not isinstance(payload.get("id"), str) or not payload["id"]:
            raise WebhookRejected(400, "the body is not a prediction (no id)")
        self._seen[webhook_id] = time.time()
        return WebhookNotice(request_id=payload["id"])

    async def _signing_secret(self, *, refresh: bool = False) -> WebhookSigningSecret:
        if self._secret is None or refresh:
            try:
                async with self._calls("fetch the webhook signing secret"):
                    self._secret = await self.client.webhooks.default.async_secret()
            except BackendError as exc:
                raise WebhookRejected(503, f"cannot verify now: {exc.message}") from None
            self._secret_at = time.monotonic()
        return self._secret

    def _forget_old_ids(self) -> None:
        horizon = time.time() - 2 * WEBHOOK_TOLERANCE
        while self._seen and (len(self._seen) >= WEBHOOK_IDS_KEPT or next(iter(self._seen.values())) < horizon):
            self._seen.popitem(last=False)

    # -- outputs ----------------------------------------------------------------------------------

    def _output_url(self, output: Any) -> str:
        if isinstance(output, list | tuple):
            output = output[0] if output else None
        if output is None:
            raise BackendUnavailable(
                "the prediction has no output (Replicate removes API outputs an hour after they are made)",
                backend=self.name,
            )
        url = getattr(output, "url", output)  # a FileOutput, if a caller wrapped it
        if not isinstance(url, str) or not url:
            raise BackendUnavailable(
                f"the model returned {type(output).__name__} {str(output)[:80]!r}, not a file URL", backend=self.name
            )
        return url

    async def _download(
        self, url: str, dest: Path, *, kinds: tuple[str, ...] = _VIDEO_TYPES, what: str = "video"
    ) -> None:
        if url.startswith("data:"):  # decoding up to max_output_bytes: off the event loop
            await asyncio.to_thread(lambda: dest.write_bytes(self._decode_data_uri(url, kinds=kinds, what=what)))
            return
        limit = self._max_bytes
        timeout = httpx.Timeout(60.0, connect=10.0)
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=False, verify=_tls()) as http:
            for _ in range(_MAX_REDIRECTS + 1):
                self._check_host(url)
                try:
                    async with http.stream("GET", url) as response:
                        if response.is_redirect:
                            url = urllib.parse.urljoin(url, response.headers.get("location", ""))
                            continue
                        await self._save(response, dest, limit, kinds=kinds, what=what)
                        return
                except httpx.TimeoutException as exc:
                    raise BackendTimeout(f"downloading the output timed out: {exc}", backend=self.name) from exc
                except httpx.HTTPError as exc:
                    raise BackendUnavailable(f"downloading the output failed: {exc}", backend=self.name) from exc
        raise BackendUnavailable(f"the output URL redirects more than {_MAX_REDIRECTS} times", backend=self.name)

    async def _save(
        self, response: httpx.Response, dest: Path, limit: int, *, kinds: tuple[str, ...], what: str
    ) -> None:
        if response.status_code != 200:
            raise BackendUnavailable(f"downloading the output answered HTTP {response.status_code}", backend=self.name)
        kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind and not kind.startswith(kinds):
            raise BackendUnavailable(f"the model's output is {kind}, not a {what}", backend=self.name)
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise PermanentBackendError(_too_big(int(declared), limit), backend=self.name)
        size = 0
        with dest.open("wb") as fh:
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > limit:
                    raise PermanentBackendError(_too_big(size, limit, more=True), backend=self.name)
                fh.write(chunk)
        if size == 0:
            raise BackendUnavailable("the model's output is empty", backend=self.name)

    def _check_host(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        host = (parts.hostname or "").lower()
        if parts.scheme not in ("http", "https") or not host:
            raise BackendUnavailable(f"the model's output {url[:80]!r} is not an http(s) URL", backend=self.name)
        if not host_allowed(host, self._download_hosts):
            raise PermanentBackendError(
                f"refusing to download the output from {host}: not in ANIMABOT_PROVIDER_DOWNLOAD_HOSTS "
                f"({', '.join(self._download_hosts) or 'empty'})",
                backend=self.name,
            )

    def _decode_data_uri(self, uri: str, *, kinds: tuple[str, ...] = _VIDEO_TYPES, what: str = "video") -> bytes:
        header, sep, payload = uri[5:].partition(",")
        if not sep:
            raise BackendUnavailable("the model's output is a malformed data: URI", backend=self.name)
        kind, *params = header.split(";")
        kind = kind.strip().lower()
        if kind and not kind.startswith(kinds):
            raise BackendUnavailable(f"the model's output is {kind}, not a {what}", backend=self.name)
        is_base64 = "base64" in (p.strip().lower() for p in params)
        estimate = len(payload) * 3 // 4 if is_base64 else len(payload)
        if estimate > self._max_bytes:
            raise PermanentBackendError(_too_big(estimate, self._max_bytes), backend=self.name)
        try:
            data = base64.b64decode(payload, validate=True) if is_base64 else urllib.parse.unquote_to_bytes(payload)
        except (binascii.Error, ValueError) as exc:
            raise BackendUnavailable(f"the model's output is a malformed data: URI: {exc}", backend=self.name) from exc
        if not data:
            raise BackendUnavailable("the model's output is empty", backend=self.name)
        return data

    # -- errors -----------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _calls(self, what: str, *, model: str = "") -> Any:
        """Map the client's errors for one API call onto the backend error tree."""
        _retry_after.set(None)
        try:
            yield
        except ReplicateError as exc:
            raise self._http_error(exc, what, model) from exc
        except httpx.TimeoutException as exc:
            raise BackendTimeout(f"Replicate did not answer in time to {what}: {exc!r}", backend=self.name) from exc
        except httpx.HTTPError as exc:
            raise BackendUnavailable(f"cannot reach Replicate to {what}: {exc!r}", backend=self.name) from exc
        except (ValueError, TypeError, KeyError) as exc:  # a malformed answer (pydantic errors are ValueErrors)
            raise BackendUnavailable(f"Replicate's answer to {what} was malformed: {exc}", backend=self.name) from exc

    def _http_error(self, exc: ReplicateError, what: str, model: str) -> BackendError:
        status = exc.status or 0
        detail = (exc.detail or exc.title or "").strip()[:300]
        said = f"Replicate answered {status} to {what}" + (f": {detail}" if detail else "")
        if status == 429:
            return RateLimited(said, backend=self.name, retry_after=_retry_after_seconds(_retry_after.get(), detail))
        if status in (401, 403):
            return PermanentBackendError(
                f"{said}. Check ANIMABOT_REPLICATE_API_TOKEN (a valid token from replicate.com/account/api-tokens)",
                backend=self.name,
            )
        if status == 402:
            return PermanentBackendError(f"{said}. Add credit to the Replicate account", backend=self.name)
        if status == 404 and model:
            return InvalidRequest(f"Replicate does not know the model {model}: {detail}", backend=self.name)
        if status >= 500 or status in (408, 409) or status == 0:
            return BackendUnavailable(said, backend=self.name)
        return InvalidRequest(said, backend=self.name)


@functools.cache
def _tls() -> ssl.SSLContext:
    """One TLS context for the process (building one loads the CA bundle: about 0.2 s)."""
    return ssl.create_default_context(cafile=certifi.where())


async def _note_retry_after(response: httpx.Response) -> None:
    """Response hook of the client's httpx pool: remember a 429's ``Retry-After`` for this task."""
    if response.status_code == 429:
        _retry_after.set(response.headers.get("retry-after"))


def _retry_after_seconds(header: str | None, detail: str) -> float:
    seconds: float | None = None
    if header:
        with contextlib.suppress(ValueError):
            seconds = float(header.strip())
    if seconds is None and (match := _AVAILABLE_IN.search(detail)):
        seconds = float(match.group(1))
    if seconds is None or not math.isfinite(seconds):
        seconds = DEFAULT_RETRY_AFTER
    return min(max(seconds, 0.5), 600.0)


def _save_png(src: Path, dest: Path) -> tuple[int, int]:
    """Decode the downloaded picture (PNG, WebP, JPEG…) and write it to ``dest`` as RGB PNG; its size."""
    with Image.open(src) as im:
        im.load()
        rgb = im.convert("RGB")
    rgb.save(dest, format="PNG", compress_level=1)
    return rgb.size


def _too_big(size: int, limit: int, *, more: bool = False) -> str:
    return (
        f"the model's output is {'over ' if more else ''}{size / 2**20:.1f} MiB, above the "
        f"{limit / 2**20:.1f} MiB cap (ANIMABOT_MAX_OUTPUT_BYTES)"
    )


def _cost(data: Mapping[str, Any], metrics: Mapping[str, Any], seconds: float) -> float:
    per_second = float(data.get("price_per_second") or 0.0)
    if per_second:
        return round(per_second * float(data.get("seconds") or seconds), 6)
    predict_time = metrics.get("predict_time")
    gpu = float(data.get("gpu_price_per_second") or 0.0)
    if gpu and isinstance(predict_time, int | float):
        return round(gpu * float(predict_time), 6)
    return 0.0


def _epoch(stamp: str | None) -> float | None:
    """Replicate's ISO 8601 time (``2023-09-08T16:19:34.765994Z``) as epoch seconds; None if unreadable."""
    try:
        return datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
