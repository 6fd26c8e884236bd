r"""A fal.ai queue emulator on 127.0.0.1 that the real ``fal_client`` submits to, polls and cancels.

One aiohttp app on a free port serves fal's queue API as ``fal-client`` 1.0.3 speaks it (see
``/work/shared/reference/providers.md`` §2 and §6), the JWKS fal signs its webhooks with, and a small file host
for outputs. The test plays fal's models::

    async with FalEmulator() as emu:
        emu.script("ok", "refuse")                  # outcome of the next submits (then "ok")
        emu.queue_positions = (2, 1, 0)             # IN_QUEUE answers before a request runs
        settings = Settings(fal_key=emu.key, fal_queue_url=emu.base_url, fal_jwks_url=emu.jwks_url, ...)
        handle = await FalBackend(settings).submit(request)
        job = emu.jobs[handle.id]                   # .arguments, .webhook, .outcome, .polls
        await emu.finish(handle.id)                 # complete now (and send its webhook)
        assert emu.count("POST") == 1

Test API:

==========================  ============================================================================================
outcomes                    ``script(*outcomes)`` queues them, one per submit; afterwards ``"ok"``. ``ok``, ``frozen``,
                            ``flicker`` (real H.264 clips made from the submitted picture, ``clip_size`` ×
                            ``clip_seconds`` at ``clip_fps``), ``hang`` (IN_PROGRESS forever), ``fail`` (COMPLETED +
                            error, result 500), ``invalid`` (result 422 with a validation ``detail``), ``refuse``
                            (result 422, ``content_policy_violation``), ``timeout`` (``error_type`` request_timeout,
                            result 504), ``disconnected`` (``runner_disconnected``, result 503), ``no_video`` (result
                            JSON without the file), ``not_video`` (a file that is not a video)
progress                    ``queue_positions`` (one IN_QUEUE answer per poll), ``running_polls`` (IN_PROGRESS answers),
                            then COMPLETED; ``await finish(request_id)`` completes at once
stills                      a text-to-image app (``fal-ai/flux/dev``) answers ``{"images": [{url, width, height,
                            content_type}]}``: a JPEG painted from the prompt and seed (``backends.fake.paint_picture``)
                            at ``image_size`` (``{"width", "height"}`` or a named size such as ``landscape_16_9``)
outputs                     ``output = "data"`` (``data:video/mp4;base64,…``) or ``"hosted"`` (``GET /files/{name}`` on
                            the emulator); ``file_chunked`` (no Content-Length), ``file_redirect`` (302 there first),
                            ``declare_file_size`` (``file_size`` in the result)
faults                      ``inject(method, path_regex, status, times=1, headers=, body=, hang=False)``: answer the
                            next matching calls with that status (e.g. 429 + ``Retry-After``) or never answer
webhooks                    sent when a request with ``?fal_webhook=`` completes (``webhook_auto``, with the options in
                            ``webhook_options``), or by ``await send_webhook(request_id, status=, forge=, stale=,
                            duplicate=, tamper=)``; ``await replay(delivery)`` resends one verbatim; each is a
                            ``Delivery`` (``status``, ``answer``) in ``deliveries``; ``rotate_key()`` signs with a new
                            key (the old one stays published unless ``keep_old=False``)
log                         ``requests`` (method, path, query, headers, json, status), ``count(method, path_regex)``,
                            ``jwks_fetches``, ``jobs``, ``await wait_for(predicate)``
==========================  ============================================================================================

What it enforces, as fal does: ``Authorization: Key <key>`` (401 otherwise); known apps only (404); each app's
input schema (required fields, enum values such as Kling's string durations ``"5"``/``"10"``, integer ranges,
image fields as ``data:image/…`` or http(s) URLs; 422 ``{"detail": [{"loc", "msg", "type"}]}``; unknown fields are
accepted and recorded in ``Job.unknown``); ``?logs=true|false|1|0`` on status; statuses only ``IN_QUEUE`` (with
``queue_position``), ``IN_PROGRESS`` and ``COMPLETED`` (with ``logs``, ``metrics``, ``error``, ``error_type``),
a failure being COMPLETED + error and then an HTTP error from the result; submit answers carry
``status_url``/``response_url``/``cancel_url`` without the app's sub-path; cancel answers 202
``CANCELLATION_REQUESTED``, 400 ``ALREADY_COMPLETED`` or 404 ``NOT_FOUND``; webhooks are POSTed with
``X-Fal-Webhook-Request-Id``/``-User-Id``/``-Timestamp``/``-Signature`` (Ed25519, hex, over
``"{request_id}\n{user_id}\n{timestamp}\n{sha256(body).hexdigest()}"``) and bodies
``{"request_id", "gateway_request_id", "status": "OK" | "ERROR", "payload"[, "error"]}``.

What it does NOT cover: the sync ``fal.run`` route, ``/status/stream`` (SSE) and ``iter_events``' streaming, fal's
storage uploads (``REST_URL``/``CDN_URL``: inputs are ``data:`` URIs here), realtime websockets, the backup domains
(``falrun.com``), priorities and runner hints (headers are only recorded), ``X-Fal-Request-Timeout``, fal's own
server-side retries and webhook retries (10× over 2 h), ``payload_error`` webhooks, per-account concurrency limits
(queue positions are scripted, not computed), real model behaviour (outputs ignore the prompt and the requested
length), idempotency of repeated submits (each POST is a new request), and the exact wording of fal's error
messages (the shapes are fal's; the texts are ours, marked [?] in the reference).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import re
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
import cv2
import numpy as np
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from PIL import Image

from backends.fake import paint_picture
from backends.video import VideoWriter

from .server import LocalServer, cancel_tasks

__all__ = ["APPS", "AppSpec", "Delivery", "FalEmulator", "Job", "Request"]

OUTCOMES = frozenset({"ok", "frozen", "flicker", "hang", "fail", "invalid", "refuse", "timeout", "disconnected",
                      "no_video", "not_video"})


@dataclass(frozen=True)
class AppSpec:
    """An app's input schema (the part fal validates) and the key of its output."""

    required: tuple[str, ...]
    images: tuple[str, ...] = ("image_url",)
    enums: dict[str, tuple[str, ...]] = field(default_factory=dict)
    ints: dict[str, tuple[int, int]] = field(default_factory=dict)
    numbers: dict[str, tuple[float, float]] = field(default_factory=dict)
    bools: tuple[str, ...] = ()
    strings: tuple[str, ...] = ("prompt", "negative_prompt")
    output: str = "video"
    sizes: tuple[str, ...] = ()  # fields taking a named size or {"width", "height"}

    @property
    def known(self) -> set[str]:
        """Every field the app takes."""
        return {*self.required, *self.images, *self.enums, *self.ints, *self.numbers, *self.bools, *self.strings,
                *self.sizes}


