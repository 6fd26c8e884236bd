"""A Replicate HTTP API emulator on 127.0.0.1 that the real ``replicate`` client talks to.

One aiohttp app on a free port serves the routes of ``/work/shared/reference/providers.md`` §6 the way
Replicate answers them (as ``replicate`` 1.0.7 expects), with scripted outcomes and fault knobs::

    async with ReplicateEmulator() as emu:
        client = replicate.Client(api_token=emu.token, base_url=emu.base_url)
        emu.script("refuse", "ok")                       # outcomes of the next creates, then "ok"
        p = await client.models.predictions.async_create(model="kwaivgi/kling-v2.1", input={...})
        await emu.wait_until_done(p.id)
        p = await client.predictions.async_get(p.id)     # status "failed", error "... flagged as sensitive ..."

Routes: ``POST /v1/predictions`` (``version``: 64 hex or ``owner/name:hex``), ``POST
/v1/models/{owner}/{name}/predictions`` (official models; answers ``"version": "hidden"``), ``GET
/v1/predictions`` (newest first; ``next`` is a full cursor URL), ``GET /v1/predictions/{id}``, ``POST
/v1/predictions/{id}/cancel``, ``GET /v1/models/{owner}/{name}/versions/{id}``, ``POST /v1/files`` (201,
every ``File`` field), ``GET``/``DELETE /v1/files/{id}``, ``GET /v1/webhooks/default/secret``, and
``GET /delivery/{id}/{name}`` (outputs served over HTTP, unauthenticated, like replicate.delivery).

Test API (synchronous unless marked async):

==================================  ===================================================================
outcomes                            ``script(*outcomes)``: consumed one per create, then ``"ok"``; an
                                    outcome is a name or ``Outcome(name, latency=, start_delay=, error=)``
                                    ``ok``        succeeded with a real H.264 clip of the input image
                                                  (a text-to-image model: a picture, see "stills")
                                    ``frozen``    …a clip whose frames never change
                                    ``flicker``   …a clip whose brightness jumps every frame
                                    ``url``       ``ok``, the clip as ``http://127.0.0.1/delivery/...``
                                    ``array``     ``[clip, garbage]`` even for a one-URI model
                                    ``garbage``   ``data:video/mp4`` of bytes that are no video
                                    ``empty``     ``data:video/mp4;base64,`` (nothing)
                                    ``image``     ``data:image/png`` (a picture, not a video)
                                    ``null``      succeeded, ``output: null``
                                    ``wrong_type`` succeeded, ``output: 12345``
                                    ``empty_array`` succeeded, ``output: []``
                                    ``expired``   succeeded, ``output: null``, ``data_removed: true``
                                    ``fail``      failed, ``error`` = ``fail_error`` (an outage)
                                    ``refuse``    failed, Replicate's E005 "flagged as sensitive" text
                                    ``invalid``   failed, an input the model rejects
                                    ``hang``      processing forever
stills                              text-to-image models (FLUX.1 [schnell]) answer a picture painted
                                    from the prompt and seed (``backends.fake.paint_picture``) at the
                                    shape ``aspect_ratio`` asks, ``still_long_side`` px on its long
                                    side, in ``output_format`` (webp, as the real model's default, jpg
                                    or png); ``url`` serves it from ``/delivery/`` with its image type
timing                              ``start_delay`` (s in ``starting``), ``latency`` (s in
                                    ``processing``); per outcome through ``Outcome``
faults                              ``throttle(retry_after=, times=, header=True, detail=True)``: 429
                                    on creates with an RFC 7807 body ("… available in N seconds"
                                    unless ``detail=False``) and ``Retry-After`` (unless
                                    ``header=False``); ``fail_next(status=, times=, on="create"|"get"|
                                    "cancel"|"files"|"secret"|"list"|"any")``: an error answer, or
                                    ``status=0`` to drop the connection; ``lose_answers = n``: the
                                    next n creates start a prediction, then drop the connection
auth                                ``token`` (``Authorization: Bearer <token>``, else 401)
predictions                         ``predictions`` id → ``EmulatedPrediction`` (``.model``,
                                    ``.input``, ``.webhook``, ``.outcome``), ``prediction_json(id)``,
                                    async ``wait_until_done(id)``
webhooks                            ``webhook_secret`` (``whsec_…``), ``deliveries`` (every POST to a
                                    prediction's ``webhook``: event, headers, body, answer), knobs
                                    ``webhook_retries``, ``duplicate_webhooks`` (the completed event sent
                                    twice with one ``webhook-id``, as a lost answer would make Replicate
                                    do); ``sign(body, webhook_id=, timestamp=, secret=)`` → headers;
                                    ``webhook_for(id, forge=, stale=, webhook_id=, body=)`` → (headers,
                                    body); async ``post_webhook(url, headers, body)``, async
                                    ``replay(delivery)``
log                                 ``calls`` (method, path, status, JSON body, headers), ``creates``,
                                    ``mark()``, ``calls_since(mark)``, ``files``
==================================  ===================================================================

What it enforces: the bearer token; known models and versions (404 / 422 otherwise); each model's
required inputs, enumerated values and integer ranges (422 with ``invalid_fields``), and that image
inputs are ``data:`` URIs or URLs of uploaded files holding a decodable picture; ``Prefer: wait[=n]``
holds the create until the prediction ends or ``n`` (≤ 60) seconds pass and then answers terminal or
``starting``, never ``processing``; cancel ends only a running prediction; webhooks are signed as
Replicate signs them (HMAC-SHA256 over ``id.timestamp.body`` with the ``whsec_`` key) and sent for
``start`` and ``completed`` as ``webhook_events_filter`` asks (default: both), retried on a non-2xx answer.

What it does NOT cover: ``output`` and ``logs`` webhook events; streaming (``stream=true``/SSE);
deployments and trainings; the 1-hour removal of inputs and outputs (only the ``expired`` outcome); official models run
by ``version`` through ``POST /v1/predictions``; billing and ``metrics`` beyond ``predict_time``;
real clip lengths, sizes and frame rates (every clip is ``clip_size`` at ``clip_fps`` for
``clip_seconds``, whatever was asked); HTTPS (outputs are ``data:`` URIs, which is what makes the client
wrap them in ``FileOutput``; ``http://`` delivery URLs stay plain strings); rate limits other than the
scripted 429s; real models' full schemas (only the fields the catalogue uses are checked); account,
hardware, collections and model-listing routes; ``Cancel-After``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import io
import itertools
import json
import os
import re
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import cv2
import numpy as np
from aiohttp import web
from PIL import Image

from backends import animator, video
from backends.base import CameraMove
from backends.fake import _defective_frame, paint_picture

from .server import LocalServer, cancel_tasks

__all__ = ["EmulatedModel", "EmulatedPrediction", "Outcome", "ReplicateEmulator", "WebhookDelivery"]

OUTCOMES = frozenset({
    "ok", "frozen", "flicker", "url", "array", "garbage", "empty", "image", "null", "wrong_type",
    "empty_array", "expired", "fail", "refuse", "invalid", "hang",
})
REFUSAL_ERROR = "The input or output was flagged as sensitive. Please try again with different inputs. (E005)"
INVALID_ERROR = "Invalid input: the image is too small; the short side must be at least 300 pixels"
_CLIPS: dict[tuple[Any, ...], bytes] = {}
_ASPECTS = ("16:9", "9:16", "1:1", "4:3", "3:4", "21:9", "9:21")


@dataclass(frozen=True)
class EmulatedModel:
    """What the emulator knows of one model: how it is run, what it checks, what it returns."""

    id: str
    official: bool
    version: str
    kind: str = "video"
    output: str = "uri"
    images: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    enums: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    ranges: dict[str, tuple[int, int]] = field(default_factory=dict)


MODELS = {m.id: m for m in [
    EmulatedModel(
        "kwaivgi/kling-v2.1", True, "7e4ce1ad" + "0" * 56, images=("start_image", "end_image"),
        required=("start_image", "prompt"), enums={"duration": (5, 10), "mode": ("standard", "pro")},
    ),
    EmulatedModel(
        "wan-video/wan-2.2-i2v-a14b", True, "a5e1b2c3" + "0" * 56, images=("image",),
        required=("image", "prompt"), enums={"resolution": ("480p", "720p")},
        ranges={"num_frames": (81, 121), "frames_per_second": (5, 24), "seed": (0, 2**31 - 1)},
    ),
    EmulatedModel(
        "minimax/hailuo-02", True, "b0a1c2d3" + "0" * 56, images=("first_frame_image",),
        required=("prompt",), enums={"duration": (6, 10), "resolution": ("512p", "768p", "1080p")},
    ),
    EmulatedModel(
        "luma/ray-flash-2-540p", True, "c1d2e3f4" + "0" * 56, images=("start_image", "end_image"),
        required=("prompt",), enums={"duration": (5, 9), "aspect_ratio": _ASPECTS, "loop": (True, False)},
    ),
    EmulatedModel(
        "stability-ai/stable-video-diffusion", False,
        "3f0457e4619daac51203dedb472816fd4af51f3149fa7a9e0b5ffcf1b8172438", images=("input_image",),
        required=("input_image",),
        enums={"video_length": ("14_frames_with_svd", "25_frames_with_svd_xt"),
               "sizing_strategy": ("maintain_aspect_ratio", "crop_to_16_9", "use_image_dimensions")},
        ranges={"frames_per_second": (5, 30), "motion_bucket_id": (1, 255), "seed": (0, 2**31 - 1)},
    ),
    EmulatedModel(
        "lightricks/ltx-video", False, "8c47da666861d081eeb4d1261853087de23923a268a69b63febdf5dc1dee08e4",
        output="array", images=("image",), required=("prompt",),
        enums={"length": (97, 129, 161, 193, 225, 257), "aspect_ratio": _ASPECTS},
        ranges={"steps": (1, 100), "seed": (0, 2**31 - 1)},
    ),
    EmulatedModel(
        "black-forest-labs/flux-schnell", True, "d3e4f5a6" + "0" * 56, kind="image", output="array",
        required=("prompt",), ranges={"num_outputs": (1, 4), "seed": (0, 2**32 - 1)},
        enums={"aspect_ratio": (*_ASPECTS, "2:3", "3:2", "4:5", "5:4"), "output_format": ("webp", "jpg", "png")},
    ),
    EmulatedModel(
        "nightmareai/real-esrgan", False, "f121d640bd286e1fdc67f9799164c1d5be36ff74576ee11c803ae5b665dd46aa",
        kind="upscale", images=("image",), required=("image",),
    ),
]}


@dataclass(frozen=True)
class Outcome:
    """How one prediction ends (``name``), after how long, and with which error text."""

    name: str = "ok"
    latency: float | None = None
    start_delay: float | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        if self.name not in OUTCOMES:
            raise ValueError(f"unknown outcome {self.name!r}; use one of {sorted(OUTCOMES)}")


@dataclass
class EmulatedPrediction:
    """One prediction as the emulator holds it."""

    id: str
    model: EmulatedModel
    input: dict[str, Any]
    outcome: Outcome
    start_delay: float
    latency: float
    created: float
    created_wall: float = 0.0
    webhook: str | None = None
    events: frozenset[str] = frozenset({"start", "output", "logs", "completed"})
    canceled_at: float | None = None
    output: Any = None
    rendered: bool = False
    source_image: bytes | None = None
    still: tuple[bytes, str] | None = None  # a text-to-image model's picture and its MIME type

    def status(self, now: float) -> str:
        """``starting``, ``processing`` or the terminal status at monotonic time ``now``."""
        if self.canceled_at is not None:
            return "canceled"
        age = now - self.created
        if age < self.start_delay:
            return "starting"
        if self.outcome.name == "hang" or age < self.start_delay + self.latency:
            return "processing"
        return {"fail": "failed", "refuse": "failed", "invalid": "failed"}.get(self.outcome.name, "succeeded")

    @property
    def finished_at(self) -> float:
        """Monotonic time it ends (or ended) unless canceled first."""
        return self.created + self.start_delay + self.latency


@dataclass
class Call:
    """One HTTP request the emulator answered."""

    method: str
    path: str
    status: int
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class WebhookDelivery:
    """One POST of a webhook to a prediction's ``webhook`` URL."""

    prediction_id: str
    event: str
    url: str
    headers: dict[str, str]
    body: bytes
    status: int | None  # None: the connection failed


