"""A Cog model server emulator (the HTTP API of coglet 0.23.1) on 127.0.0.1, for faults the real one cannot show.

The real server runs in the tests too (:mod:`tests.emulators.cog_predictor`); this one answers the same
routes the same way (``/work/shared/reference/providers.md`` §3, checked against coglet), starts
instantly, and can be told to misbehave::

    async with CogEmulator() as cog:                 # cog.url = "http://127.0.0.1:PORT"
        settings.cog_url = cog.url
        handle = await backend.submit(request)       # PUT /predictions/{id}, Prefer: respond-async
        await cog.wait_for(lambda: cog.predictions[handle.id].status == "succeeded")
        cog.restart()                                # predictions lost, no webhooks, new setup time

Routes: ``GET /`` (index), ``GET /health-check`` (``READY``/``BUSY``, or ``health_status`` when set, and
``setup.started_at``, which changes on :meth:`restart`), ``PUT /predictions/{id}`` (idempotent while
running: 202 with the existing prediction; 409 ``At capacity`` when every slot is busy; 503 while
``STARTING``; 422 ``detail`` for input breaking ``input_schema``), ``POST /predictions`` (id made up),
``GET /predictions/{id}`` (405: no polling), ``POST /predictions/{id}/cancel`` (200 ``{}``, 404 when
unknown or finished), ``GET /files/{name}`` (outputs, with ``output_mode="url"``). Without
``Prefer: respond-async`` the PUT/POST waits and answers 200 with the final prediction.

Webhooks go to the prediction's ``webhook`` as coglet sends them: ``start`` as ``processing``, then
``completed`` with ``status`` succeeded/failed/canceled, ``output`` (a base64 ``data:`` URI, or a URL
with ``output_mode="url"``), ``error``, ``metrics.predict_time``; ``webhook_events_filter`` honoured;
the final one retried on 5xx or connection errors (``webhook_retries`` times, 0.2 s doubling).

The "model" makes a real small MP4 (a zoom into the image at its size, long side capped at 512); markers
in the prompt change that, as in the predictor: ``[slow=S]``, ``[hang]``, ``[fail]``, ``[oom]``,
``[nsfw]``, ``[crash]`` (fails "Worker crashed" and leaves the server ``UNHEALTHY`` with its slot
poisoned, like coglet), ``[frozen]``, ``[garbage]``, ``[image]``.

Test API: ``predictions`` (id → :class:`Prediction`: ``status``, ``input``, ``runs``), ``starts`` (every
generation started, in order), ``requests`` (method, path, status), ``webhooks`` (what was POSTed, with
the answer), ``wait_for(predicate)``; knobs ``slots``, ``health_status``, ``duplicate_webhooks`` (send
each twice), ``late_processing`` (a ``processing`` webhook with the output after the final one, as coglet
sends output events), ``drop_final_webhooks`` (the final webhook never arrives), ``put_errors`` (queue of
``(status, body)`` answers for the next PUTs), ``restart()``.

What it does NOT cover: SSE streaming (``Accept: text/event-stream``), ``--upload-url``, log/output
webhooks other than ``late_processing``, trainings, ``/shutdown``, real schema validation beyond
``type``/``minimum``/``maximum``/``required`` of ``input_schema``, and coglet's cancellation of a sync
predictor: it stops at the next Python bytecode, and a cancel that arrives while coglet still prepares
the inputs is lost (here every cancel is immediate).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web
from PIL import Image

from backends import animator, video
from backends.base import CameraMove

from .server import LocalServer, cancel_tasks

AT_CAPACITY = {"error": "At capacity - all prediction slots busy", "status": "failed"}
MAX_SIDE = 512


@dataclass
class Prediction:
    """One prediction the emulator holds."""

    id: str
    input: dict[str, Any]
    webhook: str = ""
    events: tuple[str, ...] = ("start", "output", "logs", "completed")
    status: str = "starting"
    output: Any = None
    error: str | None = None
    logs: str = ""
    predict_time: float | None = None
    runs: int = 1
    lost: bool = False
    task: asyncio.Task[None] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def to_json(self, *, with_input: bool = True) -> dict[str, Any]:
        """The prediction object as coglet serialises it."""
        body: dict[str, Any] = {"id": self.id, "logs": self.logs, "status": self.status,
                                "metrics": {"predict_time": self.predict_time} if self.predict_time else {}}
        if with_input:
            body["input"] = self.input
        if self.output is not None:
            body["output"] = self.output
        if self.error is not None:
            body["error"] = self.error
        return body


class CogEmulator(LocalServer):
    """An aiohttp app speaking coglet's prediction API (see the module docstring)."""

    def __init__(
        self,
        *,
        slots: int = 1,
        output_mode: str = "data",
        input_schema: dict[str, dict[str, Any]] | None = None,
        webhook_retries: int = 6,
        webhook_backoff: float = 0.2,
    ) -> None:
        super().__init__()
        self.slots = slots
        self.output_mode = output_mode
        self.input_schema = input_schema
        self.webhook_retries = webhook_retries
        self.webhook_backoff = webhook_backoff
        self.health_status: str | None = None
        self.duplicate_webhooks = False
        self.late_processing = False
        self.drop_final_webhooks = False
        self.put_errors: list[tuple[int, dict[str, Any]]] = []
        self.predictions: dict[str, Prediction] = {}
        self.starts: list[str] = []
        self.requests: list[tuple[str, str, int]] = []
        self.webhooks: list[dict[str, Any]] = []
        self.files: dict[str, tuple[bytes, str]] = {}
        self.poisoned = 0
        self.started_at = _now()
        self.url = ""
        self._client: aiohttp.ClientSession | None = None
        self._senders: set[asyncio.Task[None]] = set()

    # -- life cycle ---------------------------------------------------------------------------------

    def _make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[self._log])
        app.router.add_get("/", self._index)
        app.router.add_get("/health-check", self._health)
        app.router.add_put("/predictions/{id}", self._put)
        app.router.add_post("/predictions", self._post)
        app.router.add_get("/predictions/{id}", self._get)
        app.router.add_post("/predictions/{id}/cancel", self._cancel)
        app.router.add_get("/files/{name}", self._file)
        return app

    async def _on_start(self) -> None:
        self.url = self.base_url
        self._client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))

    async def _on_stop(self) -> None:
        """Stop every prediction and webhook."""
        for p in self.predictions.values():
            p.lost = True
        await cancel_tasks(*self._senders, *(p.task for p in self.predictions.values() if p.task))
        if self._client is not None:
            await self._client.close()
            self._client = None

    def restart(self) -> None:
        """The server process restarts: every prediction is gone without a webhook; setup time changes."""
        for p in self.predictions.values():
            p.lost = True
            if p.task is not None:
                p.task.cancel()
        self.predictions.clear()
        self.poisoned = 0
        self.started_at = _now()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``predicate()`` holds; ``TimeoutError`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError("condition not met in time")
            await asyncio.sleep(0.01)

    @property
    def running(self) -> list[Prediction]:
        """Predictions holding a slot."""
        return [p for p in self.predictions.values() if p.status in ("starting", "processing")]

    # -- routes -------------------------------------------------------------------------------------

    @web.middleware
    async def _log(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            self.requests.append((request.method, request.path, exc.status))
            raise
        self.requests.append((request.method, request.path, response.status))
        return response

    async def _index(self, request: web.Request) -> web.Response:
        return web.json_response({
            "cog_version": "0.23.1", "healthcheck_url": "/health-check", "predictions_url": "/predictions",
            "predictions_idempotent_url": "/predictions/{prediction_id}",
            "predictions_cancel_url": "/predictions/{prediction_id}/cancel",
        })

    def _state(self) -> str:
        if self.health_status:
            return self.health_status
        if self.poisoned:
            return "UNHEALTHY"
        return "BUSY" if len(self.running) >= self.slots else "READY"

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({
            "status": self._state(),
            "setup": {"started_at": self.started_at, "completed_at": self.started_at, "status": "succeeded",
                      "logs": "[emulator] ready\n"},
            "version": {"coglet": "0.23.1", "python_sdk": "0.23.1", "emulator": True},
        })

    async def _get(self, request: web.Request) -> web.Response:
        return web.Response(status=405, headers={"Allow": "PUT"})

    async def _put(self, request: web.Request) -> web.Response:
        return await self._create(request, request.match_info["id"])

    async def _post(self, request: web.Request) -> web.Response:
        return await self._create(request, None)

    async def _create(self, request: web.Request, prediction_id: str | None) -> web.Response:
        if self.put_errors:
            status, body = self.put_errors.pop(0)
            return web.json_response(body, status=status)
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"detail": "invalid JSON"}, status=400)
        if not isinstance(body, dict) or not isinstance(body.get("input", {}), dict):
            return web.json_response({"detail": [{"loc": ["body", "input"], "msg": "must be an object",
                                                  "type": "value_error"}]}, status=422)
        state = self._state()
        if state == "STARTING":
            return web.json_response({"detail": "Setup has not finished yet. Wait until it has finished, or "
                                                "GET /health-check for status."}, status=503)
        prediction_id = prediction_id or body.get("id") or uuid.uuid4().hex
        existing = self.predictions.get(prediction_id)
        asynchronous = "respond-async" in request.headers.get("Prefer", "")
        if existing is not None and existing.status in ("starting", "processing"):
            return web.json_response(existing.to_json(), status=202)  # idempotent while it runs
        if len(self.running) + self.poisoned >= self.slots or state in ("SETUP_FAILED", "DEFUNCT"):
            return web.json_response(AT_CAPACITY, status=409)
        inputs, problems = self._validate(body.get("input") or {})
        if problems:
            return web.json_response({"detail": problems}, status=422)
        events = body.get("webhook_events_filter") or ("start", "output", "logs", "completed")
        prediction = Prediction(prediction_id, inputs, webhook=body.get("webhook") or "", events=tuple(events))
        if existing is not None:
            prediction.runs = existing.runs + 1
        self.predictions[prediction_id] = prediction
        self.starts.append(prediction_id)
        prediction.task = asyncio.create_task(self._run(prediction))
        if asynchronous:
            return web.json_response({"id": prediction_id, "status": "starting"}, status=202)
        await prediction.done.wait()
        return web.json_response(prediction.to_json(), status=200)

    async def _cancel(self, request: web.Request) -> web.Response:
        prediction = self.predictions.get(request.match_info["id"])
        if prediction is None or prediction.status not in ("starting", "processing") or prediction.task is None:
            return web.json_response({}, status=404)
        prediction.task.cancel()
        return web.json_response({})

    async def _file(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self.files:
            raise web.HTTPNotFound()
        data, mime = self.files[name]
        return web.Response(body=data, content_type=mime)

    # -- predictions --------------------------------------------------------------------------------

    def _validate(self, inputs: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        if self.input_schema is None:
            return dict(inputs), []
        kept, problems = {}, []
        for name, rule in self.input_schema.items():
            if name not in inputs:
                if rule.get("required"):
                    problems.append({"loc": ["body", "input", name], "msg": "field required", "type": "value_error"})
                continue
            value = inputs[name]
            kind = {"integer": int, "number": (int, float), "string": str}.get(rule.get("type", ""), object)
            if not isinstance(value, kind) or isinstance(value, bool):
                msg = f"{value!r} is not of type {rule.get('type')!r}"
            elif "minimum" in rule and value < rule["minimum"]:
                msg = f"{value} is less than the minimum of {rule['minimum']}"
            elif "maximum" in rule and value > rule["maximum"]:
                msg = f"{value} is greater than the maximum of {rule['maximum']}"
            else:
                kept[name] = value
                continue
            problems.append({"loc": ["body", "input", name], "msg": msg, "type": "value_error"})
        return kept, problems  # unknown keys are dropped, as coglet does with a schema

    async def _run(self, p: Prediction) -> None:
        started = time.monotonic()
        p.status = "processing"
        self._send(p, "start")
        prompt = str(p.input.get("prompt", ""))
        p.logs = f"run: prompt={prompt!r}\n"
        try:
            slow = re.search(r"\[slow(?:=([\d.]+))?\]", prompt)
            if slow:
                await asyncio.sleep(float(slow.group(1) or 1.5))
            if "[hang]" in prompt:
                await asyncio.sleep(3600)
            if "[crash]" in prompt:
                self.poisoned += 1
                raise RuntimeError("Worker crashed")
            for marker, message in (("[fail]", "ValueError: the model failed on purpose ([fail])"),
                                    ("[oom]", "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"),
                                    ("[nsfw]", "RuntimeError: NSFW content detected by the safety checker")):
                if marker in prompt:
                    raise RuntimeError(f"Prediction failed: Prediction failed: {message}")
            data, mime, suffix = await asyncio.to_thread(_make_output, p.input)
        except asyncio.CancelledError:
            if p.lost:
                return
            p.status = "canceled"
        except Exception as exc:
            p.status, p.error = "failed", str(exc)
        else:
            p.status = "succeeded"
            if self.output_mode == "url":
                name = f"{p.id}{suffix}"
                self.files[name] = (data, mime)
                p.output = f"{self.url}/files/{name}"
            else:
                p.output = f"data:{mime};base64," + base64.b64encode(data).decode("ascii")
        p.predict_time = round(time.monotonic() - started, 3)
        p.done.set()
        if self.drop_final_webhooks:
            return
        self._send(p, "completed")
        if self.duplicate_webhooks:
            self._send(p, "completed")
        if self.late_processing and p.output is not None:
            late = {**p.to_json(with_input=False), "status": "processing", "output": [p.output], "metrics": {}}
            self._send(p, "output", late)

    def _send(self, p: Prediction, event: str, body: dict[str, Any] | None = None) -> None:
        if not p.webhook or (event not in p.events and not (event == "output" and body is not None)):
            return
        payload = body or p.to_json(with_input=False)
        task = asyncio.create_task(self._deliver(p.webhook, payload, final=event == "completed"))
        self._senders.add(task)
        task.add_done_callback(self._senders.discard)

    async def _deliver(self, url: str, payload: dict[str, Any], *, final: bool) -> None:
        assert self._client is not None
        tries = self.webhook_retries if final else 1
        for attempt in range(tries):
            record = {"url": url, "body": payload, "status": None}
            self.webhooks.append(record)
            try:
                async with self._client.post(url, json=payload) as resp:
                    record["status"] = resp.status
                    if resp.status < 500:
                        return
            except (aiohttp.ClientError, OSError) as exc:
                record["status"] = type(exc).__name__
            if attempt + 1 < tries:
                await asyncio.sleep(self.webhook_backoff * 2**attempt)


def _make_output(inputs: dict[str, Any]) -> tuple[bytes, str, str]:
    """What the "model" returns for ``inputs``: (bytes, MIME type, file suffix)."""
    prompt = str(inputs.get("prompt", ""))
    if "[garbage]" in prompt:
        return b"\x00not a video at all\x00" * 100, "video/mp4", ".mp4"
    rgb = _decode_image(inputs.get("image"))
    if "[image]" in prompt:
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, "PNG")
        return buf.getvalue(), "image/png", ".png"
    h, w = rgb.shape[:2]
    scale = min(1.0, MAX_SIDE / max(w, h))
    width, height = max(2, int(w * scale) // 2 * 2), max(2, int(h * scale) // 2 * 2)
    fps = int(inputs.get("fps") or 8)
    frames = int(inputs.get("num_frames") or 16)
    with _tempdir() as tmp:
        out = tmp / "clip.mp4"
        if "[frozen]" in prompt:
            still = np.ascontiguousarray(np.asarray(Image.fromarray(rgb).resize((width, height))))
            with video.VideoWriter(out, width=width, height=height, fps=fps) as writer:
                for _ in range(frames):
                    writer.write(still)
        else:
            animator.render(rgb, out, camera=CameraMove.ZOOM_IN, motion=2, duration=frames / fps, fps=fps,
                            width=width, height=height)
        return out.read_bytes(), "video/mp4", ".mp4"


def _decode_image(value: Any) -> np.ndarray:
    if not isinstance(value, str) or not value.startswith("data:") or "," not in value:
        raise ValueError(f"image must be a data: URI, got {str(value)[:40]!r}")
    raw = base64.b64decode(value.split(",", 1)[1])
    with Image.open(io.BytesIO(raw)) as im:
        return np.asarray(im.convert("RGB"))


@contextlib.contextmanager
def _tempdir() -> Any:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="cog-emulator-") as tmp:
        yield Path(tmp)


def _now() -> str:
    return datetime.now(UTC).isoformat()