_KLING = AppSpec(required=("prompt", "image_url"), enums={"duration": ("5", "10")}, numbers={"cfg_scale": (0, 1)})
_SEED = (0, 2**32 - 1)

#: The apps the emulator knows, by endpoint id (schemas from the models' pages; see providers.md §5).
APPS: dict[str, AppSpec] = {
    "fal-ai/kling-video/v2.1/standard/image-to-video": _KLING,
    "fal-ai/kling-video/v2/master/image-to-video": _KLING,
    "fal-ai/kling-video/v2.1/pro/image-to-video": AppSpec(
        required=("prompt", "image_url"), images=("image_url", "tail_image_url"),
        enums={"duration": ("5", "10")}, numbers={"cfg_scale": (0, 1)}),
    "fal-ai/wan-i2v": AppSpec(
        required=("prompt", "image_url"),
        enums={"resolution": ("480p", "720p"), "aspect_ratio": ("auto", "16:9", "9:16", "1:1")},
        ints={"num_frames": (81, 100), "frames_per_second": (5, 24), "seed": _SEED, "num_inference_steps": (2, 40)},
        numbers={"guide_scale": (1, 10), "shift": (1, 10)}, bools=("enable_safety_checker", "enable_prompt_expansion")),
    "fal-ai/minimax/hailuo-02/standard/image-to-video": AppSpec(
        required=("prompt", "image_url"), images=("image_url", "end_image_url"),
        enums={"duration": ("6", "10"), "resolution": ("512P", "768P")}, bools=("prompt_optimizer",),
        strings=("prompt",)),
    "fal-ai/luma-dream-machine/ray-2-flash/image-to-video": AppSpec(
        required=("prompt",), images=("image_url", "end_image_url"),
        enums={"aspect_ratio": ("16:9", "9:16", "4:3", "3:4", "21:9", "9:21"), "duration": ("5s", "9s"),
               "resolution": ("540p", "720p", "1080p")}, bools=("loop",), strings=("prompt",)),
    "fal-ai/ltx-video/image-to-video": AppSpec(
        required=("prompt", "image_url"), ints={"seed": _SEED, "num_inference_steps": (1, 50)},
        numbers={"guidance_scale": (1, 10)}),
    "fal-ai/stable-video": AppSpec(
        required=("image_url",), ints={"motion_bucket_id": (1, 255), "fps": (10, 100), "seed": _SEED},
        numbers={"cond_aug": (0, 10)}, strings=()),
    "fal-ai/flux/dev": AppSpec(
        required=("prompt",), images=(), ints={"seed": _SEED, "num_inference_steps": (1, 50), "num_images": (1, 4)},
        numbers={"guidance_scale": (1, 20)}, strings=("prompt",), sizes=("image_size",), output="images"),
    "fal-ai/esrgan": AppSpec(required=("image_url",), numbers={"scale": (1, 8)}, strings=("model",), output="image"),
}

