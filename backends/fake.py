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
"""

from __future__ import annotations

import asyncio
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
    )

    def __init__(self, settings: Any, *, latency: float = 0.0, outcomes: Iterable[str] = ()) -> None:
        super().__init__(settings)
        self.latency = latency or float(getattr(settings, "fake_latency", 0.0) or 0.0)
        self.outcomes = deque(outcomes)
        unknown = set(self.outcomes) - OUTCOMES
        if unknown:
            raise ValueError(f"unknown fake outcomes {sorted(unknown)}; use {sorted(OUTCOMES)}")
        self.submitted: list[GenerationRequest] = []
        self.canceled: set[str] = set()

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
