r"""``fal``: image-to-video models on fal.ai's queue (Kling, Wan, Hailuo, Luma Ray, LTX, Stable Video).

Every call goes through the real ``fal_client`` (``AsyncClient(key=ANIMABOT_FAL_KEY)``) against
``settings.fal_queue_url``; the handle keeps fal's app id and request id, so any process can resume it::

    backend = FalBackend(settings)
    handle = await backend.submit(GenerationRequest(..., model="fal-ai/wan-i2v", duration=5))
    await backend.status(handle)    # StatusReport(QUEUED, queue_position=3) … RUNNING … SUCCEEDED
    clip = await backend.result(handle)   # the MP4 at output_dir/output_name, cost_usd from the catalogue

The models live in ``backends/data/fal.toml`` (data, not code): field names, how each takes its length
(``"5"``, ``"5s"``, a frame count), the durations, aspects and cameras it can honour, its price. A request
a model cannot honour is refused by name before anything is sent (``UnsupportedRequest``), and the class's
``capabilities.refusals`` judges the model the request names, so routing skips such a model too. Camera
moves are steered by the prompt the pipeline writes; motion strength maps to a field where a model has one;
negative prompt and seed are passed where a model takes them and dropped (noted in the handle) where not.

fal's answers, and what they become (transient errors are retried by the job system, permanent ones move
the job to its next backend):

====================================================  ==========================================================
``IN_QUEUE`` / ``IN_PROGRESS``                        ``QUEUED`` with ``queue_position`` / ``RUNNING``
``COMPLETED``                                         ``SUCCEEDED``
``COMPLETED`` + error (result GET then errors)        ``FAILED``: moderation → ContentRefused, 422 →
                                                      InvalidRequest (fal's ``detail``), ``request_timeout`` →
                                                      BackendTimeout, 5xx / ``runner_disconnected`` / anything
                                                      else → BackendUnavailable; a cancel → ``CANCELED``
HTTP 429                                              RateLimited (``Retry-After``)
HTTP 401 / 403                                        PermanentBackendError: check ANIMABOT_FAL_KEY
HTTP 404 on submit / on a poll                        InvalidRequest (no such model) / FAILED, BackendUnavailable
HTTP 422, other 4xx                                   InvalidRequest with fal's ``detail``
HTTP 5xx, transport errors, timeouts                  BackendUnavailable
====================================================  ==========================================================

**One retry layer.** ``fal_client`` retries every verb, POST included, up to 10 times on 408/409/429 and
transport errors (ignoring ``Retry-After``), so a 429 on submit would silently become 10 POSTs and a submit
whose answer was lost could start a second, billed generation. The backend sets
``fal_client.client.MAX_ATTEMPTS = 1`` (the client reads it on every call; nothing else in animabot uses
fal_client) and leaves retrying to the job system. fal's *server-side* retries of a runner that fails before
it answers (``x-fal-no-retry`` turns them off) stay on by default: they happen inside one request, are not
billed twice and cost no new queue wait; ``FalBackend(settings, server_retries=False)`` sends the header.
Each call is also bounded by ``request_timeout`` (60 s), so a hung connection cannot stall a worker.

**Files.** The picture is sent inline as a JPEG ``data:`` URI (fal accepts them for every image field; no
upload to fal's CDN). The output is read from ``data:`` URIs or downloaded over http(s) from
``settings.provider_download_hosts`` only (``*.host`` matches subdomains; redirects are followed only to
allowed hosts), never more than ``settings.max_output_bytes``. A clip that is not the requested size is
scaled and centre-cropped to it (the quality gate rejects any other size); one whose shape is far off is
left as it is, for the gate to name.

**End frames** go to a model's ``end_image`` field (Kling 2.1 pro's ``tail_image_url``, Hailuo's and Luma's
``end_image_url``) as a second JPEG ``data:`` URI; a model without one refuses the request by name, listing
those that have one.

**Stills** (:meth:`FalBackend.imagine`, a prompt-only job's first picture): the catalogue's ``text-to-image``
entries (FLUX.1 dev by default) go through the same queue: submit, poll every half second until ``COMPLETED``
(or ``still_timeout``, then canceled and :class:`BackendTimeout`), fetch the result and download the first of
its ``images`` under the same host and size rules. The size is sent as ``{"width", "height"}`` in the model's
``size`` field; the picture is written as PNG. Its cost is the catalogue's per-megapixel price, billed per
started megapixel.

**Webhooks** (:meth:`FalBackend.verify_webhook`): Ed25519 over
``"{request_id}\n{user_id}\n{timestamp}\n{sha256(body)}"``, verified against the JWKS at
``settings.fal_jwks_url`` (cached 24 h; refetched once when no key verifies, at most once a minute).
Answers: 401 unsigned, bad signature or timestamp more than 300 s off; 409 the same request id and
timestamp seen before (kept in memory, bounded; the job system's resume is idempotent anyway); 400
malformed; 503 when the keys cannot be fetched (fal retries its webhooks). A verified webhook is a hint to
poll; an ``ERROR`` one also carries the failure.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import io
import json
import logging
import math
import os
import re
import subprocess
import time
import tomllib
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import fal_client
import fal_client.client as fal_client_module
import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from PIL import Image

from backends import video
from backends.base import (
    Aspect,
    Backend,
    BackendDeclarationError,
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

__all__ = ["CATALOGUE", "Catalogue", "DurationSpec", "FalBackend", "Model", "Price", "host_allowed"]

log = logging.getLogger(__name__)

CATALOGUE_PATH = Path(__file__).parent / "data" / "fal.toml"
#: A requested length is honoured when the model can make one within this slack (the quality gate's).
DURATION_SLACK_S = 0.25
DURATION_SLACK = 0.05
#: A clip whose shape is further than this from the requested one is not cropped to it.
CONFORM_MAX_ASPECT_ERROR = 0.2
VIDEO_KIND = "image-to-video"
IMAGE_KIND = "text-to-image"
KINDS = frozenset({VIDEO_KIND, IMAGE_KIND, "upscale"})
#: Seconds a still may take in all (queue included) before it is canceled.
STILL_TIMEOUT_S = 180.0
STILL_POLL_S = 0.5

WEBHOOK_TOLERANCE_S = 300
JWKS_TTL_S = 24 * 3600
JWKS_REFETCH_INTERVAL_S = 60.0
REPLAY_MEMORY = 10_000
MAX_REDIRECTS = 3
DEFAULT_RETRY_AFTER_S = 5.0

_MODERATION = re.compile(
    r"content[ _-]?(policy|moderation|checker|filter)|moderat|nsfw|not safe for work|flagged|safety (filter|system)",
    re.IGNORECASE,
)
_CANCELED = re.compile(r"cancel", re.IGNORECASE)
_STATUS_IN_TEXT = re.compile(r"status code:?\s*(\d{3})", re.IGNORECASE)


def _slack(seconds: float) -> float:
    return max(DURATION_SLACK_S, DURATION_SLACK * seconds)


def _number(value: float) -> str:
    return f"{value:g}"


# -- the catalogue -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DurationSpec:
    """How one model is asked for a length, and which lengths it can make.

    Three shapes (see ``fal.toml``): discrete ``values`` (written with ``format`` into ``field``; no field
    means the model always makes that length), a frame count in ``frames_field`` played at ``fps``, or a
    fixed ``frames`` count whose frame rate (``fps_field``, ``min_fps..max_fps``) sets the length.
    """

    field: str = ""
    values: tuple[float, ...] = ()
    format: str = "{seconds}"
    frames_field: str = ""
    fps: float = 0.0
    min_frames: int = 0
    max_frames: int = 0
    frames: int = 0
    fps_field: str = ""
    min_fps: int = 0
    max_fps: int = 0

    @property
    def span(self) -> tuple[float, float]:
        """Shortest and longest length in seconds."""
        if self.values:
            return min(self.values), max(self.values)
        if self.frames_field:
            return self.min_frames / self.fps, self.max_frames / self.fps
        return self.frames / self.max_fps, self.frames / self.min_fps

    def describe(self) -> str:
        """The lengths offered, for messages: ``"5 or 10 s"``, ``"5.06..6.25 s"``."""
        if self.values:
            return " or ".join(_number(v) for v in sorted(self.values)) + " s"
        lo, hi = self.span
        return f"{lo:.3g}..{hi:.3g} s"

    def plan(self, seconds: float) -> tuple[float, dict[str, Any], float | None] | None:
        """``(seconds it will make, arguments, frame rate if set here)``, or None if it cannot come close."""
        slack = _slack(seconds)
        if self.values:
            best = min(self.values, key=lambda v: abs(v - seconds))
            if abs(best - seconds) > slack:
                return None
            args = {self.field: self.format.format(seconds=_number(best))} if self.field else {}
            return best, args, None
        if self.frames_field:
            n = min(max(round(seconds * self.fps), self.min_frames), self.max_frames)
            actual = n / self.fps
            if abs(actual - seconds) > slack:
                return None
            args: dict[str, Any] = {self.frames_field: n}
            if self.fps_field:
                args[self.fps_field] = _int_if_whole(self.fps)
            return actual, args, self.fps
        rate = min(max(round(self.frames / seconds), self.min_fps), self.max_fps)
        actual = self.frames / rate
        if abs(actual - seconds) > slack:
            return None
        return actual, {self.fps_field: rate}, float(rate)


def _int_if_whole(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


@dataclass(frozen=True)
class Price:
    """What fal charges for one output, in US dollars (one of the fields is set)."""

    per_second: float = 0.0
    per_video: float = 0.0
    tiers: tuple[tuple[float, float], ...] = ()
    per_image: float = 0.0
    per_megapixel: float = 0.0
    note: str = ""

    def usd(self, seconds: float = 0.0) -> float:
        """The price of a clip of ``seconds`` (or of one still)."""
        if self.per_second:
            return round(self.per_second * seconds, 4)
        if self.tiers:
            for up_to, usd in self.tiers:
                if seconds <= up_to + 1e-6:
                    return usd
            return self.tiers[-1][1]
        return self.per_video or self.per_image or self.per_megapixel


@dataclass(frozen=True)
class Model:
    """One catalogue entry: a fal endpoint, the fields it takes and what it can honour."""

    id: str
    name: str
    kind: str
    output: str
    fields: Mapping[str, str]
    price: Price
    fps: float = 24.0
    resolution: str = ""
    cameras: frozenset[CameraMove] = frozenset(CameraMove)
    aspects: frozenset[Aspect] = frozenset(Aspect)
    aspect_field: str = ""
    good_at: frozenset[str] = frozenset()
    duration: DurationSpec | None = None
    motion_field: str = ""
    motion_values: tuple[Any, ...] = ()
    fixed: Mapping[str, Any] = field(default_factory=dict)

    @property
    def makes_video(self) -> bool:
        """Whether the backend can generate clips with it."""
        return self.kind == VIDEO_KIND

    def field_for(self, concept: str) -> str:
        """The fal field for ``concept`` (image, end_image, prompt, negative, seed, size), or ``""``."""
        return self.fields.get(concept, "")

    def refusals(self, request: GenerationRequest) -> list[str]:
        """Why this model cannot honour ``request``, each naming the value, the model and what would work."""
        if not self.makes_video:
            return [f"{self.id} makes {self.kind.replace('-', ' ')}, not video; pick an image-to-video model"]
        assert self.duration is not None
        out: list[str] = []
        if request.camera not in self.cameras:
            allowed = ", ".join(sorted(c.value for c in self.cameras))
            out.append(f"camera {request.camera.value!r} is not supported by {self.name} (supported: {allowed})")
        if self.duration.plan(request.duration) is None:
            out.append(f"duration {request.duration:g}s is not offered by {self.name} "
                       f"(offered: {self.duration.describe()})")
        if request.aspect not in self.aspects:
            allowed = ", ".join(sorted(a.value for a in self.aspects))
            out.append(f"aspect {request.aspect.value} is not supported by {self.name} (supported: {allowed})")
        if request.end_image_path is not None and not self.field_for("end_image"):
            out.append(f"an end frame is not supported by {self.name} (models with one: {_with_end_frames()})")
        return out

    def capabilities(self) -> Capabilities:
        """What this one model can do, as a :class:`Capabilities` (durations as the span it can make)."""
        assert self.duration is not None
        lo, hi = self.duration.span
        return Capabilities(
            cameras=self.cameras, durations=(lo, hi), aspects=self.aspects, fps=round(self.fps),
            good_at=self.good_at, cost_per_second_usd=round(self.price.usd(lo) / lo, 4),
            needs_network=True, settings=("fal_key",),
        )

    def arguments(
        self, request: GenerationRequest, image_uri: str, end_uri: str | None = None
    ) -> tuple[dict[str, Any], float, float, list[str]]:
        """``(arguments, seconds it will make, its frame rate, request parameters it ignores)``."""
        assert self.duration is not None
        planned = self.duration.plan(request.duration)
        if planned is None:
            raise UnsupportedRequest("; ".join(self.refusals(request)), backend=FalBackend.name)
        seconds, length_args, fps = planned
        args: dict[str, Any] = dict(self.fixed)
        args[self.field_for("image")] = image_uri
        ignored: list[str] = []
        for concept, value, label in (
            ("prompt", request.prompt, "prompt"),
            ("negative", request.negative_prompt, "negative prompt"),
            ("seed", request.seed, "seed"),
        ):
            if self.field_for(concept):
                if value != "":
                    args[self.field_for(concept)] = value
            elif value not in ("", 0):
                ignored.append(label)
        if end_uri is not None:
            args[self.field_for("end_image")] = end_uri
        if self.aspect_field:
            args[self.aspect_field] = request.aspect.value
        if self.motion_field:
            args[self.motion_field] = self.motion_values[min(max(request.motion, 0), len(self.motion_values) - 1)]
        args.update(length_args)
        return args, seconds, fps or self.fps, ignored


@dataclass(frozen=True)
class Catalogue:
    """Every model in ``fal.toml`` and the default one."""

    default: str
    models: Mapping[str, Model]

    @classmethod
    def load(cls, path: Path = CATALOGUE_PATH) -> Catalogue:
        """Read and check ``path``; a wrong entry raises :class:`BackendDeclarationError` naming it."""
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise BackendDeclarationError(f"fal catalogue {path}: {exc}") from exc
        models: dict[str, Model] = {}
        for model_id, entry in (raw.get("models") or {}).items():
            try:
                models[model_id] = _parse_model(model_id, entry)
            except (KeyError, TypeError, ValueError) as exc:
                raise BackendDeclarationError(f"fal catalogue {path}, model {model_id!r}: {exc}") from exc
        default = raw.get("default", "")
        if default not in models or not models[default].makes_video:
            raise BackendDeclarationError(f"fal catalogue {path}: default {default!r} is not an image-to-video model")
        return cls(default=default, models=models)

    def model(self, model_id: str | None) -> Model | None:
        """The entry for ``model_id`` (the default for None or ``""``), or None if unknown."""
        return self.models.get(model_id or self.default)

    @property
    def video_models(self) -> list[Model]:
        """The image-to-video entries."""
        return [m for m in self.models.values() if m.makes_video]

    @property
    def image_models(self) -> list[Model]:
        """The text-to-image entries (stills for prompt-only jobs)."""
        return [m for m in self.models.values() if m.kind == IMAGE_KIND]

    def refusals(self, request: GenerationRequest) -> list[str]:
        """Why ``request`` cannot be made with the model it names (or the default)."""
        model = self.model(request.model)
        if model is None:
            known = ", ".join(m.id for m in self.video_models)
            return [f"model {request.model!r} is not in fal's catalogue (backends/data/fal.toml; known: {known})"]
        return model.refusals(request)

    def capabilities(self) -> Capabilities:
        """The union over the video models, judged per model by ``refusals``."""
        videos = self.video_models
        spans = [m.duration.span for m in videos if m.duration is not None]
        default = self.models[self.default]
        return _FalCapabilities(
            cameras=frozenset().union(*(m.cameras for m in videos)),
            durations=(min(lo for lo, _ in spans), max(hi for _, hi in spans)),
            aspects=frozenset().union(*(m.aspects for m in videos)),
            fps=24,
            good_at=frozenset().union(*(m.good_at for m in videos)),
            cost_per_second_usd=default.capabilities().cost_per_second_usd,
            needs_network=True,
            settings=("fal_key",),
            end_frame=any(m.field_for("end_image") for m in videos),
        )


def _parse_model(model_id: str, entry: dict[str, Any]) -> Model:
    kind = entry["kind"]
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    fields = dict(entry.get("fields") or {})
    price = Price(**{k: tuple(tuple(t) for t in v) if k == "tiers" else v for k, v in entry["price"].items()})
    common: dict[str, Any] = {
        "id": model_id, "name": entry["name"], "kind": kind, "output": entry["output"], "fields": fields,
        "price": price, "fixed": dict(entry.get("fixed") or {}), "resolution": str(entry.get("resolution", "")),
    }
    if kind == IMAGE_KIND and not fields.get("prompt"):
        raise ValueError("a text-to-image model needs fields.prompt")
    if kind != VIDEO_KIND:
        return Model(**common)
    if not fields.get("image"):
        raise ValueError("an image-to-video model needs fields.image")
    cameras = entry.get("cameras", "prompt")
    raw_duration = dict(entry["duration"])
    if "values" in raw_duration:
        raw_duration["values"] = tuple(float(v) for v in raw_duration["values"])
    duration = DurationSpec(**raw_duration)
    lo, hi = duration.span
    if not 0 < lo <= hi:
        raise ValueError(f"duration gives an empty span {lo:g}..{hi:g} s")
    motion = entry.get("motion") or {}
    if motion and len(motion.get("values", ())) != 5:
        raise ValueError("motion.values needs five values, for motion 0..4")
    return Model(
        **common,
        fps=float(entry["fps"]),
        cameras=frozenset(CameraMove) if cameras == "prompt" else frozenset(CameraMove(c) for c in cameras),
        aspects=frozenset(Aspect(a) for a in entry["aspects"]),
        aspect_field=entry.get("aspect_field", ""),
        good_at=frozenset(entry.get("good_at", ())),
        duration=duration,
        motion_field=motion.get("field", ""),
        motion_values=tuple(motion.get("values", ())),
    )


class _FalCapabilities(Capabilities):
    """Capabilities whose ``refusals`` judge the model a request names, so routing skips what it cannot do."""

    def refusals(self, request: GenerationRequest) -> list[str]:
        return CATALOGUE.refusals(request)


def _with_end_frames() -> str:
    return ", ".join(m.name for m in CATALOGUE.video_models if m.field_for("end_image"))


CATALOGUE = Catalogue.load()


# -- errors ------------------------------------------------------------------------------------------


def _detail_text(detail: Any) -> str:
    """The ``detail`` of a fal error (a string, or pydantic's ``[{loc, msg, type}]``) as one line."""
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
                msg = str(item.get("msg", item))
                parts.append(f"{loc}: {msg}" if loc else msg)
            else:
                parts.append(str(item))
        return "; ".join(parts)
    if isinstance(detail, dict):
        return str(detail.get("msg") or detail.get("message") or json.dumps(detail))
    return str(detail or "").strip()


def _detail_types(detail: Any) -> str:
    if isinstance(detail, list):
        return " ".join(str(item.get("type", "")) for item in detail if isinstance(item, dict))
    return ""


def _retry_after(headers: Mapping[str, str]) -> float:
    value = {k.lower(): v for k, v in headers.items()}.get("retry-after", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return DEFAULT_RETRY_AFTER_S


def _is_moderation(*texts: str) -> bool:
    return any(_MODERATION.search(t or "") for t in texts)


def _http_error(
    status: int, detail: Any, headers: Mapping[str, str], error_type: str | None, *, model: Model | None, during: str
) -> BackendError:
    """The backend error for an HTTP error answer from fal (``during`` is ``submit``, ``status``, ``result``…)."""
    text = _detail_text(detail) or f"HTTP {status}"
    name = model.name if model else "fal"
    backend = FalBackend.name
    if status == 429:
        wait = _retry_after(headers)
        return RateLimited(f"fal is rate limiting requests (HTTP 429, retry after {wait:g}s): {text}",
                           backend=backend, retry_after=wait)
    if status in (401, 403):
        return PermanentBackendError(f"fal refused the API key (HTTP {status}: {text}); check ANIMABOT_FAL_KEY",
                                     backend=backend)
    if _is_moderation(text, error_type or "", _detail_types(detail)):
        return ContentRefused(f"{name} refused the picture or the prompt: {text}", backend=backend)
    if status == 404:
        if during == "submit":
            model_id = model.id if model else "?"
            return InvalidRequest(f"fal has no model {model_id!r} (HTTP 404: {text}); check backends/data/fal.toml",
                                  backend=backend)
        return BackendUnavailable(f"fal no longer knows this request (HTTP 404 during {during}): {text}",
                                  backend=backend)
    if status == 408 or error_type == "request_timeout" or (status == 504 and error_type):
        return BackendTimeout(f"{name} timed out (HTTP {status}): {text}", backend=backend)
    if status >= 500 or status == 409:
        return BackendUnavailable(f"fal answered HTTP {status} during {during}: {text}", backend=backend)
    return InvalidRequest(f"{name} rejected the request (HTTP {status}): {text}", backend=backend)


def _failure_error(text: str, error_type: str, *, model: Model) -> BackendError | None:
    """What a ``COMPLETED`` + error says on its own, or None when only the result's HTTP answer can tell."""
    backend = FalBackend.name
    if _is_moderation(text, error_type):
        return ContentRefused(f"{model.name} refused the picture or the prompt: {text}", backend=backend)
    if error_type == "request_timeout":
        return BackendTimeout(f"{model.name} timed out on fal: {text or error_type}", backend=backend)
    if error_type:
        return BackendUnavailable(f"{model.name} failed on fal ({error_type}): {text}", backend=backend)
    return None


def _transport_error(exc: BaseException, *, during: str) -> BackendError:
    backend = FalBackend.name
    if isinstance(exc, (TimeoutError, httpx.TimeoutException)):
        return BackendUnavailable(f"fal did not answer in time during {during}", backend=backend)
    if isinstance(exc, httpx.TransportError):
        return BackendUnavailable(f"could not reach fal during {during}: {type(exc).__name__}: {exc}", backend=backend)
    return BackendUnavailable(f"fal answered something unexpected during {during}: {type(exc).__name__}: {exc}",
                              backend=backend)


def _client_error(exc: BaseException, *, model: Model | None, during: str) -> BackendError:
    if isinstance(exc, fal_client.FalClientHTTPError):
        return _http_error(exc.status_code, exc.message, exc.response_headers, exc.error_type,
                           model=model, during=during)
    return _transport_error(exc, during=during)


def _response_error(response: httpx.Response, *, model: Model, during: str) -> BackendError:
    try:
        body = response.json()
    except ValueError:
        body = None
    detail = body.get("detail", response.text) if isinstance(body, dict) else response.text
    error_type = body.get("error_type") if isinstance(body, dict) else None
    error_type = error_type or response.headers.get("x-fal-error-type")
    return _http_error(response.status_code, detail, dict(response.headers), error_type, model=model, during=during)


# Errors a call to fal can end with that are fal's doing, not a bug of ours.
_CALL_ERRORS = (fal_client.FalClientError, httpx.HTTPError, TimeoutError, ValueError, KeyError, TypeError)


# -- files -------------------------------------------------------------------------------------------


def _image_data_uri(path: Path) -> str:
    """The picture as a JPEG ``data:`` URI (what fal's image fields accept without an upload)."""
    with Image.open(path) as im:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="JPEG", quality=92)
    return fal_client.encode(buf.getvalue(), "image/jpeg")


def _save_png(src: Path, dest: Path) -> tuple[int, int]:
    """Decode a downloaded picture (JPEG, PNG, WebP…) and write it to ``dest`` as RGB PNG; its size."""
    with Image.open(src) as im:
        im.load()
        rgb = im.convert("RGB")
    rgb.save(dest, format="PNG", compress_level=1)
    return rgb.size


def _still_cost(price: Price, width: int, height: int) -> float:
    """What fal bills for one still: per started megapixel, or per image."""
    if price.per_megapixel:
        return round(price.per_megapixel * math.ceil(width * height / 1_000_000), 4)
    return price.per_image


def _conform(src: Path, dst: Path, width: int, height: int) -> None:
    """Scale ``src`` to cover ``width × height`` and centre-crop to it, written to ``dst``."""
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.part")
    vf = (f"scale={width}:{height}:force_original_aspect_ratio=increase:flags=lanczos,"
          f"crop={width}:{height},setsar=1")
    cmd = [video.ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", "-i", str(src),
           "-map", "0:v:0", "-vf", vf, *video.encoder_args(crf=18), "-f", "mp4", str(tmp)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise video.VideoError(f"ffmpeg could not resize {src.name}: {proc.stderr.strip()[-500:]}")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


# -- the backend -------------------------------------------------------------------------------------


class FalBackend(Backend):
    """fal.ai's queue through ``fal_client``: the models of ``backends/data/fal.toml``, default Kling 2.1 standard."""

    name = "fal"
    description = "image-to-video models on fal.ai (Kling, Wan, Hailuo, Luma Ray, LTX-Video, Stable Video)"
    capabilities = CATALOGUE.capabilities()
    catalogue = CATALOGUE
    image_models = tuple(m.id for m in CATALOGUE.image_models)
    #: Seconds :meth:`imagine` may take in all.
    still_timeout = STILL_TIMEOUT_S

    def __init__(self, settings: Any, *, request_timeout: float = 60.0, server_retries: bool = True) -> None:
        super().__init__(settings)
        self.request_timeout = request_timeout
        self.server_retries = server_retries
        #: Least time between two JWKS refetches caused by a signature no cached key verifies.
        self.jwks_refetch_interval = JWKS_REFETCH_INTERVAL_S
        self._fal: fal_client.AsyncClient | None = None
        self._fal_loop: asyncio.AbstractEventLoop | None = None
        self._jwks: list[Ed25519PublicKey] = []
        self._jwks_fetched = -math.inf
        self._jwks_refetched = -math.inf
        self._jwks_lock: asyncio.Lock | None = None
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()

    @classmethod
    def allowed_durations(cls, model: str | None) -> list[float]:
        """The lengths ``model`` makes when it offers a fixed set (Kling: 5 and 10 s), else ``[]``."""
        entry = CATALOGUE.model(model)
        if entry is None or not entry.makes_video or entry.duration is None:
            return []
        return sorted(entry.duration.values)

    @classmethod
    def end_frame_models(cls) -> list[str]:
        """``fal:<endpoint>`` for each catalogued model that can end on a given frame."""
        return [f"{cls.name}:{m.id}" for m in CATALOGUE.video_models if m.field_for("end_image")]

    @classmethod
    def model_capabilities(cls, model: str | None) -> Capabilities | None:
        """What the model ``model`` (None: the default) can do on its own, or None if it is not catalogued."""
        entry = CATALOGUE.model(model)
        return entry.capabilities() if entry is not None and entry.makes_video else None

    # -- the client ------------------------------------------------------------------------------------

    def _client(self) -> fal_client.AsyncClient:
        """The fal client of this event loop, pointed at ``settings.fal_queue_url`` with its retries off."""
        # fal_client reads these module globals on every call (see the module docstring).
        fal_client_module.QUEUE_URL_FORMAT = str(self.settings.fal_queue_url).rstrip("/") + "/"
        fal_client_module.MAX_ATTEMPTS = 1
        loop = asyncio.get_running_loop()
        if self._fal is None or self._fal_loop is not loop:
            self._fal = fal_client.AsyncClient(key=str(self.settings.fal_key), default_timeout=self.request_timeout)
            self._fal_loop = loop
        return self._fal

    async def _call(self, awaitable: Any, *, model: Model | None, during: str) -> Any:
        try:
            return await asyncio.wait_for(awaitable, self.request_timeout)
        except _CALL_ERRORS as exc:
            raise _client_error(exc, model=model, during=during) from exc

    def _model(self, handle: Handle) -> Model:
        model = CATALOGUE.model(handle.data.get("app"))
        if model is None:
            raise InvalidRequest(f"model {handle.data.get('app')!r} is no longer in fal's catalogue", backend=self.name)
        return model

    async def _handle(self, handle: Handle, model: Model) -> fal_client.AsyncRequestHandle:
        # get_handle rebuilds the URLs from the app id and request id: it works after a restart too.
        return await self._call(self._client().get_handle(model.id, handle.id), model=model, during="resume")

    # -- the protocol -----------------------------------------------------------------------------------

    async def submit(self, request: GenerationRequest) -> Handle:
        """Check the request against its model, then put it in fal's queue; returns at once with fal's id."""
        problems = self.refusals(request)
        if problems:
            raise UnsupportedRequest("; ".join(problems), backend=self.name)
        model = CATALOGUE.model(request.model)
        assert model is not None
        if not self.settings.fal_key:
            raise PermanentBackendError("fal needs an API key: set ANIMABOT_FAL_KEY", backend=self.name)
        if not request.image_path.is_file():
            raise InvalidRequest(f"source image {request.image_path} does not exist", backend=self.name)
        end = request.end_image_path
        try:
            image_uri = await asyncio.to_thread(_image_data_uri, request.image_path)
            end_uri = await asyncio.to_thread(_image_data_uri, end) if end is not None else None
        except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
            raise InvalidRequest(f"cannot read the picture to send: {exc}", backend=self.name) from exc
        arguments, seconds, fps, ignored = model.arguments(request, image_uri, end_uri)
        if ignored:
            log.info("%s does not take the %s; sent without", model.name, ", ".join(ignored))
        headers = {} if self.server_retries else {"x-fal-no-retry": "1"}
        submitted = await self._call(
            self._client().submit(model.id, arguments, webhook_url=request.webhook_url or None, headers=headers),
            model=model, during="submit",
        )
        return Handle(self.name, submitted.request_id, {
            "app": model.id,
            "status_url": submitted.status_url,
            "response_url": submitted.response_url,
            "cancel_url": submitted.cancel_url,
            "output": str(request.output_dir / request.output_name),
            "seconds": seconds,
            "fps": fps,
            "width": request.width,
            "height": request.height,
            "ignored": ignored,
        })

    async def status(self, handle: Handle) -> StatusReport:
        """Ask fal's queue; a failed generation is classified by what fal says about it."""
        model = self._model(handle)
        fal_handle = await self._handle(handle, model)
        try:
            answer = await self._call(fal_handle.status(with_logs=False), model=model, during="status")
        except BackendUnavailable as exc:
            cause = exc.__cause__
            if isinstance(cause, fal_client.FalClientHTTPError) and cause.status_code == 404:
                # fal has forgotten the request: the work is lost, so end the attempt (the job submits again)
                # instead of asking until the generation times out.
                return StatusReport(State.FAILED, message=exc.message, error=exc)
            raise
        if isinstance(answer, fal_client.Queued):
            return StatusReport(State.QUEUED, queue_position=answer.position,
                                message=f"waiting in fal's queue (position {answer.position})")
        if isinstance(answer, fal_client.InProgress):
            return StatusReport(State.RUNNING, message=f"{model.name} is generating")
        assert isinstance(answer, fal_client.Completed)
        if not answer.error:
            return StatusReport(State.SUCCEEDED, progress=1.0)
        text, error_type = str(answer.error), str(answer.error_type or "")
        if _CANCELED.search(text) or _CANCELED.search(error_type):
            return StatusReport(State.CANCELED, message="canceled")
        error = _failure_error(text, error_type, model=model) or await self._failure_from_result(fal_handle, model)
        return StatusReport(State.FAILED, message=error.message, error=error)

    async def _failure_from_result(self, fal_handle: fal_client.AsyncRequestHandle, model: Model) -> BackendError:
        """Why a request failed: fal answers its result with the HTTP error that says so."""
        response = await self._get(fal_handle, model=model, during="status")
        if response.status_code >= 400:
            return _response_error(response, model=model, during="result")
        return BackendUnavailable(f"{model.name} failed on fal without saying why", backend=self.name)

    async def _get(self, fal_handle: fal_client.AsyncRequestHandle, *, model: Model, during: str) -> httpx.Response:
        # Not fal_handle.get(): it polls until COMPLETED first (forever on a hung request) and retries.
        try:
            return await asyncio.wait_for(fal_handle.client.get(fal_handle.response_url), self.request_timeout)
        except (httpx.HTTPError, TimeoutError) as exc:
            raise _transport_error(exc, during=during) from exc

    async def _result_payload(self, handle: Handle, model: Model) -> Any:
        """The JSON of a finished request's result."""
        fal_handle = await self._handle(handle, model)
        response = await self._get(fal_handle, model=model, during="result")
        if response.status_code >= 400:
            raise _response_error(response, model=model, during="result")
        try:
            return response.json()
        except ValueError as exc:
            raise BackendUnavailable(f"fal's result for {model.name} is not JSON", backend=self.name) from exc

    async def result(self, handle: Handle) -> GenerationResult:
        """Fetch the result, download the clip (size-capped, allowed hosts only), fit it to the requested size."""
        model = self._model(handle)
        payload = await self._result_payload(handle, model)
        file = payload.get(model.output) if isinstance(payload, dict) else None
        if not isinstance(file, dict) or not isinstance(file.get("url"), str):
            keys = ", ".join(sorted(payload)) if isinstance(payload, dict) else type(payload).__name__
            raise PermanentBackendError(f"fal's result for {model.name} has no {model.output!r} file (got: {keys})",
                                        backend=self.name)
        cap = int(self.settings.max_output_bytes)
        declared = file.get("file_size")
        if isinstance(declared, int) and declared > cap:
            raise self._too_big(declared, cap)
        out = Path(handle.data["output"])
        out.parent.mkdir(parents=True, exist_ok=True)
        part = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.download")
        width, height = int(handle.data["width"]), int(handle.data["height"])
        try:
            await self._download(file["url"], part, cap)
            try:
                info = await asyncio.to_thread(video.probe, part)
            except video.VideoError as exc:
                kind = file.get("content_type") or "unknown type"
                raise BackendUnavailable(f"{model.name}'s output ({kind}) is not a video: {exc}",
                                         backend=self.name) from exc
            provider_size = (info.width, info.height)
            if provider_size != (width, height) and _close_aspect(provider_size, (width, height)):
                await asyncio.to_thread(_conform, part, out, width, height)
                info = await asyncio.to_thread(video.probe, out)
            else:
                os.replace(part, out)
        finally:
            part.unlink(missing_ok=True)
        seconds = float(handle.data.get("seconds") or info.duration)
        return GenerationResult(
            video_path=out, width=info.width, height=info.height, fps=info.fps, frames=info.frames,
            cost_usd=model.price.usd(seconds),
            metadata={"model": model.id, "request_id": handle.id, "provider_size": list(provider_size),
                      "seconds": seconds, "ignored": handle.data.get("ignored", [])},
        )

    async def imagine(self, request: ImageRequest) -> ImageResult:
        """Paint a still with a text-to-image model of the catalogue, waiting in fal's queue for it."""
        model = CATALOGUE.model(request.model or self.image_models[0])
        if model is None or model.kind != IMAGE_KIND:
            known = ", ".join(m.id for m in CATALOGUE.image_models) or "none"
            raise UnsupportedRequest(f"{request.model!r} is not a text-to-image model of fal's catalogue "
                                     f"(known: {known})", backend=self.name)
        if not self.settings.fal_key:
            raise PermanentBackendError("fal needs an API key: set ANIMABOT_FAL_KEY", backend=self.name)
        arguments: dict[str, Any] = {**dict(model.fixed), model.field_for("prompt"): request.prompt}
        if model.field_for("seed"):
            arguments[model.field_for("seed")] = request.seed
        if model.field_for("negative") and request.negative_prompt:
            arguments[model.field_for("negative")] = request.negative_prompt
        if model.field_for("size"):
            arguments[model.field_for("size")] = {"width": request.width, "height": request.height}
        headers = {} if self.server_retries else {"x-fal-no-retry": "1"}
        submitted = await self._call(self._client().submit(model.id, arguments, headers=headers),
                                     model=model, during="submit")
        handle = Handle(self.name, submitted.request_id, {"app": model.id})
        deadline = time.monotonic() + self.still_timeout
        while (report := await self.status(handle)).state in (State.QUEUED, State.RUNNING):
            if time.monotonic() > deadline:
                with contextlib.suppress(BackendError):
                    await self.cancel(handle)
                raise BackendTimeout(f"{model.name} made no picture in {self.still_timeout:g} s", backend=self.name)
            await asyncio.sleep(STILL_POLL_S)
        if report.state is not State.SUCCEEDED:
            raise report.error or BackendUnavailable(f"{model.name} was {report.state.value}", backend=self.name)
        payload = await self._result_payload(handle, model)
        files = payload.get(model.output) if isinstance(payload, dict) else None
        file = files[0] if isinstance(files, list) and files else files
        if not isinstance(file, dict) or not isinstance(file.get("url"), str):
            raise PermanentBackendError(f"fal's result for {model.name} has no {model.output!r} picture",
                                        backend=self.name)
        cap = int(self.settings.max_output_bytes)
        out = request.output_path
        out.parent.mkdir(parents=True, exist_ok=True)
        part = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.download")
        try:
            await self._download(file["url"], part, cap)
            try:
                width, height = await asyncio.to_thread(_save_png, part, out)
            except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
                kind = file.get("content_type") or "unknown type"
                raise BackendUnavailable(f"{model.name}'s output ({kind}) is not a picture: {exc}",
                                         backend=self.name) from exc
        finally:
            part.unlink(missing_ok=True)
        return ImageResult(image_path=out, width=width, height=height, cost_usd=_still_cost(model.price, width, height),
                           metadata={"model": model.id, "request_id": handle.id})

    async def cancel(self, handle: Handle) -> None:
        """Ask fal to cancel; a request fal no longer has or already finished is fine."""
        model = self._model(handle)
        fal_handle = await self._handle(handle, model)
        try:
            await self._call(fal_handle.cancel(), model=model, during="cancel")
        except (InvalidRequest, BackendUnavailable) as exc:
            cause = exc.__cause__
            if isinstance(cause, fal_client.FalClientHTTPError) and 400 <= cause.status_code < 500:
                return  # ALREADY_COMPLETED / NOT_FOUND: nothing left to cancel
            raise

    async def aclose(self) -> None:
        """Close the fal client's connections."""
        fal, self._fal = self._fal, None
        if fal is not None and "_client" in fal.__dict__ and self._fal_loop is asyncio.get_running_loop():
            client = await fal._client
            await client.aclose()

    # -- downloads -------------------------------------------------------------------------------------

    def _too_big(self, size: int, cap: int) -> PermanentBackendError:
        return PermanentBackendError(f"fal's output is {size / 2**20:.1f} MiB, above the {cap / 2**20:g} MiB cap "
                                     "(ANIMABOT_MAX_OUTPUT_BYTES)", backend=self.name)

    async def _download(self, url: str, dest: Path, cap: int) -> None:
        if url.startswith("data:"):
            await asyncio.to_thread(self._write_data_uri, url, dest, cap)
            return
        hosts = list(self.settings.provider_download_hosts)
        async with httpx.AsyncClient(follow_redirects=False, timeout=httpx.Timeout(self.request_timeout)) as http:
            for _ in range(MAX_REDIRECTS + 1):
                parts = urlsplit(url)
                if parts.scheme not in ("http", "https") or not host_allowed(parts.hostname or "", hosts):
                    raise PermanentBackendError(
                        f"fal's output is at {parts.scheme}://{parts.hostname}, which is not an allowed download "
                        f"host (ANIMABOT_PROVIDER_DOWNLOAD_HOSTS: {', '.join(hosts) or 'none'})", backend=self.name)
                try:
                    async with http.stream("GET", url) as response:
                        if response.is_redirect and "location" in response.headers:
                            url = urljoin(url, response.headers["location"])
                            continue
                        if response.status_code >= 400:
                            raise BackendUnavailable(f"downloading fal's output failed: HTTP {response.status_code}",
                                                     backend=self.name)
                        length = response.headers.get("content-length", "")
                        if length.isdigit() and int(length) > cap:
                            raise self._too_big(int(length), cap)
                        received = 0
                        with dest.open("wb") as out:
                            async for chunk in response.aiter_bytes():
                                received += len(chunk)
                                if received > cap:
                                    raise self._too_big(received, cap)
                                out.write(chunk)
                        return
                except httpx.HTTPError as exc:
                    raise _transport_error(exc, during="download") from exc
        raise BackendUnavailable(f"fal's output redirected more than {MAX_REDIRECTS} times", backend=self.name)

    def _write_data_uri(self, uri: str, dest: Path, cap: int) -> None:
        header, _, data = uri.partition(",")
        if len(data) * 3 // 4 > cap:
            raise self._too_big(len(data) * 3 // 4, cap)
        try:
            raw = base64.b64decode(data, validate=True) if header.endswith(";base64") else data.encode()
        except (binascii.Error, ValueError) as exc:
            raise BackendUnavailable(f"fal's output is a malformed data: URI ({exc})", backend=self.name) from exc
        dest.write_bytes(raw)

    # -- webhooks --------------------------------------------------------------------------------------

    async def verify_webhook(self, headers: Mapping[str, str], body: bytes) -> WebhookNotice:
        """Check fal's Ed25519 signature, the timestamp and replays; say which request it is about.

        ``OK`` gives a notice to poll (``report`` None); ``ERROR`` also carries the failure as a report.
        """
        lowered = {k.lower(): v for k, v in headers.items()}
        names = ("request-id", "user-id", "timestamp", "signature")
        values = [lowered.get(f"x-fal-webhook-{n}", "").strip() for n in names]
        if not all(values):
            missing = ", ".join(f"X-Fal-Webhook-{n.title()}" for n, v in zip(names, values, strict=True) if not v)
            raise WebhookRejected(401, f"unsigned webhook (missing {missing})")
        request_id, user_id, timestamp, signature_hex = values
        try:
            sent_at = int(timestamp)
            signature = bytes.fromhex(signature_hex)
        except ValueError:
            raise WebhookRejected(400, "malformed X-Fal-Webhook-Timestamp or -Signature") from None
        if abs(time.time() - sent_at) > WEBHOOK_TOLERANCE_S:
            raise WebhookRejected(401, f"webhook timestamp {sent_at} is more than {WEBHOOK_TOLERANCE_S}s off")
        message = f"{request_id}\n{user_id}\n{timestamp}\n{hashlib.sha256(body).hexdigest()}".encode()
        if not await self._signed_by_fal(message, signature):
            raise WebhookRejected(401, "bad webhook signature")
        if (request_id, timestamp) in self._seen:
            raise WebhookRejected(409, f"webhook for {request_id} at {timestamp} was already received")
        self._remember(request_id, timestamp, sent_at)
        try:
            payload = json.loads(body)
        except ValueError:
            raise WebhookRejected(400, "webhook body is not JSON") from None
        if not isinstance(payload, dict) or payload.get("request_id", request_id) != request_id:
            raise WebhookRejected(400, "webhook body does not name the signed request")
        if payload.get("status") == "ERROR":
            error = self._webhook_error(payload)
            return WebhookNotice(request_id, StatusReport(State.FAILED, message=error.message, error=error))
        return WebhookNotice(request_id)

    def _webhook_error(self, payload: dict[str, Any]) -> BackendError:
        text = str(payload.get("error") or "the generation failed")
        inner = payload.get("payload")
        detail = inner.get("detail") if isinstance(inner, dict) else None
        status = _STATUS_IN_TEXT.search(text)
        if status:
            return _http_error(int(status.group(1)), detail or text, {}, None, model=None, during="webhook")
        if _is_moderation(text, _detail_text(detail)):
            return ContentRefused(f"fal refused the picture or the prompt: {text}", backend=self.name)
        return BackendUnavailable(f"fal reported a failure: {text}", backend=self.name)

    def _remember(self, request_id: str, timestamp: str, sent_at: int) -> None:
        self._seen[(request_id, timestamp)] = sent_at
        horizon = time.time() - 2 * WEBHOOK_TOLERANCE_S  # older ones are refused as stale anyway
        while self._seen and (len(self._seen) > REPLAY_MEMORY or next(iter(self._seen.values())) < horizon):
            self._seen.popitem(last=False)

    async def _signed_by_fal(self, message: bytes, signature: bytes) -> bool:
        if self._jwks_lock is None:
            self._jwks_lock = asyncio.Lock()
        async with self._jwks_lock:
            now = time.monotonic()
            if not self._jwks or now - self._jwks_fetched > JWKS_TTL_S:
                await self._fetch_jwks()
            if _verify(self._jwks, message, signature):
                return True
            # Keys rotate: refetch once, but a stream of forged calls must not make us hammer fal.
            if now - self._jwks_refetched < self.jwks_refetch_interval:
                return False
            self._jwks_refetched = now
            await self._fetch_jwks()
            return _verify(self._jwks, message, signature)

    async def _fetch_jwks(self) -> None:
        url = str(self.settings.fal_jwks_url)
        try:
            async with httpx.AsyncClient(timeout=httpx.Timeout(10.0)) as http:
                response = await http.get(url)
                response.raise_for_status()
                keys = response.json()["keys"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            raise WebhookRejected(503, f"cannot fetch fal's webhook keys from {url}: {exc}") from exc
        parsed = []
        for key in keys:
            if isinstance(key, dict) and key.get("kty") == "OKP" and key.get("crv") == "Ed25519" and key.get("x"):
                raw = base64.urlsafe_b64decode(key["x"] + "=" * (-len(key["x"]) % 4))
                parsed.append(Ed25519PublicKey.from_public_bytes(raw))
        self._jwks, self._jwks_fetched = parsed, time.monotonic()


def _verify(keys: list[Ed25519PublicKey], message: bytes, signature: bytes) -> bool:
    for key in keys:
        try:
            key.verify(signature, message)
        except InvalidSignature:
            continue
        return True
    return False


def _close_aspect(a: tuple[int, int], b: tuple[int, int]) -> bool:
    ra, rb = a[0] / a[1], b[0] / b[1]
    return abs(ra - rb) / rb <= CONFORM_MAX_ASPECT_ERROR