#: fal's named image sizes (FLUX), as (width, height).
NAMED_SIZES = {"square_hd": (1024, 1024), "square": (512, 512), "portrait_4_3": (768, 1024),
               "portrait_16_9": (576, 1024), "landscape_4_3": (1024, 768), "landscape_16_9": (1024, 576)}

# COMPLETED + error: (error, error_type, result status, result detail, result headers).
_FAILURES: dict[str, tuple[str, str | None, int, Any, dict[str, str]]] = {
    "fail": ("Internal Server Error", None, 500, "Internal Server Error", {}),
    "invalid": ("Invalid status code: 422", None, 422,
                [{"loc": ["body", "image_url"], "msg": "Could not load the image from image_url",
                  "type": "image_load_error"}], {}),
    "refuse": ("Invalid status code: 422", None, 422,
               [{"loc": ["body", "prompt"], "msg": "The content was flagged by the content checker",
                 "type": "content_policy_violation"}], {}),
    "timeout": ("Request timed out", "request_timeout", 504, "Request timed out",
                {"X-Fal-Error-Type": "request_timeout"}),
    "disconnected": ("Runner disconnected", "runner_disconnected", 503, "Runner disconnected",
                     {"X-Fal-Error-Type": "runner_disconnected"}),
    "canceled": ("Request was cancelled", "request_cancelled", 400, "Request was cancelled", {}),
}


@dataclass
class Request:
    """One HTTP call the emulator answered."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    json: Any
    status: int = 0

    def __repr__(self) -> str:
        return f"<{self.method} {self.path} → {self.status}>"


@dataclass
class Job:
    """One submitted request, as fal's queue holds it."""

    id: str
    app: str
    owner_alias: str
    arguments: dict[str, Any]
    webhook: str | None
    outcome: str
    script: deque[tuple[str, int | None]]
    headers: dict[str, str]
    unknown: list[str] = field(default_factory=list)
    polls: int = 0
    completed: bool = False
    canceled: bool = False
    error: str | None = None
    error_type: str | None = None
    result_status: int = 200
    result_body: Any = None
    result_headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Delivery:
    """One webhook POST the emulator made, and the receiver's answer."""

    request_id: str
    url: str
    headers: dict[str, str]
    body: bytes
    status: int = 0
    answer: str = ""


@dataclass
class _Injection:
    method: str
    path: re.Pattern[str]
    status: int
    times: int
    headers: dict[str, str]
    body: Any
    hang: bool


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _public_jwk(key: Ed25519PrivateKey) -> dict[str, str]:
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return {"kty": "OKP", "crv": "Ed25519", "x": _b64url(raw), "kid": hashlib.sha256(raw).hexdigest()[:16],
            "use": "sig", "alg": "EdDSA"}


