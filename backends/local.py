"""The ``local`` backend: animates a still offline with smooth procedural camera moves.

No model, no network, no settings: it is the default where nothing else is configured and the fallback
of last resort. The rendering itself lives in :mod:`backends.animator`; this module only fits it to the
non-blocking backend protocol. Work runs on a worker thread of the process that submitted it; the
handle names that process and the output file, so any process can tell how it stands: a finished clip
is found by its file, a render whose process is still alive on this machine is running, and one whose
process died is reported as lost (a transient error: the job submits again).

What it cannot do, it refuses by name: an end frame (a camera move over one picture cannot arrive at
another), naming the installed models that can, and painting a picture from text (it has no model
weights, so a prompt-only job needs a text-to-image backend elsewhere).
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from backends import animator, video
from backends.base import (
    Aspect,
    Backend,
    BackendUnavailable,
    CameraMove,
    Capabilities,
    GenerationRequest,
    GenerationResult,
    Handle,
    InvalidRequest,
    State,
    StatusReport,
    UnsupportedRequest,
)


class _Canceled(Exception):
    """Raised from the progress callback to stop a render that was canceled."""


@dataclass
class _Work:
    task: asyncio.Future[None] | None = None
    progress: float = 0.0
    cancel: threading.Event = field(default_factory=threading.Event)


class _LocalCapabilities(Capabilities):
    """Capabilities whose refusal of an end frame names the installed models that can end on one."""

    def refusals(self, request: GenerationRequest) -> list[str]:
        out = super().refusals(request)
        if request.end_image_path is not None:
            from backends.registry import end_frame_models  # the registry loads this module

            others = ", ".join(end_frame_models()) or "none installed"
            out = [r for r in out if not r.startswith("an end frame")]
            out.append(f"local cannot end on a given frame: it only moves a camera over one picture "
                       f"(models that can: {others})")
        return out


class LocalBackend(Backend):
    """Offline procedural animator: camera moves with easing, subject-aware framing, 24 fps H.264."""

    name = "local"
    description = "offline procedural camera moves (no model, no network)"
    capabilities = _LocalCapabilities(
        cameras=frozenset(CameraMove),
        durations=(1.0, 60.0),
        aspects=frozenset(Aspect),
        fps=24,
        good_at=frozenset({"landscape", "product", "text", "other", "unknown"}),
        cost_per_second_usd=0.0,
        needs_network=False,
        min_short_side=128,
        max_long_side=3840,
    )

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self._work: dict[str, _Work] = {}

    async def submit(self, request: GenerationRequest) -> Handle:
        """Start rendering on a worker thread; return at once."""
        if request.end_image_path is not None:
            raise UnsupportedRequest(self.refusals(request)[-1], backend=self.name)
        if not request.image_path.is_file():
            raise InvalidRequest(f"source image {request.image_path} does not exist", backend=self.name)
        out = request.output_dir / request.output_name
        handle = Handle(self.name, uuid.uuid4().hex, {"output": str(out), "fps": request.fps,
                                                      "host": socket.gethostname(), "pid": os.getpid()})
        work = _Work()

        def on_progress(fraction: float) -> None:
            work.progress = fraction
            if work.cancel.is_set():
                raise _Canceled

        work.task = asyncio.ensure_future(asyncio.to_thread(self._render, request, out, on_progress))
        self._work[handle.id] = work
        return handle

    @staticmethod
    def _render(request: GenerationRequest, out: Path, on_progress: Any) -> None:
        with Image.open(request.image_path) as im:
            pixels = np.asarray(im.convert("RGB"))
        animator.render(
            pixels,
            out,
            camera=request.camera,
            motion=request.motion,
            duration=request.duration,
            fps=request.fps,
            width=request.width,
            height=request.height,
            focus=request.focus,
            progress=on_progress,
        )

    async def status(self, handle: Handle) -> StatusReport:
        """Running with progress, finished, or lost (when this process did not start it)."""
        work = self._work.get(handle.id)
        if work is None:
            if Path(handle.data["output"]).is_file():
                return StatusReport(State.SUCCEEDED, progress=1.0)
            if _renders_elsewhere(handle):
                return StatusReport(State.RUNNING)
            error = BackendUnavailable("the render was lost when the process restarted", backend=self.name)
            return StatusReport(State.FAILED, message=error.message, error=error)
        assert work.task is not None
        if not work.task.done():
            return StatusReport(State.RUNNING, progress=work.progress)
        exc = work.task.exception()
        if exc is None:
            return StatusReport(State.SUCCEEDED, progress=1.0)
        if isinstance(exc, _Canceled):
            return StatusReport(State.CANCELED, message="canceled")
        error = BackendUnavailable(f"render failed: {exc}", backend=self.name)
        return StatusReport(State.FAILED, message=error.message, error=error)

    async def result(self, handle: Handle) -> GenerationResult:
        """The rendered MP4."""
        path = Path(handle.data["output"])
        info = await asyncio.to_thread(video.probe, path)
        self._work.pop(handle.id, None)
        return GenerationResult(
            video_path=path, width=info.width, height=info.height, fps=info.fps, frames=info.frames
        )

    async def cancel(self, handle: Handle) -> None:
        """Ask the render to stop at its next frame."""
        work = self._work.get(handle.id)
        if work is not None:
            work.cancel.set()


def _renders_elsewhere(handle: Handle) -> bool:
    """Whether another live process on this machine holds the render (a sibling worker process)."""
    pid = handle.data.get("pid")
    if handle.data.get("host") != socket.gethostname() or not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
