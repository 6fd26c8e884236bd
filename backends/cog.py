"""``cog``: a self-hosted Cog model server, how one runs an open image-to-video model on one's own GPU.

Cog (https://cog.run) packages a model such as Wan or LTX-Video as an HTTP server (``coglet``).

Set ``ANIMABOT_COG_URL`` (e.g. ``http://gpu-box:5000``) and ``ANIMABOT_PUBLIC_URL``: a Cog server cannot
be polled (``GET /predictions/{id}`` answers 405), it only reports through webhooks, so it must be able
to reach animabot's web endpoint. One generation goes::

    submit   PUT /predictions/{request.key}   Prefer: respond-async, webhook=request.webhook_url
             → 202 {"id", "status": "starting"}   (repeating the PUT while it runs returns the same
               prediction, so a retried submit never starts a second generation; once it ended the
               server forgets it, and a repeat would start anew)
             → 409 "At capacity"                   every slot busy: RateLimited, ask again shortly
             → 422 {"detail": [...]}               bad input (servers with a schema): InvalidRequest
    webhook  POST {"id", "status": "processing"}, then {"status": "succeeded" | "failed" | "canceled",
             "output": "data:video/mp4;base64,…" | "https://…", "error"}: :meth:`CogBackend.verify_webhook`
             turns it into a notice whose data the job system merges into the handle
    status   answers from the handle's data; while nothing final arrived it asks ``GET /health-check``
             only to notice work that cannot finish any more (server restarted, defunct, or idle for
             ``lost_after`` seconds with one slot): FAILED with BackendUnavailable. Cheap (one
             health check a second at most), so keep calling it while waiting for the webhook
    result   decodes the ``data:`` URI (or downloads the URL from the Cog host or an allowed host),
             writes the request's output file and probes it
    cancel   POST /predictions/{id}/cancel

Cog webhooks carry no signature: the job system authenticates the URL itself (each attempt gets
``/webhooks/cog/{attempt_id}/{token}``), so :meth:`~CogBackend.verify_webhook` only validates the JSON.

Which of the model's inputs get our parameters is data, not code: ``backends/data/cog.toml`` maps them
for a generic i2v predictor, Wan 2.2 and LTX-Video, picked by the request's ``model``. A parameter the
model cannot honour (a length outside its frame range, an unknown model, an end frame for a model without
an ``end_image`` input) is refused by name.

A terminal webhook carries the whole video as base64, so the web endpoint must accept bodies of about
``max_output_bytes`` × 4/3; alternatively run the server with ``--upload-url`` and list that host in
``ANIMABOT_PROVIDER_DOWNLOAD_HOSTS``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import os
import re
import time
import tomllib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote_to_bytes, urlsplit

import aiohttp

from backends import video
from backends.base import (
    Aspect,
    Backend,
    BackendError,
    BackendUnavailable,
    CameraMove,
    Capabilities,
    ContentRefused,
    GenerationRequest,
    GenerationResult,
    Handle,
    InvalidRequest,
    PermanentBackendError,
    RateLimited,
    State,
    StatusReport,
    UnsupportedRequest,
    Usability,
    WebhookNotice,
    WebhookRejected,
)
from backends.downloads import host_allowed

CATALOGUE_FILE = Path(__file__).parent / "data" / "cog.toml"
INPUT_KEYS = frozenset({
    "image", "end_image", "prompt", "negative_prompt", "num_frames", "fps", "duration", "seed", "width", "height",
    "resolution",
})
TERMINAL = {"succeeded": State.SUCCEEDED, "failed": State.FAILED, "canceled": State.CANCELED}
RUNNING = frozenset({"starting", "processing"})
#: Health-check states in which the server can no longer finish work it had.
DEAD = frozenset({"SETUP_FAILED", "DEFUNCT"})


@dataclass(frozen=True)
class CogModel:
    """One catalogue entry: how a request becomes the inputs of one Cog model."""

    name: str
    fps: int
    inputs: Mapping[str, str]
    frames: tuple[int, int] | None = None
    frame_step: int = 1
    limits: tuple[float, float] | None = None
    max_long_side: int = 1280
    resolutions: Mapping[str, int] = field(default_factory=dict)
    fixed: Mapping[str, Any] = field(default_factory=dict)

    @property
    def durations(self) -> tuple[float, float]:
        """Shortest and longest clip in seconds: ``limits`` if given, else what ``frames`` allow."""
        if self.limits is not None:
            return self.limits
        assert self.frames is not None  # parse_catalogue requires one of them
        return self.frames[0] / self.fps, self.frames[1] / self.fps

    def frame_count(self, duration: float, fps: int | None = None) -> int:
        """The frame count for ``duration`` seconds, snapped to ``k × frame_step + 1`` when needed."""
        n = max(1, round(duration * (fps or self.fps)))
        if self.frame_step > 1:
            n = self.frame_step * max(0, round((n - 1) / self.frame_step)) + 1
        return n


@dataclass(frozen=True)
class Catalogue:
    """The parsed ``cog.toml``: models by name, the default one, server traits and error patterns."""

    models: Mapping[str, CogModel]
    default_model: str
    slots: int = 1
    lost_after: float = 30.0
    busy_retry_after: float = 5.0
    errors: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def model(self, name: str | None) -> CogModel:
        """The entry for ``name`` (the default one for None); UnsupportedRequest naming the known ones."""
        key = name or self.default_model
        try:
            return self.models[key]
        except KeyError:
            known = ", ".join(sorted(self.models))
            raise UnsupportedRequest(
                f"model {key!r} is not in the Cog catalogue (known: {known}); add it to cog.toml", backend="cog"
            ) from None


def parse_catalogue(raw: Mapping[str, Any], *, source: str = "cog.toml") -> Catalogue:
    """A :class:`Catalogue` from parsed TOML; ``ValueError`` naming the entry that is wrong."""
    models: dict[str, CogModel] = {}
    for name, entry in (raw.get("models") or {}).items():
        where = f"{source}: [models.{name}]"
        inputs = dict(entry.get("inputs") or {})
        unknown = set(inputs) - INPUT_KEYS
        if unknown:
            raise ValueError(f"{where}.inputs: unknown parameters {sorted(unknown)}; use {sorted(INPUT_KEYS)}")
        if not inputs.get("image"):
            raise ValueError(f"{where}.inputs: `image` (the start image's input name) is required")
        fps = int(entry.get("fps", 0))
        if not 1 <= fps <= 120:
            raise ValueError(f"{where}: fps must be 1..120, got {fps}")
        frames = tuple(int(n) for n in entry["frames"]) if "frames" in entry else None
        if frames is not None and (len(frames) != 2 or not 1 <= frames[0] <= frames[1]):
            raise ValueError(f"{where}: frames must be [min, max] with 1 <= min <= max")
        limits = tuple(float(d) for d in entry["durations"]) if "durations" in entry else None
        if limits is None and frames is None:
            raise ValueError(f"{where}: give `durations` or `frames` (or both)")
        if limits is not None and (len(limits) != 2 or not 0 < limits[0] <= limits[1]):
            raise ValueError(f"{where}: durations must be [min, max] seconds with 0 < min <= max")
        if "resolution" in inputs and not entry.get("resolutions"):
            raise ValueError(f"{where}: the `resolution` input needs a [resolutions] table")
        models[name] = CogModel(
            name=name, fps=fps, inputs=inputs, frames=frames,  # type: ignore[arg-type]
            frame_step=max(1, int(entry.get("frame_step", 1))), limits=limits,  # type: ignore[arg-type]
            max_long_side=int(entry.get("max_long_side", 1280)),
            resolutions={str(k): int(v) for k, v in (entry.get("resolutions") or {}).items()},
            fixed=dict(entry.get("fixed") or {}),
        )
    default = raw.get("default_model", "")
    if default not in models:
        raise ValueError(f"{source}: default_model {default!r} is not one of the [models] ({sorted(models)})")
    server = raw.get("server") or {}
    return Catalogue(
        models=models, default_model=default, slots=int(server.get("slots", 1)),
        lost_after=float(server.get("lost_after", 30.0)), busy_retry_after=float(server.get("busy_retry_after", 5.0)),
        errors={kind: tuple(patterns) for kind, patterns in (raw.get("errors") or {}).items()},
    )


@lru_cache(maxsize=8)
def load_catalogue(path: Path = CATALOGUE_FILE) -> Catalogue:
    """The catalogue in ``path`` (the built-in one by default)."""
    with Path(path).open("rb") as fh:
        return parse_catalogue(tomllib.load(fh), source=Path(path).name)


_DEFAULT = load_catalogue().model(None)


class CogBackend(Backend):
    """A self-hosted Cog server: PUT with our id and a webhook, learn the outcome from the webhook."""

    name = "cog"
    description = "a self-hosted Cog model server (open models such as Wan on your own GPU)"
    capabilities = Capabilities(
        cameras=frozenset(CameraMove),  # the camera move is in the prompt
        durations=_DEFAULT.durations,
        aspects=frozenset(Aspect),
        fps=_DEFAULT.fps,
        good_at=frozenset({"landscape", "other"}),
        cost_per_second_usd=0.0,
        needs_network=True,
        settings=("cog_url",),
        min_short_side=256,
        max_long_side=_DEFAULT.max_long_side,
        end_frame=any("end_image" in m.inputs for m in load_catalogue().models.values()),
    )
    pollable = False
    #: Seconds a health check is reused for, so that many running predictions cost one request.
    health_ttl = 1.0

    def __init__(self, settings: Any, *, catalogue: Catalogue | str | os.PathLike[str] | None = None) -> None:
        super().__init__(settings)
        if catalogue is None:
            catalogue = getattr(settings, "cog_catalogue", None) or CATALOGUE_FILE
        self.catalogue = catalogue if isinstance(catalogue, Catalogue) else load_catalogue(Path(catalogue))
        self.url = str(getattr(settings, "cog_url", "") or "").rstrip("/")
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None
        self._health: tuple[float, dict[str, Any]] | None = None
        self._idle_since: dict[str, float] = {}

    # -- the protocol ------------------------------------------------------------------------------

    @classmethod
    def check_usable(cls, settings: Any) -> Usability:
        """Needs ``cog_url``, and ``public_url`` too: the server reports only through webhooks."""
        usable = super().check_usable(settings)
        if usable.usable and not getattr(settings, "public_url", ""):
            return Usability(False, "set ANIMABOT_PUBLIC_URL (a Cog server reports only through webhooks)")
        return usable

    def refusals(self, request: GenerationRequest) -> list[str]:
        """Why the model behind this server cannot honour ``request``, each naming the value."""
        try:
            model = self.catalogue.model(request.model)
        except UnsupportedRequest as exc:
            return [exc.message]
        out = [r for r in self.capabilities.refusals(request) if not r.startswith(("duration", "an end frame"))]
        if request.end_image_path is not None and not model.inputs.get("end_image"):
            able = [name for name, m in self.catalogue.models.items() if m.inputs.get("end_image")]
            out.append(
                f"Cog model {model.name!r} takes no end frame (Cog models that can: {', '.join(able) or 'none'}; "
                "map the predictor's end-frame input as `end_image` in cog.toml if it has one)"
            )
        if model.limits is not None and not model.limits[0] <= request.duration <= model.limits[1]:
            lo, hi = model.limits
            out.append(f"duration {request.duration:g}s is outside {lo:g}..{hi:g}s for Cog model {model.name!r}")
        elif model.frames is not None:
            lo, hi = model.frames
            frames = model.frame_count(request.duration)
            if not lo <= frames <= hi:
                out.append(
                    f"duration {request.duration:g}s is {frames} frames at {model.fps} fps; Cog model "
                    f"{model.name!r} makes {lo}..{hi} frames ({lo / model.fps:.2f}..{hi / model.fps:.2f}s)"
                )
        return out

    async def submit(self, request: GenerationRequest) -> Handle:
        """PUT the prediction under ``request.key``, asking for webhooks; return at once."""
        if not request.webhook_url:
            raise UnsupportedRequest(
                "a Cog server reports only through webhooks: set ANIMABOT_PUBLIC_URL so the Cog server can "
                "reach animabot", backend=self.name,
            )
        refusals = self.refusals(request)
        if refusals:
            raise UnsupportedRequest("; ".join(refusals), backend=self.name)
        if not request.image_path.is_file():
            raise InvalidRequest(f"source image {request.image_path} does not exist", backend=self.name)
        model = self.catalogue.model(request.model)
        inputs = await asyncio.to_thread(self._inputs, model, request)
        health = await self._check_health(fresh=True)
        state = health.get("status")
        if state in DEAD or state == "UNHEALTHY":
            raise BackendUnavailable(
                f"the Cog server at {self.url} is {state}; restart it (its log says why)", backend=self.name
            )
        prediction_id = request.key or f"animabot-{uuid.uuid4().hex}"
        body = {"id": prediction_id, "input": inputs, "webhook": request.webhook_url,
                "webhook_events_filter": ["start", "completed"]}
        answer = await self._call("PUT", f"/predictions/{quote(prediction_id, safe='')}", json_body=body,
                                  headers={"Prefer": "respond-async"})
        data: dict[str, Any] = {
            "output_path": str(request.output_dir / request.output_name),
            "model": model.name,
            "server": self.url,
            "boot": _boot_id(health),
            "submitted": time.time(),
        }
        if isinstance(answer, dict) and answer.get("status") in TERMINAL:  # a server that ignored respond-async
            data.update(_terminal_data(answer))
        return Handle(self.name, prediction_id, data)

    async def status(self, handle: Handle) -> StatusReport:
        """What the webhooks said (merged into ``handle.data``); the server only tells whether work was lost."""
        final = handle.data.get("status")
        if final in TERMINAL:
            self._idle_since.pop(handle.id, None)
            return self._report(TERMINAL[final], handle.data)
        health = await self._check_health()
        state = health.get("status", "")
        boot, was = _boot_id(health), handle.data.get("boot")
        if was and boot and boot != was:
            return _lost(f"the Cog server restarted and lost prediction {handle.id}")
        if state in DEAD:
            return _lost(f"the Cog server is {state}; prediction {handle.id} cannot finish")
        if state == "READY" and self.catalogue.slots == 1:
            # One slot and idle: the prediction ended (or never ran) but its final webhook never came.
            since = self._idle_since.setdefault(handle.id, time.monotonic())
            if time.monotonic() - since >= self.catalogue.lost_after:
                self._idle_since.pop(handle.id, None)
                return _lost(
                    f"the Cog server is idle but never reported how prediction {handle.id} ended (was "
                    "animabot's web endpoint reachable, and does it accept bodies as large as the video?)"
                )
        else:
            self._idle_since.pop(handle.id, None)
        message = "the Cog server is UNHEALTHY" if state == "UNHEALTHY" else f"running on the Cog server ({state})"
        return StatusReport(State.RUNNING, message=message)

    async def result(self, handle: Handle) -> GenerationResult:
        """The video the final webhook delivered, written to the request's output path and probed."""
        if handle.data.get("status") != "succeeded":
            raise PermanentBackendError(f"prediction {handle.id} has not succeeded", backend=self.name)
        output = _pick_output(handle.data.get("output"))
        if output is None:
            raise PermanentBackendError(
                f"the Cog model returned no file (output: {str(handle.data.get('output'))[:200]!r})",
                backend=self.name,
            )
        out = Path(handle.data["output_path"])
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            if output.startswith("data:"):
                mime = await asyncio.to_thread(self._write_data_uri, output, tmp)
            elif output.startswith(("http://", "https://")):
                mime = await self._download(output, tmp)
            else:
                raise PermanentBackendError(f"the Cog model returned {output[:80]!r}, not a file", backend=self.name)
            if mime and not mime.startswith("video/") and mime not in ("application/octet-stream", "image/gif"):
                raise PermanentBackendError(f"the Cog model returned {mime}, not a video", backend=self.name)
            try:
                info = await asyncio.to_thread(video.probe, tmp)
            except video.VideoError as exc:
                raise PermanentBackendError(
                    f"the Cog model's output is not a playable video ({exc})", backend=self.name
                ) from None
            os.replace(tmp, out)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return GenerationResult(
            video_path=out, width=info.width, height=info.height, fps=info.fps, frames=info.frames, cost_usd=0.0,
            metadata={"model": handle.data.get("model"), "predict_time": handle.data.get("predict_time")},
        )

    async def cancel(self, handle: Handle) -> None:
        """Ask the server to stop the prediction; a prediction it no longer knows is fine."""
        if handle.data.get("status") in TERMINAL:
            return
        await self._call("POST", f"/predictions/{quote(handle.id, safe='')}/cancel", ok_missing=True)

    async def verify_webhook(self, headers: Mapping[str, str], body: bytes) -> WebhookNotice:
        """Parse a Cog webhook (unsigned: the job system checked the URL's token) into a notice."""
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise WebhookRejected(400, "the body is not JSON") from None
        if not isinstance(payload, dict):
            raise WebhookRejected(400, "the body is not a JSON object")
        prediction_id, status = payload.get("id"), payload.get("status")
        if not isinstance(prediction_id, str) or not prediction_id:
            raise WebhookRejected(400, "no prediction id")
        if status in RUNNING:
            # Carries no data: a late `processing` (Cog sends output events after `completed`, and our
            # webhooks may race) must not overwrite what a final webhook already left in the handle.
            return WebhookNotice(prediction_id, StatusReport(State.RUNNING, message="running on the Cog server"))
        if status not in TERMINAL:
            raise WebhookRejected(400, f"unknown prediction status {status!r}")
        data = _terminal_data(payload)
        return WebhookNotice(prediction_id, self._report(TERMINAL[status], data), data)

    async def aclose(self) -> None:
        """Close the HTTP session."""
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    # -- helpers -------------------------------------------------------------------------------------

    def _inputs(self, model: CogModel, request: GenerationRequest) -> dict[str, Any]:
        """The prediction's ``input`` object for ``model``."""
        names = model.inputs
        fps = model.fps
        values: dict[str, Any] = {
            "image": _data_uri(request.image_path),
            "end_image": _data_uri(request.end_image_path) if request.end_image_path else None,
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "num_frames": model.frame_count(request.duration, fps),
            "fps": fps,
            "duration": int(request.duration) if float(request.duration).is_integer() else request.duration,
            "seed": request.seed,
            "width": request.width,
            "height": request.height,
        }
        if "resolution" in names:
            short = min(request.width, request.height)
            fitting = sorted((side, name) for name, side in model.resolutions.items() if side >= short)
            values["resolution"] = (fitting[0] if fitting else max((s, n) for n, s in model.resolutions.items()))[1]
        inputs = dict(model.fixed)
        for ours, theirs in names.items():
            if theirs and values[ours] is not None and not (ours == "negative_prompt" and not request.negative_prompt):
                inputs[theirs] = values[ours]
        return inputs

    def _report(self, state: State, data: Mapping[str, Any]) -> StatusReport:
        if state is State.SUCCEEDED:
            return StatusReport(State.SUCCEEDED, progress=1.0)
        if state is State.CANCELED:
            return StatusReport(State.CANCELED, message="canceled on the Cog server")
        error = self._classify(str(data.get("error") or "the prediction failed"))
        return StatusReport(State.FAILED, message=error.message, error=error)

    def _classify(self, message: str) -> BackendError:
        """The error kind a failed prediction's message names (patterns in the catalogue's [errors])."""
        text = re.sub(r"^(?:Prediction failed:\s*)+", "", message.strip()) or "the prediction failed"
        text = f"the Cog model failed: {text}"[:1000]
        kinds: list[tuple[str, type[BackendError]]] = [
            ("content_refused", ContentRefused), ("unavailable", BackendUnavailable),
            ("invalid_request", InvalidRequest),
        ]
        for kind, cls in kinds:
            for pattern in self.catalogue.errors.get(kind, ()):
                if re.search(pattern, message, re.IGNORECASE):
                    return cls(text, backend=self.name)
        return BackendUnavailable(text, backend=self.name)

    def _session_now(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._session_loop is not loop:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60, sock_connect=10))
            self._session_loop = loop
        return self._session

    async def _call(
        self, method: str, path: str, *, json_body: Any = None, headers: Mapping[str, str] | None = None,
        ok_missing: bool = False,
    ) -> Any:
        """One request to the Cog server, its errors mapped onto the backend error tree."""
        if not self.url:
            raise UnsupportedRequest("set ANIMABOT_COG_URL to the Cog server's address", backend=self.name)
        try:
            async with self._session_now().request(method, self.url + path, json=json_body,
                                                   headers=dict(headers or {})) as resp:
                text = await resp.text()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise BackendUnavailable(
                f"the Cog server at {self.url} does not answer ({type(exc).__name__}: {exc})", backend=self.name
            ) from None
        try:
            payload = json.loads(text) if text else {}
        except ValueError:
            payload = {"error": text[:300]}
        if 200 <= status < 300 or (ok_missing and status == 404):
            return payload
        detail = _detail(payload)
        if status == 409:
            raise RateLimited(f"the Cog server is busy: {detail}", backend=self.name,
                              retry_after=self.catalogue.busy_retry_after)
        if status == 422:
            raise InvalidRequest(f"the Cog model refused the input: {detail}", backend=self.name)
        if status == 503:
            raise BackendUnavailable(f"the Cog server is not ready: {detail}", backend=self.name)
        if status >= 500:
            raise BackendUnavailable(f"the Cog server answered {status}: {detail}", backend=self.name)
        raise InvalidRequest(f"the Cog server answered {method} {path} with {status}: {detail}", backend=self.name)

    async def _check_health(self, *, fresh: bool = False) -> dict[str, Any]:
        """``GET /health-check``, reused for ``health_ttl`` seconds so that many polls cost one request."""
        now = time.monotonic()
        if not fresh and self._health is not None and now - self._health[0] < self.health_ttl:
            return self._health[1]
        health = await self._call("GET", "/health-check")
        if not isinstance(health, dict):
            raise BackendUnavailable(f"the Cog server's health check said {str(health)[:100]!r}", backend=self.name)
        self._health = (now, health)
        return health

    def _write_data_uri(self, uri: str, path: Path) -> str:
        """Decode a ``data:`` URI into ``path``; its MIME type."""
        head, sep, payload = uri.partition(",")
        if not sep:
            raise PermanentBackendError("the Cog model returned a malformed data: URI", backend=self.name)
        is_base64 = head.endswith(";base64")
        mime = head[5:].split(";")[0].strip().lower()
        limit = int(self.settings.max_output_bytes)
        if len(payload) * (3 / 4 if is_base64 else 1 / 3) > limit:
            raise PermanentBackendError(
                f"the Cog model's output is larger than ANIMABOT_MAX_OUTPUT_BYTES ({limit} bytes)", backend=self.name
            )
        try:
            data = base64.b64decode(payload, validate=False) if is_base64 else unquote_to_bytes(payload)
        except (binascii.Error, ValueError):
            raise PermanentBackendError("the Cog model returned undecodable base64", backend=self.name) from None
        if len(data) > limit:
            raise PermanentBackendError(
                f"the Cog model's output is larger than ANIMABOT_MAX_OUTPUT_BYTES ({limit} bytes)", backend=self.name
            )
        path.write_bytes(data)
        return mime

    async def _download(self, url: str, path: Path) -> str:
        """Stream ``url`` into ``path`` (allowed hosts only, size-capped); its MIME type."""
        host = (urlsplit(url).hostname or "").lower()
        allowed = [urlsplit(self.url).hostname or "", *getattr(self.settings, "provider_download_hosts", [])]
        if not host_allowed(host, allowed):
            raise PermanentBackendError(
                f"the Cog output is on {host!r}, which is neither the Cog server nor in "
                "ANIMABOT_PROVIDER_DOWNLOAD_HOSTS", backend=self.name,
            )
        limit = int(self.settings.max_output_bytes)
        timeout = aiohttp.ClientTimeout(total=600, sock_connect=10, sock_read=60)
        try:
            async with self._session_now().get(url, timeout=timeout) as resp:
                if resp.status >= 400:
                    raise BackendUnavailable(f"downloading the Cog output gave {resp.status}", backend=self.name)
                if (resp.content_length or 0) > limit:
                    raise PermanentBackendError(
                        f"the Cog output is {resp.content_length} bytes, over ANIMABOT_MAX_OUTPUT_BYTES ({limit})",
                        backend=self.name,
                    )
                size = 0
                with path.open("wb") as fh:
                    async for chunk in resp.content.iter_chunked(1 << 16):
                        size += len(chunk)
                        if size > limit:
                            raise PermanentBackendError(
                                f"the Cog output is over ANIMABOT_MAX_OUTPUT_BYTES ({limit} bytes)", backend=self.name
                            )
                        fh.write(chunk)
                return (resp.content_type or "").lower()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise BackendUnavailable(f"downloading the Cog output failed: {exc}", backend=self.name) from None