def _decode_image(uri: Any) -> np.ndarray | None:
    """The RGB pixels of a ``data:image/…`` URI, or None if it is not one that decodes."""
    if not isinstance(uri, str) or not uri.startswith("data:image/"):
        return None
    header, _, data = uri.partition(",")
    try:
        raw = base64.b64decode(data) if header.endswith(";base64") else data.encode()
        with Image.open(io.BytesIO(raw)) as im:
            return np.asarray(im.convert("RGB"))
    except Exception:
        return None


def _frame(base: np.ndarray, kind: str, i: int, n: int) -> np.ndarray:
    if kind == "frozen":
        return base
    w, h = base.shape[1], base.shape[0]
    shift = np.float32([[1, 0, -0.1 * w * i / max(1, n - 1)], [0, 1, 0]])
    frame = cv2.warpAffine(base, shift, (w, h), borderMode=cv2.BORDER_REFLECT)
    if kind == "flicker":
        return cv2.convertScaleAbs(frame, alpha=1.3 if i % 2 else 0.7)
    return frame


_CLIPS: dict[tuple[Any, ...], bytes] = {}


def make_clip(image: np.ndarray | None, kind: str, size: tuple[int, int], seconds: float, fps: int) -> bytes:
    """A small real H.264 MP4: a slow pan over ``image`` (frozen or flickering for those ``kind``s).

    Clips are cached by their inputs for the whole test run: the same picture costs one ffmpeg run.
    """
    digest = hashlib.sha256(image.tobytes()).hexdigest() + str(image.shape) if image is not None else None
    key = (digest, kind, size, seconds, fps)
    if key not in _CLIPS:
        _CLIPS[key] = _render_clip(image, kind, size, seconds, fps)
    return _CLIPS[key]


