"""Judges a generated clip before a user sees it: accept, or reject with named reasons and the metrics.

This first gate checks what is cheap and certain: the clip decodes from its first frame to its last, and
its resolution, frame count and duration match the request. Rejected outputs are retried silently by
the pipeline; they never reach the user.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backends import video


@dataclass(frozen=True)
class Verdict:
    """The gate's decision on one clip."""

    accepted: bool
    reasons: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """``{"accepted": ..., "reasons": [...], "metrics": {...}}``."""
        return {"accepted": self.accepted, "reasons": list(self.reasons), "metrics": dict(self.metrics)}


def judge(path: Path, *, width: int, height: int, fps: float, duration: float) -> Verdict:
    """Check that ``path`` decodes and matches the requested size, frame rate and length."""
    try:
        info = video.probe(path)
    except Exception as exc:  # any decode failure is a rejection, not a crash
        return Verdict(False, ["undecodable"], {"error": str(exc)[:300]})
    metrics = {
        "width": info.width, "height": info.height, "fps": round(info.fps, 3),
        "frames": info.frames, "duration": round(info.duration, 3), "bytes": info.bytes,
    }
    reasons = []
    if info.frames == 0:
        reasons.append("undecodable")
    if (info.width, info.height) != (width, height):
        reasons.append("wrong_resolution")
    if abs(info.duration - duration) > max(0.25, 0.05 * duration):
        reasons.append("wrong_duration")
    if info.frames < 0.95 * fps * duration:
        reasons.append("too_few_frames")
    return Verdict(not reasons, reasons, metrics)