@dataclass
class _Fault:
    on: str
    status: int
    times: int
    retry_after: float | None = None
    header: bool = True
    detail: bool = True


class _Answer(Exception):
    def __init__(self, response: web.StreamResponse) -> None:
        self.response = response


def _problem(status: int, title: str, detail: str, **extra: Any) -> _Answer:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    return _Answer(web.json_response(body, status=status, content_type="application/problem+json"))


def _iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat().replace("+00:00", "Z")


def _new_id() -> str:
    return base64.b32encode(os.urandom(20)).decode().lower()[:26]


class ReplicateEmulator(LocalServer):
    """Replicate's HTTP API on 127.0.0.1; see the module docstring for the test API.

    ``ReplicateEmulator(token="r8_test")`` then ``async with emu:`` (or ``await emu.start()`` /
    ``await emu.stop()``). Knobs are plain attributes, settable at any time. Point the client's
    ``base_url`` at ``emu.base_url``.
    """

    def __init__(
        self,
        *,
        token: str = "r8_emulator_token",
        start_delay: float = 0.05,
        latency: float = 0.2,
        clip_size: tuple[int, int] = (256, 144),
        clip_seconds: float = 1.0,
        clip_fps: int = 24,
    ) -> None:
        super().__init__()
        self.token = token
        self.start_delay = start_delay
        self.latency = latency
        self.clip_size = clip_size
        self.clip_seconds = clip_seconds
        self.clip_fps = clip_fps
        self.still_long_side = 512
        self.fail_error = "CUDA out of memory. Tried to allocate 2.00 GiB"
        self.webhook_secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
        self.webhook_retries = 2
        self.webhook_retry_delay = 0.05
        self.duplicate_webhooks = False
        self.list_page_size = 100
        self.predictions: dict[str, EmulatedPrediction] = {}
        self.files: dict[str, dict[str, Any]] = {}
        self.calls: list[Call] = []
        self.deliveries: list[WebhookDelivery] = []
        self._script: deque[Outcome] = deque()
        self._faults: list[_Fault] = []
        #: The next this many creates start their prediction and then drop the connection unanswered.
        self.lose_answers = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    def _make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _on_start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))

    async def _on_stop(self) -> None:
        """Stop sending webhooks."""
        await cancel_tasks(*self._tasks)
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- knobs -------------------------------------------------------------------------------------

    def script(self, *outcomes: str | Outcome) -> None:
        """Queue how the next predictions end, one per create (``"ok"`` once the queue is empty)."""
        self._script.extend(o if isinstance(o, Outcome) else Outcome(o) for o in outcomes)

    def throttle(self, *, retry_after: float = 7.0, times: int = 1, header: bool = True, detail: bool = True) -> None:
        """Answer the next ``times`` creates with 429.

        The answer carries ``Retry-After`` unless ``header=False``, and says "Expected available in N
        seconds" in its ``detail`` unless ``detail=False``.
        """
        self._faults.append(_Fault("create", 429, times, retry_after, header, detail))

    def fail_next(self, *, status: int = 503, times: int = 1, on: str = "create") -> None:
        """Answer the next ``times`` matching requests with ``status`` (0: drop the connection)."""
        if on not in ("create", "get", "cancel", "files", "secret", "list", "any"):
            raise ValueError(f"unknown route kind {on!r}")
        self._faults.append(_Fault(on, status, times))

    # -- log ---------------------------------------------------------------------------------------

    @property
    def creates(self) -> list[Call]:
        """Every prediction create the emulator received (answered or refused)."""
        return [c for c in self.calls if c.method == "POST" and c.path.endswith("/predictions")]

    def mark(self) -> int:
        """A position in ``calls``, for :meth:`calls_since`."""
        return len(self.calls)

    def calls_since(self, mark: int) -> list[Call]:
        """The calls after ``mark``."""
        return self.calls[mark:]

    def prediction_json(self, prediction_id: str) -> dict[str, Any]:
        """The prediction as ``GET /v1/predictions/{id}`` shows it now (outputs rendered lazily: async)."""
        return self._json(self.predictions[prediction_id])

    async def wait_until_done(self, prediction_id: str, timeout: float = 10.0) -> str:
        """Wait until the prediction is terminal; its status."""
        p = self.predictions[prediction_id]
        deadline = time.monotonic() + timeout
        while (status := p.status(time.monotonic())) in ("starting", "processing"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"prediction {prediction_id} still {status} after {timeout} s")
            await asyncio.sleep(0.01)
        return status

    # -- webhook helpers ---------------------------------------------------------------------------

    def sign(
        self, body: bytes, *, webhook_id: str | None = None, timestamp: int | None = None, secret: str | None = None
    ) -> dict[str, str]:
        """The ``webhook-*`` headers Replicate would send with ``body``."""
        webhook_id = webhook_id or "msg_" + _new_id()
        timestamp = int(time.time()) if timestamp is None else timestamp
        key = base64.b64decode((secret or self.webhook_secret).split("_", 1)[1])
        digest = hmac.new(key, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
        return {
            "webhook-id": webhook_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": "v1," + base64.b64encode(digest).decode(),
            "content-type": "application/json",
        }

    def webhook_for(
        self,
        prediction_id: str,
        *,
        forge: bool = False,
        stale: bool = False,
        webhook_id: str | None = None,
        body: bytes | None = None,
    ) -> tuple[dict[str, str], bytes]:
        """A webhook about the prediction's current state: ``(headers, body)``.

        ``forge`` signs with another secret, ``stale`` dates it 10 minutes back, ``body`` replaces the
        prediction JSON (still signed correctly unless ``forge``).
        """
        raw = body if body is not None else json.dumps(self.prediction_json(prediction_id)).encode()
        secret = "whsec_" + base64.b64encode(os.urandom(32)).decode() if forge else None
        timestamp = int(time.time()) - 600 if stale else None
        return self.sign(raw, webhook_id=webhook_id, timestamp=timestamp, secret=secret), raw

    async def post_webhook(self, url: str, headers: dict[str, str], body: bytes) -> int:
        """POST a webhook as Replicate would; the receiver's HTTP status."""
        assert self._session is not None, "the emulator is not started"
        async with self._session.post(url, data=body, headers=headers) as response:
            await response.read()
            return response.status

    async def replay(self, delivery: WebhookDelivery) -> int:
        """POST a recorded delivery again, byte for byte (a replay attack); the receiver's status."""
        return await self.post_webhook(delivery.url, delivery.headers, delivery.body)

    # -- dispatch ----------------------------------------------------------------------------------

    _ROUTES: tuple[tuple[str, re.Pattern[str], str, str], ...] = (
        ("POST", re.compile(r"^/v1/predictions$"), "_create_version", "create"),
        ("POST", re.compile(r"^/v1/models/(?P<owner>[^/]+)/(?P<name>[^/]+)/predictions$"), "_create_model", "create"),
        ("POST", re.compile(r"^/v1/deployments/[^/]+/[^/]+/predictions$"), "_no_deployments", "create"),
        ("GET", re.compile(r"^/v1/predictions$"), "_list", "list"),
        ("GET", re.compile(r"^/v1/predictions/(?P<id>[^/]+)$"), "_get", "get"),
        ("POST", re.compile(r"^/v1/predictions/(?P<id>[^/]+)/cancel$"), "_cancel", "cancel"),
        ("GET", re.compile(r"^/v1/models/(?P<owner>[^/]+)/(?P<name>[^/]+)/versions/(?P<version>[^/]+)$"),
         "_version", "get"),
        ("POST", re.compile(r"^/v1/files$"), "_file_create", "files"),
        ("GET", re.compile(r"^/v1/files/(?P<id>[^/]+)$"), "_file_get", "files"),
        ("GET", re.compile(r"^/v1/files/(?P<id>[^/]+)/download$"), "_file_download", "files"),
        ("DELETE", re.compile(r"^/v1/files/(?P<id>[^/]+)$"), "_file_delete", "files"),
        ("GET", re.compile(r"^/v1/webhooks/default/secret$"), "_secret", "secret"),
    )

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        call = Call(request.method, request.path, 0, headers=dict(request.headers))
        self.calls.append(call)
        try:
            response = await self._dispatch(request, call)
        except _Answer as answer:
            response = answer.response
        call.status = response.status
        return response

    async def _dispatch(self, request: web.Request, call: Call) -> web.StreamResponse:
        if request.method == "GET" and request.path.startswith("/delivery/"):
            return await self._delivery(request)
        found = next(
            ((m, handler, kind) for method, pattern, handler, kind in self._ROUTES
             if method == request.method and (m := pattern.match(request.path))),
            None,
        )
        if found is None:
            raise _problem(404, "Not found", "The requested resource could not be found.")
        match, handler, kind = found
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            raise _problem(401, "Unauthenticated", "You did not pass a valid authentication token")
        if request.content_type == "application/json" and request.can_read_body:
            try:
                call.json = await request.json()
            except ValueError:
                raise _problem(400, "Bad request", "The request body is not valid JSON") from None
        self._inject_fault(request, kind)
        return await getattr(self, handler)(request, call, **match.groupdict())

    def _inject_fault(self, request: web.Request, kind: str) -> None:
        for fault in self._faults:
            if fault.times > 0 and fault.on in (kind, "any"):
                fault.times -= 1
                if fault.status == 0:
                    assert request.transport is not None
                    request.transport.abort()
                    raise _Answer(web.Response(status=499))
                if fault.status == 429:
                    detail = "Request was throttled." + (
                        f" Expected available in {fault.retry_after:g} seconds." if fault.detail else "")
                    answer = _problem(429, "Request was throttled", detail)
                    if fault.header:
                        answer.response.headers["Retry-After"] = f"{fault.retry_after:g}"
                    raise answer
                raise _problem(fault.status, "Server error", f"Internal server error ({fault.status})")
        self._faults = [f for f in self._faults if f.times > 0]

    # -- predictions -------------------------------------------------------------------------------

    async def _create_version(self, request: web.Request, call: Call) -> web.StreamResponse:
        body = self._body(call)
        ref = str(body.get("version") or "")
        version = ref.rsplit(":", 1)[-1]
        model = next((m for m in MODELS.values() if m.version == version and not m.official), None)
        if model is None or (":" in ref and ref.split(":", 1)[0] != model.id):
            raise _problem(422, "Invalid version", "Invalid version or not permitted", invalid_fields=[
                {"type": "invalid", "field": "version", "description": "Invalid version or not permitted"}])
        return await self._create(request, model, body)

    async def _create_model(self, request: web.Request, call: Call, owner: str, name: str) -> web.StreamResponse:
        model = MODELS.get(f"{owner}/{name}")
        if model is None:
            raise _problem(404, "Not found", "The requested resource could not be found.")
        if not model.official:
            raise _problem(422, "Invalid request", f"{model.id} is not an official model: create with a version")
        return await self._create(request, model, self._body(call))

    async def _no_deployments(self, request: web.Request, call: Call) -> web.StreamResponse:
        raise _problem(404, "Not found", "Deployments are not emulated.")

    def _body(self, call: Call) -> dict[str, Any]:
        if not isinstance(call.json, dict):
            raise _problem(400, "Bad request", "The request body must be a JSON object")
        return call.json

    async def _create(self, request: web.Request, model: EmulatedModel, body: dict[str, Any]) -> web.StreamResponse:
        inp = body.get("input")
        if not isinstance(inp, dict):
            raise _problem(422, "Input validation failed", "- input: input is required")
        source = await self._validate(model, inp)
        webhook = body.get("webhook")
        events = body.get("webhook_events_filter")
        if webhook is not None and not (isinstance(webhook, str) and webhook.startswith(("http://", "https://"))):
            raise _problem(422, "Invalid webhook", "webhook must be an HTTP(S) URL")
        if events is not None and not (isinstance(events, list) and set(events) <= {"start", "output", "logs",
                                                                                     "completed"}):
            raise _problem(422, "Invalid webhook_events_filter", "events must be start, output, logs, completed")
        outcome = self._script.popleft() if self._script else Outcome()
        p = EmulatedPrediction(
            id=_new_id(), model=model, input=inp, outcome=outcome,
            start_delay=self.start_delay if outcome.start_delay is None else outcome.start_delay,
            latency=self.latency if outcome.latency is None else outcome.latency,
            created=time.monotonic(), created_wall=time.time(), webhook=webhook, source_image=source,
        )
        if events is not None:
            p.events = frozenset(events)
        self.predictions[p.id] = p
        if webhook:
            self._spawn(self._send_webhooks(p))
        if self.lose_answers > 0:  # created and running, but the client never hears of it
            self.lose_answers -= 1
            assert request.transport is not None
            request.transport.abort()
            raise _Answer(web.Response(status=499))
        wait = _prefer_wait(request.headers.get("Prefer", ""))
        if wait:
            deadline = time.monotonic() + wait
            while p.status(time.monotonic()) in ("starting", "processing") and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        data = await self._rendered_json(p)
        if data["status"] == "processing":  # the API answers starting when the wait runs out
            data["status"] = "starting"
        return web.json_response(data, status=201)

    async def _validate(self, model: EmulatedModel, inp: dict[str, Any]) -> bytes | None:
        problems: list[dict[str, str]] = []
        for name in model.required:
            if inp.get(name) in (None, ""):
                problems.append({"type": "required", "field": name, "description": f"{name} is required"})
        for name, allowed in model.enums.items():
            if name in inp and inp[name] not in allowed:
                choices = ", ".join(json.dumps(a) for a in allowed)
                problems.append({"type": "enum", "field": name,
                                 "description": f"{name} must be one of the following: {choices}"})
        for name, (lo, hi) in model.ranges.items():
            value = inp.get(name)
            if name in inp and (not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi):
                problems.append({"type": "range", "field": name,
                                 "description": f"{name} must be an integer from {lo} to {hi}"})
        source: bytes | None = None
        for name in model.images:
            if name not in inp:
                continue
            image = self._image_bytes(inp[name])
            if image is None:
                problems.append({"type": "format", "field": name,
                                 "description": f"{name} must be a data: URI or the URL of an uploaded file"})
                continue
            try:
                with Image.open(io.BytesIO(image)) as im:
                    im.verify()
            except Exception:
                problems.append({"type": "format", "field": name, "description": f"{name} is not an image"})
                continue
            source = source or image
        if problems:
            detail = "\n".join(f"- input.{p['field']}: {p['description']}" for p in problems)
            raise _problem(422, "Input validation failed", detail, invalid_fields=problems)
        return source

    def _image_bytes(self, value: Any) -> bytes | None:
        if not isinstance(value, str):
            return None
        if value.startswith("data:"):
            header, _, payload = value.partition(",")
            try:
                return base64.b64decode(payload) if header.endswith(";base64") else payload.encode()
            except ValueError:
                return None
        match = re.match(rf"^{re.escape(self.base_url)}/v1/files/([^/]+)(/download)?$", value)
        if match and match.group(1) in self.files:
            return self.files[match.group(1)]["content"]
        return None

    async def _get(self, request: web.Request, call: Call, id: str) -> web.StreamResponse:
        p = self.predictions.get(id)
        if p is None:
            raise _problem(404, "Not found", "The requested resource could not be found.")
        return web.json_response(await self._rendered_json(p))

    async def _cancel(self, request: web.Request, call: Call, id: str) -> web.StreamResponse:
        p = self.predictions.get(id)
        if p is None:
            raise _problem(404, "Not found", "The requested resource could not be found.")
        if p.status(time.monotonic()) in ("starting", "processing"):
            p.canceled_at = time.monotonic()
        return web.json_response(await self._rendered_json(p))

    async def _list(self, request: web.Request, call: Call) -> web.StreamResponse:
        ordered = sorted(self.predictions.values(), key=lambda p: p.created, reverse=True)
        cursor = parse_qs(urlsplit(str(request.url)).query).get("cursor", ["0"])[0]
        start = int(cursor) if cursor.isdigit() else 0
        page = ordered[start:start + self.list_page_size]
        more = start + self.list_page_size < len(ordered)
        url = f"{self.base_url}/v1/predictions"
        return web.json_response({
            "previous": f"{url}?cursor={max(0, start - self.list_page_size)}" if start else None,
            "next": f"{url}?cursor={start + self.list_page_size}" if more else None,
            "results": [self._json(p, brief=True) for p in page],
        })

    async def _version(
        self, request: web.Request, call: Call, owner: str, name: str, version: str
    ) -> web.StreamResponse:
        model = MODELS.get(f"{owner}/{name}")
        if model is None or model.version != version:
            raise _problem(404, "Not found", "The requested resource could not be found.")
        schema = {"components": {"schemas": {"Input": {"type": "object", "required": list(model.required)}}}}
        return web.json_response({"id": version, "created_at": _iso(time.time() - 86400),
                                  "cog_version": "0.9.4", "openapi_schema": schema})

    # -- files -------------------------------------------------------------------------------------

    async def _file_create(self, request: web.Request, call: Call) -> web.StreamResponse:
        reader = await request.multipart()
        content, name, kind, metadata = None, "file", "application/octet-stream", {}
        async for part in reader:
            if not isinstance(part, aiohttp.BodyPartReader):
                continue
            if part.name == "content":
                content = await part.read(decode=False)
                name = part.filename or name
                kind = part.headers.get("Content-Type", kind)
            elif part.name == "metadata":
                with contextlib.suppress(ValueError):
                    metadata = json.loads(await part.text())
        if content is None:
            raise _problem(422, "Invalid file", "the multipart field 'content' is required")
        file_id = _new_id()
        now = time.time()
        record = {
            "id": file_id, "name": name, "content_type": kind, "size": len(content),
            "etag": hashlib.md5(content).hexdigest(),
            "checksums": {"sha256": hashlib.sha256(content).hexdigest(), "md5": hashlib.md5(content).hexdigest()},
            "metadata": metadata, "created_at": _iso(now), "expires_at": _iso(now + 86400),
            "urls": {"get": f"{self.base_url}/v1/files/{file_id}"},
        }
        self.files[file_id] = {**record, "content": bytes(content)}
        return web.json_response(record, status=201)

    def _file(self, file_id: str) -> dict[str, Any]:
        if file_id not in self.files:
            raise _problem(404, "Not found", "The requested resource could not be found.")
        return self.files[file_id]

    async def _file_get(self, request: web.Request, call: Call, id: str) -> web.StreamResponse:
        return web.json_response({k: v for k, v in self._file(id).items() if k != "content"})

    async def _file_download(self, request: web.Request, call: Call, id: str) -> web.StreamResponse:
        record = self._file(id)
        return web.Response(body=record["content"], content_type=record["content_type"])

    async def _file_delete(self, request: web.Request, call: Call, id: str) -> web.StreamResponse:
        self._file(id)
        del self.files[id]
        return web.Response(status=204)

    async def _secret(self, request: web.Request, call: Call) -> web.StreamResponse:
        return web.json_response({"key": self.webhook_secret})

    async def _delivery(self, request: web.Request) -> web.StreamResponse:
        parts = request.path.split("/")
        p = self.predictions.get(parts[2]) if len(parts) >= 4 else None
        if p is None or not p.rendered:
            raise _problem(404, "Not found", "No such file.")
        if p.still is not None:
            return web.Response(body=p.still[0], content_type=p.still[1])
        clip = await self._clip(p, "ok")
        return web.Response(body=clip, content_type="video/mp4")

    # -- prediction JSON and outputs ---------------------------------------------------------------

    def _json(self, p: EmulatedPrediction, *, brief: bool = False) -> dict[str, Any]:
        now = time.monotonic()
        status = p.status(now)
        wall = p.created_wall
        terminal = status not in ("starting", "processing")
        ended = p.canceled_at if p.canceled_at is not None else p.finished_at
        data: dict[str, Any] = {
            "id": p.id,
            "model": p.model.id,
            "version": "hidden" if p.model.official else p.model.version,
            "input": {k: v for k, v in p.input.items()},
            "logs": self._logs(p, now, status),
            "output": p.output if status == "succeeded" else None,
            "data_removed": status == "succeeded" and p.outcome.name == "expired",
            "error": None,
            "status": status,
            "source": "api",
            "created_at": _iso(wall),
            "started_at": _iso(wall + p.start_delay) if status != "starting" else None,
            "completed_at": _iso(wall + (ended - p.created)) if terminal else None,
            "urls": {
                "get": f"{self.base_url}/v1/predictions/{p.id}",
                "cancel": f"{self.base_url}/v1/predictions/{p.id}/cancel",
                "web": f"https://replicate.com/p/{p.id}",
            },
        }
        if status == "failed":
            data["error"] = p.outcome.error or {
                "fail": self.fail_error, "refuse": REFUSAL_ERROR, "invalid": INVALID_ERROR,
            }[p.outcome.name]
        if terminal:
            data["metrics"] = {"predict_time": round(max(0.0, ended - p.created - p.start_delay), 3)}
        if brief:
            for key in ("input", "logs", "output", "error"):
                data.pop(key)
        return data

    def _logs(self, p: EmulatedPrediction, now: float, status: str) -> str:
        if status == "starting":
            return ""
        done = 1.0 if status != "processing" else (
            0.5 if p.outcome.name == "hang" else min(0.99, (now - p.created - p.start_delay) / max(p.latency, 1e-9)))
        steps = 20
        current = int(done * steps)
        bar = "█" * (current // 2) + " " * (steps // 2 - current // 2)
        return f"Loading pipeline...\nGenerating video\n{int(done * 100):3d}%|{bar}| {current}/{steps} [00:01<00:01]"

    async def _rendered_json(self, p: EmulatedPrediction) -> dict[str, Any]:
        if p.status(time.monotonic()) == "succeeded" and not p.rendered:
            p.output = await self._output(p)
            p.rendered = True
        return self._json(p)

    async def _output(self, p: EmulatedPrediction) -> Any:
        name = p.outcome.name
        if name in ("null", "expired"):
            return None
        if name == "wrong_type":
            return 12345
        if name == "empty_array":
            return []
        if name == "garbage":
            return "data:video/mp4;base64," + base64.b64encode(b"\x00not a video\x00" * 100).decode()
        if name == "empty":
            return "data:video/mp4;base64,"
        if name == "image":
            buf = io.BytesIO()
            Image.new("RGB", (64, 36), (200, 30, 30)).save(buf, "PNG")
            return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        if p.model.kind == "image":
            data, kind, ext = await asyncio.to_thread(self._paint, p)
            p.still = (data, kind)
            if name == "url":
                still = f"{self.base_url}/delivery/{p.id}/output.{ext}"
            else:
                still = f"data:{kind};base64," + base64.b64encode(data).decode()
            return [still] if p.model.output == "array" else still
        if p.model.kind != "video":
            buf = io.BytesIO()
            Image.new("RGB", (256, 256), (30, 120, 200)).save(buf, "PNG")
            still = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
            return [still] if p.model.output == "array" else still
        clip = await self._clip(p, name if name in ("frozen", "flicker") else "ok")
        if name == "url":
            uri: str = f"{self.base_url}/delivery/{p.id}/output.mp4"
        else:
            uri = "data:video/mp4;base64," + base64.b64encode(clip).decode()
        if name == "array":
            garbage = "data:video/mp4;base64," + base64.b64encode(b"garbage").decode()
            return [uri, garbage]
        return [uri] if p.model.output == "array" else uri

    def _paint(self, p: EmulatedPrediction) -> tuple[bytes, str, str]:
        """A text-to-image prediction's picture: ``(bytes, MIME type, extension)``."""
        w, h = (int(x) for x in str(p.input.get("aspect_ratio", "1:1")).split(":"))
        side = self.still_long_side
        width, height = (side, side * h / w) if w >= h else (side * w / h, side)
        width, height = max(16, round(width / 16) * 16), max(16, round(height / 16) * 16)
        pixels = paint_picture(str(p.input.get("prompt", "")), int(p.input.get("seed") or 0), width, height)
        fmt = str(p.input.get("output_format", "webp"))
        pil, kind = {"webp": ("WEBP", "image/webp"), "jpg": ("JPEG", "image/jpeg"), "png": ("PNG", "image/png")}[fmt]
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, pil, quality=90)
        return buf.getvalue(), kind, fmt

    async def _clip(self, p: EmulatedPrediction, kind: str) -> bytes:
        source = p.source_image or b""
        key = (kind, hashlib.sha256(source).hexdigest(), self.clip_size, self.clip_seconds, self.clip_fps)
        if key not in _CLIPS:  # shared by every emulator of the process: tests render each clip once
            _CLIPS[key] = await asyncio.to_thread(self._render, kind, source)
        return _CLIPS[key]

    def _render(self, kind: str, source: bytes) -> bytes:
        w, h = self.clip_size
        if source:
            with Image.open(io.BytesIO(source)) as im:
                pixels = np.asarray(im.convert("RGB"))
        else:
            ys, xs = np.mgrid[0:h, 0:w]
            pixels = np.dstack([xs * 255 // w, ys * 255 // h, np.full_like(xs, 128)]).astype(np.uint8)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "clip.mp4"
            n = max(2, round(self.clip_seconds * self.clip_fps))
            if kind == "ok":
                animator.render(pixels, out, camera=CameraMove.ZOOM_IN, motion=2, duration=n / self.clip_fps,
                                fps=self.clip_fps, width=w, height=h)
            else:
                base = _cover(pixels, w, h)
                with video.VideoWriter(out, width=w, height=h, fps=self.clip_fps) as writer:
                    for i in range(n):
                        writer.write(_defective_frame(base, kind, i, n))
            return out.read_bytes()

    # -- webhooks ----------------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_webhooks(self, p: EmulatedPrediction) -> None:
        assert p.webhook is not None
        if "start" in p.events:
            await self._deliver(p, "start", json.dumps(self._json(p)).encode())
        while p.status(time.monotonic()) in ("starting", "processing"):
            await asyncio.sleep(0.01)
        if "completed" in p.events:
            body = json.dumps(await self._rendered_json(p)).encode()
            webhook_id = await self._deliver(p, "completed", body)
            if self.duplicate_webhooks:
                await self._deliver(p, "completed", body, webhook_id=webhook_id)

    async def _deliver(self, p: EmulatedPrediction, event: str, body: bytes, *, webhook_id: str | None = None) -> str:
        """POST one event, retrying on failure with the same ``webhook-id``; the id used."""
        webhook_id = webhook_id or "msg_" + _new_id()
        assert p.webhook is not None
        for attempt in itertools.count():
            headers = self.sign(body, webhook_id=webhook_id)
            status: int | None
            try:
                status = await self.post_webhook(p.webhook, headers, body)
            except (TimeoutError, aiohttp.ClientError):
                status = None
            self.deliveries.append(WebhookDelivery(p.id, event, p.webhook, headers, body, status))
            if (status is not None and 200 <= status < 300) or attempt >= self.webhook_retries:
                return webhook_id
            await asyncio.sleep(self.webhook_retry_delay)
        raise AssertionError("unreachable")


def _prefer_wait(header: str) -> float:
    """Seconds a ``Prefer: wait[=n]`` header asks to hold the create (0 without one)."""
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        if key.strip().lower() == "wait":
            try:
                return float(min(max(int(value), 1), 60)) if value else 60.0
            except ValueError:
                return 60.0
    return 0.0


def _cover(pixels: np.ndarray, w: int, h: int) -> np.ndarray:
    """``pixels`` scaled and centre-cropped to exactly ``w × h``."""
    ph, pw = pixels.shape[:2]
    scale = max(w / pw, h / ph)
    resized = cv2.resize(pixels, (max(w, round(pw * scale)), max(h, round(ph * scale))), interpolation=cv2.INTER_AREA)
    y, x = (resized.shape[0] - h) // 2, (resized.shape[1] - w) // 2
    return np.ascontiguousarray(resized[y:y + h, x:x + w])