def _lost(message: str) -> StatusReport:
    error = BackendUnavailable(message, backend="cog")
    return StatusReport(State.FAILED, message=message, error=error)


def _boot_id(health: Mapping[str, Any]) -> str:
    """What changes when the server restarts: when its setup started."""
    setup = health.get("setup")
    return str(setup.get("started_at") or "") if isinstance(setup, dict) else ""


def _terminal_data(payload: Mapping[str, Any]) -> dict[str, Any]:
    """What a final prediction object leaves in the handle."""
    metrics = payload.get("metrics") if isinstance(payload.get("metrics"), dict) else {}
    return {"status": payload.get("status"), "output": payload.get("output"), "error": payload.get("error"),
            "predict_time": metrics.get("predict_time")}


def _pick_output(output: Any) -> str | None:
    """The video among a prediction's outputs: a string, a list of them, or an object holding one."""
    if isinstance(output, str):
        return output or None
    if isinstance(output, dict):
        for key in ("video", "output", "url", "file"):
            if isinstance(output.get(key), str):
                return output[key]
        candidates: list[Any] = list(output.values())
    elif isinstance(output, list):
        candidates = output
    else:
        return None
    files = [item for item in candidates if isinstance(item, str) and item]
    videos = [f for f in files if f.startswith("data:video/") or re.search(r"\.(mp4|webm|mov|mkv)(\?|$)", f)]
    return (videos or files or [None])[0]


def _data_uri(path: Path) -> str:
    mime = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}.get(path.suffix.lower(), "image/png")
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _detail(payload: Any) -> str:
    """The human part of an error answer: Cog's ``error``, or a 422's ``detail`` list."""
    if isinstance(payload, dict):
        detail = payload.get("detail")
        if isinstance(detail, list):
            parts = []
            for item in detail:
                if isinstance(item, dict):
                    loc = ".".join(str(p) for p in item.get("loc", []) if p not in ("body", "input"))
                    parts.append(f"{loc}: {item.get('msg', '')}" if loc else str(item.get("msg", "")))
            return "; ".join(parts) or str(detail)[:300]
        return str(detail or payload.get("error") or payload)[:300]
    return str(payload)[:300]
