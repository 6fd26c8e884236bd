"""``fake``: a backend for tests that implements the real protocol with scripted outcomes.

It holds no thread and no connection while "working": the handle carries when the work is due and how
it ends, so any number of generations can be in flight, across process restarts, like a remote model.
Outcomes, consumed one per submit (then ``ok`` forever)::

    ok        a real H.264 clip zooming into the source (its first frame is the source, as with real
              models), at the requested size, fps and duration
    frozen    a real clip whose frames never change
    flicker   the pan, with brightness jumping up and down every frame
    drift     the pan, with colours melting steadily away from the source
    black     the pan, with its middle third black
    garbage   a file that is not a video
    fail      FAILED with a transient error (outage)
    invalid   FAILED with a permanent error for this backend (the job moves on to the next)
    refuse    FAILED with a moderation refusal (permanent)
    hang      RUNNING forever

    backend = FakeBackend(settings, latency=0.5, outcomes=["fail", "ok"])

Where the backend is created for us (a worker process builds its own from the registry), the script
travels with the job instead: a ``model`` such as ``"fail,hang,ok"`` gives attempt *n* the *n*-th
outcome (the last one repeats), and ``settings.fake_latency`` sets the latency.

It accepts an end frame (and notes it in the handle; the clip still zooms into the start picture), and
it paints stills for prompt-only jobs (:meth:`FakeBackend.imagine`): **a fake picture**, not a model's. It
is a deterministic procedural landscape drawn from the prompt and the seed (sky, sun and hills whose
colours and shapes follow a hash of the words; the same prompt and seed give the same pixels), textured
enough for the pipeline and the quality gate to treat it like a photograph. The model of a still is
``"still"`` or a script of ``ok``, ``fail`` (outage), ``invalid`` and ``refuse``, one per try (e.g.
``ANIMABOT_TEXT_TO_IMAGE=fake:fail,ok``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from backends import animator, video
from backends.base import (
    Aspect,
    Backend,
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
    State,
    StatusReport,
    WebhookNotice,
    WebhookRejected,
)

OUTCOMES = frozenset(
    {"ok", "frozen", "flicker", "drift", "black", "garbage", "fail", "invalid", "refuse", "hang"}
)
DEFECTS = frozenset({"frozen", "flicker", "drift", "black"})
STILL_OUTCOMES = frozenset({"ok", "fail", "invalid", "refuse"})


class FakeBackend(Backend):
    """Deterministic test double: scripted outcomes after a fixed latency."""

    name = "fake"
    description = "test double with scripted outcomes (for tests and benchmarks)"
    capabilities = Capabilities(
        cameras=frozenset(CameraMove),
        durations=(1.0, 30.0),
        aspects=frozenset(Aspect),
        fps=24,
        cost_per_second_usd=0.01,
        min_short_side=64,
        end_frame=True,
    )
    image_models = ("still",)

    @classmethod
    def image_model(cls, model: str | None) -> str | None:
        """``"still"`` (the default), or a script of still outcomes such as ``"fail,ok"``."""
        if not model or model == "still":
            return "still"
        parts = [part.strip() for part in model.split(",")]
        return model if all(part in STILL_OUTCOMES for part in parts) else None

    def __init__(self, settings: Any, *, latency: float = 0.0, outcomes: Iterable[str] = ()) -> None:
        super().__init__(settings)
        self.latency = latency or float(getattr(settings, "fake_latency", 0.0) or 0.0)
        self.outcomes = deque(outcomes)
        unknown = set(self.outcomes) - OUTCOMES
        if unknown:
            raise ValueError(f"unknown fake outcomes {sorted(unknown)}; use {sorted(OUTCOMES)}")
        self.submitted: list[GenerationRequest] = []
        self.painted: list[ImageRequest] = []
        self.canceled: set[str] = set()

    async def imagine(self, request: ImageRequest) -> ImageResult:
        """Paint the fake picture of the prompt (or fail as the model's script says for this try)."""
        self.painted.append(request)
        script = [p.strip() for p in (request.model or "").split(",") if p.strip() in STILL_OUTCOMES]
        outcome = script[min(request.attempt, len(script)) - 1] if script else "ok"
        if outcome == "fail":
            raise BackendUnavailable("the fake painter had an outage", backend=self.name)
        if outcome == "invalid":
            raise InvalidRequest("the fake painter rejected the request", backend=self.name)
        if outcome == "refuse":
            raise ContentRefused("the fake painter's moderation refused the prompt", backend=self.name)
        pixels = await asyncio.to_thread(paint_picture, request.prompt, request.seed, request.width, request.height)
        request.output_path.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(Image.fromarray(pixels).save, request.output_path, compress_level=1)
        return ImageResult(image_path=request.output_path, width=request.width, height=request.height,
                           metadata={"model": "still", "fake": True})

    async def submit(self, request: GenerationRequest) -> Handle:
        """Record the request and return a handle that says when and how it ends."""
        self.submitted.append(request)
        outcome = self.outcomes.popleft() if self.outcomes else _scripted(request)
        return Handle(
            self.name,
            uuid.uuid4().hex,
            {
                "outcome": outcome,
                "due": time.time() + self.latency,
                "submitted": time.time(),
                "request": {
                    "image": str(request.image_path),
                    "output": str(request.output_dir / request.output_name),
                    "width": request.width,
                    "height": request.height,
                    "fps": request.fps,
                    "duration": request.duration,
                    "end_image": str(request.end_image_path) if request.end_image_path else None,
                },
            },
        )

    async def status(self, handle: Handle) -> StatusReport:
        """Where the scripted work stands, computed from the handle alone."""
        if handle.id in self.canceled:
            return StatusReport(State.CANCELED, message="canceled")
        outcome, due = handle.data["outcome"], handle.data["due"]
        now = time.time()
        if outcome == "hang" or now < due:
            span = max(due - handle.data["submitted"], 1e-9)
            return StatusReport(State.RUNNING, progress=min(1.0, (now - handle.data["submitted"]) / span))
        if outcome == "fail":
            error = BackendUnavailable("the fake provider had an outage", backend=self.name)
            return StatusReport(State.FAILED, message=error.message, error=error)
        if outcome == "invalid":
            error = InvalidRequest("the fake provider rejected the request", backend=self.name)
            return StatusReport(State.FAILED, message=error.message, error=error)
        if outcome == "refuse":
            error = ContentRefused("the fake provider's moderation refused the input", backend=self.name)
            return StatusReport(State.FAILED, message=error.message, error=error)
        return StatusReport(State.SUCCEEDED, progress=1.0)

    async def result(self, handle: Handle) -> GenerationResult:
        """Write the scripted output file and describe it."""
        req = handle.data["request"]
        out = Path(req["output"])
        out.parent.mkdir(parents=True, exist_ok=True)
        frames = round(req["fps"] * req["duration"])
        outcome = handle.data["outcome"]
        if outcome == "garbage":
            out.write_bytes(b"\x00garbage, not a video\x00" * 64)
        else:
            await asyncio.to_thread(self._render, req, out, outcome)
        return GenerationResult(
            video_path=out, width=req["width"], height=req["height"], fps=req["fps"], frames=frames
        )

    @staticmethod
    def _render(req: dict[str, Any], out: Path, outcome: str) -> None:
        with Image.open(req["image"]) as im:
            pixels = np.asarray(im.convert("RGB"))
        if outcome not in DEFECTS:
            animator.render(
                pixels, out, camera=CameraMove.ZOOM_IN, motion=2, duration=req["duration"],
                fps=req["fps"], width=req["width"], height=req["height"],
            )
            return
        w, h, n = req["width"], req["height"], round(req["fps"] * req["duration"])
        base = cv2.resize(pixels, (w, h), interpolation=cv2.INTER_AREA)
        with video.VideoWriter(out, width=w, height=h, fps=req["fps"]) as writer:
            for i in range(n):
                writer.write(_defective_frame(base, outcome, i, n))

    async def cancel(self, handle: Handle) -> None:
        """Mark the handle canceled."""
        self.canceled.add(handle.id)

    async def verify_webhook(self, headers: Mapping[str, str], body: bytes) -> WebhookNotice:
        """A fake provider's webhook is ``{"id": <handle id>}``; it is only a hint to check the handle."""
        try:
            request_id = json.loads(body)["id"]
        except (ValueError, KeyError, TypeError):
            raise WebhookRejected(400, 'a fake webhook is JSON {"id": <generation id>}') from None
        return WebhookNotice(request_id=str(request_id))


def _scripted(request: GenerationRequest) -> str:
    """The outcome a ``model`` script gives this attempt (``"ok"`` without a script)."""
    script = [part.strip() for part in (request.model or "").split(",") if part.strip() in OUTCOMES]
    return script[min(request.attempt, len(script)) - 1] if script else "ok"


def _defective_frame(base: np.ndarray, defect: str, i: int, n: int) -> np.ndarray:
    """Frame ``i`` of ``n`` of a slow pan over ``base`` with one known defect."""
    if defect == "frozen":
        return base
    shift = np.float32([[1, 0, -0.1 * base.shape[1] * i / n], [0, 1, 0]])
    frame = cv2.warpAffine(base, shift, (base.shape[1], base.shape[0]), borderMode=cv2.BORDER_REFLECT)
    if defect == "flicker":
        return cv2.convertScaleAbs(frame, alpha=1.25 if i % 2 else 0.75)
    if defect == "black":
        return np.zeros_like(frame) if n // 3 <= i < 2 * n // 3 else frame
    hsv = cv2.cvtColor(frame, cv2.COLOR_RGB2HSV)  # drift: the hue walks half way round the wheel
    hsv[..., 0] = (hsv[..., 0].astype(np.int32) + int(90 * i / n)) % 180
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def paint_picture(prompt: str, seed: int, width: int, height: int) -> np.ndarray:
    """A fake still for ``prompt``: a procedural landscape, ``height × width × 3`` RGB, deterministic.

    The words pick the colours and the shape of the hills (a hash, not understanding); ``seed`` varies
    the rest. Soft shapes plus fine grain: enough detail for the quality gate to see a camera move.
    """
    digest = hashlib.sha256(f"{prompt}\x00{seed}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "big"))
    hue = digest[8] / 255.0
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = xs / max(1, width - 1), ys / max(1, height - 1)

    def colour(h: float, s: float, val: float) -> np.ndarray:
        hsv = np.uint8([[[int(h % 1.0 * 179), int(s * 255), int(val * 255)]]])
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)

    top, bottom = colour(hue, 0.55, 0.55), colour(hue + 0.08, 0.35, 0.95)
    image = top + (bottom - top) * v[..., None]
    sun_x, sun_y, radius = 0.2 + 0.6 * digest[9] / 255, 0.15 + 0.2 * digest[10] / 255, 0.06 + 0.05 * digest[11] / 255
    glow = np.exp(-(((u - sun_x) * width / height) ** 2 + (v - sun_y) ** 2) / (2 * radius**2))
    image += (colour(hue + 0.5, 0.3, 1.0) - image) * np.clip(glow * 1.5, 0, 1)[..., None]
    for layer in range(3):  # hills, far to near: each lower, darker and more saturated
        phase, freq = rng.uniform(0, 2 * np.pi, 3), rng.uniform(1.5, 6.0, 3) * (layer + 1)
        ridge = 0.45 + 0.15 * layer + sum(0.05 / (k + 1) * np.sin(2 * np.pi * freq[k] * u[0] + phase[k])
                                          for k in range(3))
        mask = v >= ridge[None, :]
        shade = colour(hue + 0.3 + 0.07 * layer, 0.4 + 0.15 * layer, 0.6 - 0.15 * layer)
        depth = np.clip(v - ridge[None, :], 0, 1)[..., None]
        image = np.where(mask[..., None], image * 0.15 + shade * 0.85 * (1.0 - 0.4 * depth), image)
    grain = cv2.GaussianBlur(rng.normal(0, 1, (height, width)).astype(np.float32), (0, 0), 1.2)
    image += grain[..., None] * 14.0
    return np.clip(image, 0, 255).astype(np.uint8)