def _render_clip(image: np.ndarray | None, kind: str, size: tuple[int, int], seconds: float, fps: int) -> bytes:
    w, h = size
    if image is None:
        yy, xx = np.mgrid[0:h, 0:w]
        image = np.dstack([xx * 255 // max(1, w - 1), yy * 255 // max(1, h - 1), np.full_like(xx, 96)])
    base = cv2.resize(np.ascontiguousarray(image, dtype=np.uint8), (w, h), interpolation=cv2.INTER_AREA)
    n = max(2, round(seconds * fps))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clip.mp4"
        with VideoWriter(path, width=w, height=h, fps=fps) as writer:
            for i in range(n):
                writer.write(_frame(base, kind, i, n))
        return path.read_bytes()


class FalEmulator(LocalServer):
    """fal's queue API, JWKS and a file host on 127.0.0.1; see the module docstring for the test API.

    ``FalEmulator(key="test-fal-key", clip_size=(256, 144), clip_seconds=1.0, clip_fps=24, output="data")``
    then ``async with emu:``. Knobs are plain attributes, settable at any time. ``base_url`` is both the queue
    URL (``settings.fal_queue_url``) and the file host.
    """

    shutdown_timeout = 0.1

    def __init__(
        self,
        *,
        key: str = "test-fal-key",
        user_id: str = "emulated-user",
        clip_size: tuple[int, int] = (256, 144),
        clip_seconds: float = 1.0,
        clip_fps: int = 24,
        output: str = "data",
    ) -> None:
        super().__init__()
        self.key = key
        self.user_id = user_id
        self.clip_size = clip_size
        self.clip_seconds = clip_seconds
        self.clip_fps = clip_fps
        self.output = output
        self.queue_positions: tuple[int, ...] = (1, 0)
        self.running_polls = 1
        self.file_chunked = False
        self.file_redirect: str | None = None
        self.declare_file_size = True
        self.webhook_auto = True
        self.webhook_options: dict[str, Any] = {}

        self.outcomes: deque[str] = deque()
        self.jobs: dict[str, Job] = {}
        self.files: dict[str, tuple[bytes, str]] = {}
        self.requests: list[Request] = []
        self.deliveries: list[Delivery] = []
        self.jwks_fetches = 0
        self._keys = [Ed25519PrivateKey.generate()]
        self._forger = Ed25519PrivateKey.generate()
        self._injections: list[_Injection] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------------------------------ lifecycle

    def _make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _on_stop(self) -> None:
        """Stop webhook deliveries."""
        await cancel_tasks(*self._tasks)

    @property
    def jwks_url(self) -> str:
        """Where the webhook signing keys are published (``settings.fal_jwks_url``)."""
        return self.base_url + "/.well-known/jwks.json"

    # ------------------------------------------------------------------------------------------ test API

    def script(self, *outcomes: str) -> None:
        """Queue the outcomes of the next submits, one each (then ``ok``)."""
        unknown = set(outcomes) - OUTCOMES
        if unknown:
            raise ValueError(f"unknown outcomes {sorted(unknown)}; use {sorted(OUTCOMES)}")
        self.outcomes.extend(outcomes)

    def inject(
        self,
        method: str,
        path_regex: str,
        status: int = 500,
        *,
        times: int = 1,
        headers: dict[str, str] | None = None,
        body: Any = None,
        hang: bool = False,
    ) -> None:
        """Answer the next ``times`` calls matching ``method`` and ``path_regex`` with ``status`` (or never)."""
        self._injections.append(_Injection(method.upper(), re.compile(path_regex), status, times,
                                           dict(headers or {}), body, hang))

    def rotate_key(self, *, keep_old: bool = True) -> None:
        """Sign webhooks with a new key from now on; the old one stays in the JWKS unless ``keep_old=False``."""
        self._keys = [*self._keys, Ed25519PrivateKey.generate()] if keep_old else [Ed25519PrivateKey.generate()]

    def count(self, method: str | None = None, path_regex: str | None = None) -> int:
        """How many calls matched ``method`` and ``path_regex`` (both optional)."""
        return sum(1 for r in self.requests if (method is None or r.method == method.upper())
                   and (path_regex is None or re.search(path_regex, r.path)))

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
        """Wait until ``predicate()`` is truthy; return it."""
        deadline = time.monotonic() + timeout
        while not (value := predicate()):
            if time.monotonic() > deadline:
                raise TimeoutError("condition not met within the timeout")
            await asyncio.sleep(0.01)
        return value

    async def finish(self, request_id: str) -> Job:
        """Complete a request now (sending its webhook if it has one), whatever its script says."""
        job = self.jobs[request_id]
        job.script.clear()
        await self._complete(job)
        return job

    async def send_webhook(
        self,
        request_id: str,
        *,
        url: str | None = None,
        status: str | None = None,
        forge: bool = False,
        stale: float = 0.0,
        duplicate: bool = False,
        tamper: bool = False,
        body: bytes | None = None,
    ) -> Delivery:
        """POST fal's webhook for a completed request; the first delivery made.

        ``status`` defaults to ``OK`` or ``ERROR`` by the outcome; ``forge`` signs with a key not in the JWKS,
        ``stale`` back-dates the timestamp by that many seconds, ``duplicate`` sends the same call twice,
        ``tamper`` changes the body after signing, ``body`` replaces it (signed as given).
        """
        job = self.jobs[request_id]
        target = url or job.webhook
        if not target:
            raise ValueError(f"request {request_id} has no webhook URL")
        if body is None:
            ok = job.result_status < 400 and (status or "OK") == "OK"
            payload: dict[str, Any] = {"request_id": job.id, "gateway_request_id": job.id,
                                       "status": "OK" if ok else "ERROR", "payload": job.result_body}
            if not ok:
                payload["error"] = f"Invalid status code: {job.result_status}"
            body = json.dumps(payload).encode()
        timestamp = str(int(time.time() - stale))
        message = f"{job.id}\n{self.user_id}\n{timestamp}\n{hashlib.sha256(body).hexdigest()}".encode()
        signature = (self._forger if forge else self._keys[-1]).sign(message).hex()
        headers = {"Content-Type": "application/json", "X-Fal-Webhook-Request-Id": job.id,
                   "X-Fal-Webhook-User-Id": self.user_id, "X-Fal-Webhook-Timestamp": timestamp,
                   "X-Fal-Webhook-Signature": signature}
        if tamper:
            body = body.replace(b'"status": "', b'"status": "X', 1)
        first = await self._post(Delivery(job.id, target, headers, body))
        if duplicate:
            await self.replay(first)
        return first

    async def replay(self, delivery: Delivery) -> Delivery:
        """Send a webhook again exactly as it was sent."""
        return await self._post(Delivery(delivery.request_id, delivery.url, dict(delivery.headers), delivery.body))

    # ------------------------------------------------------------------------------------------ internals

    async def _post(self, delivery: Delivery) -> Delivery:
        self.deliveries.append(delivery)
        try:
            async with aiohttp.ClientSession() as http, http.post(
                delivery.url, data=delivery.body, headers=delivery.headers, timeout=aiohttp.ClientTimeout(total=10)
            ) as response:
                delivery.status, delivery.answer = response.status, await response.text()
        except aiohttp.ClientError as exc:
            delivery.status, delivery.answer = 0, f"{type(exc).__name__}: {exc}"
        return delivery

    def _injected(self, method: str, path: str) -> _Injection | None:
        for injection in self._injections:
            if injection.times > 0 and injection.method in (method, "*") and injection.path.search(path):
                injection.times -= 1
                return injection
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        record = Request(request.method, request.path, dict(parse_qsl(request.query_string)),
                         dict(request.headers), body)
        self.requests.append(record)
        response = await self._route(request, record)
        record.status = response.status
        return response

    async def _route(self, request: web.Request, record: Request) -> web.StreamResponse:
        method, path = request.method, request.path
        injection = self._injected(method, path)
        if injection is not None:
            if injection.hang:
                await asyncio.sleep(3600)
            body = injection.body if injection.body is not None else {"detail": f"injected HTTP {injection.status}"}
            return web.json_response(body, status=injection.status, headers=injection.headers)
        if method == "GET" and path == "/.well-known/jwks.json":
            self.jwks_fetches += 1
            return web.json_response({"keys": [_public_jwk(k) for k in self._keys]})
        if method == "GET" and (m := re.fullmatch(r"/files/([^/]+)", path)):
            return await self._file(request, m.group(1))
        if request.headers.get("Authorization") != f"Key {self.key}":
            return web.json_response({"detail": "No user found for Key ID and Secret"}, status=401)
        if m := re.fullmatch(r"/([^/]+/[^/]+)/requests/([^/]+)(/status|/cancel)?", path):
            job = self.jobs.get(m.group(2))
            if job is None or job.owner_alias != m.group(1):
                if m.group(3) == "/cancel":
                    return web.json_response({"status": "NOT_FOUND"}, status=404)
                return web.json_response({"detail": "Request not found"}, status=404)
            if method == "GET" and m.group(3) == "/status":
                return await self._status(job, request.query.get("logs", "false"))
            if method == "PUT" and m.group(3) == "/cancel":
                return self._cancel(job)
            if method == "GET" and m.group(3) is None:
                return self._result(job)
        if method == "POST":
            return self._submit(request, record)
        return web.json_response({"detail": "Not Found"}, status=404)

    def _submit(self, request: web.Request, record: Request) -> web.Response:
        app = request.path.strip("/")
        spec = APPS.get(app)
        if spec is None:
            return web.json_response({"detail": f"Application '{app}' not found"}, status=404)
        if not isinstance(record.json, dict):
            return web.json_response({"detail": [{"loc": ["body"], "msg": "Input should be a valid dictionary",
                                                  "type": "dict_type"}]}, status=422)
        errors = _validate(spec, record.json)
        if errors:
            return web.json_response({"detail": errors}, status=422)
        request_id = str(uuid.uuid4())
        owner_alias = "/".join(app.split("/")[:2])
        outcome = self.outcomes.popleft() if self.outcomes else "ok"
        script: deque[tuple[str, int | None]] = deque(("IN_QUEUE", p) for p in self.queue_positions)
        script.extend(("IN_PROGRESS", None) for _ in range(self.running_polls))
        job = Job(request_id, app, owner_alias, record.json, request.query.get("fal_webhook"), outcome, script,
                  dict(request.headers), unknown=sorted(set(record.json) - spec.known))
        self.jobs[request_id] = job
        return web.json_response(
            {"request_id": request_id, "gateway_request_id": request_id, "status": "IN_QUEUE",
             "queue_position": self.queue_positions[0] if self.queue_positions else 0, **self._urls(job)},
            headers={"x-fal-request-id": request_id})

    def _urls(self, job: Job) -> dict[str, str]:
        base = f"{self.base_url}/{job.owner_alias}/requests/{job.id}"
        return {"response_url": base, "status_url": base + "/status", "cancel_url": base + "/cancel"}

    async def _status(self, job: Job, logs_param: str) -> web.Response:
        logs_param = logs_param.lower()
        if logs_param not in ("true", "false", "1", "0"):
            return web.json_response({"detail": [{"loc": ["query", "logs"], "msg": "Input should be a valid boolean",
                                                  "type": "bool_parsing"}]}, status=422)
        with_logs = logs_param in ("true", "1")
        job.polls += 1
        common = {"request_id": job.id, **self._urls(job)}
        if not job.completed and job.canceled:
            await self._complete(job, failure="canceled")
        if not job.completed and (job.script or job.outcome == "hang"):
            state, position = job.script.popleft() if job.script else ("IN_PROGRESS", None)
            if state == "IN_QUEUE":
                return web.json_response({**common, "status": "IN_QUEUE", "queue_position": position, "logs": None})
            logs = [{"message": "generating", "level": "INFO", "source": "user",
                     "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S")}] if with_logs else None
            return web.json_response({**common, "status": "IN_PROGRESS", "logs": logs})
        if not job.completed:
            await self._complete(job)
        return web.json_response({**common, "status": "COMPLETED", "logs": [] if with_logs else None,
                                  "metrics": {"inference_time": 0.1}, "error": job.error,
                                  "error_type": job.error_type})

    def _cancel(self, job: Job) -> web.Response:
        if job.completed:
            return web.json_response({"status": "ALREADY_COMPLETED"}, status=400)
        job.canceled = True
        return web.json_response({"status": "CANCELLATION_REQUESTED"}, status=202)

    def _result(self, job: Job) -> web.Response:
        if not job.completed:
            return web.json_response({"detail": "Request is still in progress"}, status=400)
        return web.json_response(job.result_body, status=job.result_status,
                                 headers={"x-fal-request-id": job.id, **job.result_headers})

    async def _complete(self, job: Job, *, failure: str | None = None) -> None:
        if job.completed:
            return
        failure = failure or (job.outcome if job.outcome in _FAILURES else None)
        if failure is not None:
            job.error, job.error_type, job.result_status, detail, job.result_headers = _FAILURES[failure]
            job.result_body = {"detail": detail}
        else:
            job.result_body = await self._output(job)
        job.completed = True
        if job.webhook and self.webhook_auto and failure != "canceled":
            task = asyncio.create_task(self.send_webhook(job.id, **self.webhook_options))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _output(self, job: Job) -> dict[str, Any]:
        spec = APPS[job.app]
        if job.outcome == "no_video":
            return {"seed": 42, "timings": {"inference": 0.1}}
        if spec.output == "images" and job.outcome != "not_video":
            return await asyncio.to_thread(self._still, job)
        if job.outcome == "not_video":
            data = b"<html><body>upstream error</body></html>" * 8
        else:
            image = next((img for f in spec.images if (img := _decode_image(job.arguments.get(f))) is not None), None)
            kind = job.outcome if job.outcome in ("frozen", "flicker") else "ok"
            data = await asyncio.to_thread(make_clip, image, kind, self.clip_size, self.clip_seconds, self.clip_fps)
        name = f"{job.id}.mp4"
        if self.output == "hosted":
            self.files[name] = (data, "video/mp4")
            url = f"{self.base_url}/files/{name}"
        else:
            url = "data:video/mp4;base64," + base64.b64encode(data).decode()
        file: dict[str, Any] = {"url": url, "content_type": "video/mp4", "file_name": "output.mp4"}
        if self.declare_file_size:
            file["file_size"] = len(data)
        return {spec.output: [file] if spec.output == "images" else file, "seed": 42}

    def _still(self, job: Job) -> dict[str, Any]:
        """A text-to-image result: one JPEG painted from the prompt at the asked size."""
        size = job.arguments.get("image_size", "landscape_4_3")
        width, height = (size["width"], size["height"]) if isinstance(size, dict) else NAMED_SIZES[size]
        seed = int(job.arguments.get("seed", 42))
        buf = io.BytesIO()
        Image.fromarray(paint_picture(str(job.arguments["prompt"]), seed, width, height)).save(buf, "JPEG", quality=90)
        data = buf.getvalue()
        name = f"{job.id}.jpg"
        if self.output == "hosted":
            self.files[name] = (data, "image/jpeg")
            url = f"{self.base_url}/files/{name}"
        else:
            url = "data:image/jpeg;base64," + base64.b64encode(data).decode()
        image = {"url": url, "width": width, "height": height, "content_type": "image/jpeg"}
        return {"images": [image], "seed": seed, "has_nsfw_concepts": [False], "prompt": job.arguments["prompt"]}

    async def _file(self, request: web.Request, name: str) -> web.StreamResponse:
        if name not in self.files:
            return web.json_response({"detail": "Not Found"}, status=404)
        if self.file_redirect and not request.query.get("redirected"):
            raise web.HTTPFound(self.file_redirect)
        data, content_type = self.files[name]
        if not self.file_chunked:
            return web.Response(body=data, content_type=content_type)
        response = web.StreamResponse(headers={"Content-Type": content_type})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(data), 4096):
            await response.write(data[start:start + 4096])
        await response.write_eof()
        return response


