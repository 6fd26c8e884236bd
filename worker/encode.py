"""The final encode: H.264 yuv420p MP4 with ``+faststart`` that is guaranteed to fit a byte limit.

One pass of CRF with a VBV cap: the encoder can never spend more than ``maxrate·T + bufsize`` bits on
any window T, so choosing ``maxrate·(D+1) ≤ 0.95·limit`` with ``bufsize = maxrate`` bounds the whole
file (5 % is left for the container). A clip that already fits and is H.264 4:2:0 is only remuxed.
The result is measured; a file over the limit is never returned.
"""

from __future__ import annotations

import subprocess

import imageio_ffmpeg
from dataclasses import dataclass
from pathlib import Path

from backends import video


class EncodeError(RuntimeError):
    """ffmpeg failed or the clip could not be brought under the limit."""


@dataclass(frozen=True)
class EncodeReport:
    """What the encode did."""

    path: Path
    bytes: int
    limit: int
    method: str
    maxrate: int | None = None


def vbv_maxrate(limit_bytes: int, duration: float) -> int:
    """The VBV max rate (bit/s) that guarantees a clip of ``duration`` s fits in ``limit_bytes``."""
    return int(0.95 * 8 * limit_bytes / (duration + 1.0))


def _ffmpeg(*args: str) -> None:
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise EncodeError(f"ffmpeg failed: {proc.stderr.strip()[-500:]}")


def change_fps(src: Path, dst: Path, fps: int) -> None:
    """Re-time ``src`` to ``fps`` by dropping or repeating frames (no motion interpolation)."""
    _ffmpeg(
        "-i", str(src), "-vf", f"fps={fps}", "-c:v", "libx264", "-preset", "veryfast", "-crf", "18",
        "-pix_fmt", "yuv420p", "-an", str(dst),
    )


def fit_to_limit(src: Path, dst: Path, *, limit_bytes: int, crf: int = 20, preset: str = "medium") -> EncodeReport:
    """Write ``src`` to ``dst`` as an MP4 that plays inline on Discord and is at most ``limit_bytes``."""
    info = video.probe(src)
    tmp = dst.with_name(dst.stem + ".part" + dst.suffix)
    if info.codec == "h264" and info.pix_fmt == "yuv420p" and info.bytes <= limit_bytes:
        _ffmpeg("-i", str(src), "-c", "copy", "-an", "-movflags", "+faststart", "-f", "mp4", str(tmp))
        method, maxrate = "remux", None
    else:
        maxrate = vbv_maxrate(limit_bytes, info.duration)
        _ffmpeg(
            "-i", str(src), "-c:v", "libx264", "-preset", preset, "-profile:v", "high",
            "-pix_fmt", "yuv420p", "-crf", str(crf), "-maxrate", str(maxrate), "-bufsize", str(maxrate),
            "-movflags", "+faststart", "-an", "-f", "mp4", str(tmp),
        )
        method = "capped-crf"
    size = tmp.stat().st_size
    if size > limit_bytes:
        tmp.unlink(missing_ok=True)
        raise EncodeError(f"encoded clip is {size} bytes, over the {limit_bytes}-byte limit")
    tmp.replace(dst)
    return EncodeReport(path=dst, bytes=size, limit=limit_bytes, method=method, maxrate=maxrate)