def _validate(spec: AppSpec, args: dict[str, Any]) -> list[dict[str, Any]]:
    """pydantic-style errors for ``args`` against ``spec`` (empty when valid)."""
    errors: list[dict[str, Any]] = []

    def error(name: str, msg: str, kind: str) -> None:
        errors.append({"loc": ["body", name], "msg": msg, "type": kind})

    for name in spec.required:
        if name not in args:
            error(name, "Field required", "missing")
    for name, value in args.items():
        if name in spec.images:
            url = isinstance(value, str) and value.startswith(("http://", "https://"))
            if not url and _decode_image(value) is None:
                error(name, "Could not load the image: expected an http(s) URL or a data:image URI", "image_load_error")
        elif name in spec.enums:
            allowed = spec.enums[name]
            if value not in allowed:
                error(name, "Input should be " + " or ".join(f"'{a}'" for a in allowed), "enum")
        elif name in spec.ints:
            lo, hi = spec.ints[name]
            if not isinstance(value, int) or isinstance(value, bool):
                error(name, "Input should be a valid integer", "int_type")
            elif not lo <= value <= hi:
                error(name, f"Input should be between {lo} and {hi}", "range")
        elif name in spec.numbers:
            lo, hi = spec.numbers[name]
            if not isinstance(value, int | float) or isinstance(value, bool):
                error(name, "Input should be a valid number", "float_type")
            elif not lo <= value <= hi:
                error(name, f"Input should be between {lo} and {hi}", "range")
        elif name in spec.bools and not isinstance(value, bool):
            error(name, "Input should be a valid boolean", "bool_type")
        elif name in spec.strings and not isinstance(value, str):
            error(name, "Input should be a valid string", "string_type")
        elif name in spec.sizes:
            named = isinstance(value, str) and value in NAMED_SIZES
            custom = (isinstance(value, dict) and set(value) == {"width", "height"}
                      and all(isinstance(v, int) and not isinstance(v, bool) and 16 <= v <= 14142
                              for v in value.values()))
            if not (named or custom):
                error(name, "Input should be one of " + ", ".join(f"'{n}'" for n in NAMED_SIZES)
                      + " or an object with integer width and height", "image_size")
    return errors
