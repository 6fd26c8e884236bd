"""The final encode: H.264 yuv420p MP4 with ``+faststart`` that is guaranteed to fit a byte limit.

One pass of CRF with a VBV cap (:func:`backends.video.vbv_cap`): the encoder can never spend more than
``maxrate·T + bufsize`` bits on any window T, which bounds the whole file with 5 % left for the
container. A clip that already fits and is H.264 4:2:0 is only remuxed. The result is measured; a file
over the limit is never returned.
"""

from __future__ import annotations

import subprocess
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


def _ffmpeg(*args: str) -> None:
    cmd = [video.ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise EncodeError(f"ffmpeg failed: {proc.stderr.strip()[-500:]}")


def change_fps(src: Path, dst: Path, fps: int) -> None:
    """Re-time ``src`` to ``fps`` by dropping or repeating frames (no motion interpolation)."""
    _ffmpeg("-i", str(src), "-vf", f"fps={fps}", *video.encoder_args(crf=18), "-f", "mp4", str(dst))


def fit_to_limit(src: Path, dst: Path, *, limit_bytes: int, crf: int = 20, preset: str = "medium") -> EncodeReport:
    """Write ``src`` to ``dst`` as an MP4 that plays inline on Discord and is at most ``limit_bytes``."""
    info = video.probe(src, count=False)
    tmp = dst.with_name(dst.stem + ".part" + dst.suffix)
    maxrate: int | None = None
    if info.codec == "h264" and info.pix_fmt == "yuv420p" and info.bytes <= limit_bytes:
        _ffmpeg("-i", str(src), "-c", "copy", "-an", "-movflags", "+faststart", "-f", "mp4", str(tmp))
        method = "remux"
    else:
        maxrate, bufsize = video.vbv_cap(limit_bytes, info.duration)
        args = video.encoder_args(crf=crf, preset=preset, maxrate=maxrate, bufsize=bufsize)
        _ffmpeg("-i", str(src), *args, "-f", "mp4", str(tmp))
        method = "capped-crf"
    size = tmp.stat().st_size
    if size > limit_bytes:
        tmp.unlink(missing_ok=True)
        raise EncodeError(f"encoded clip is {size} bytes, over the {limit_bytes}-byte limit")
    tmp.replace(dst)
    return EncodeReport(path=dst, bytes=size, limit=limit_bytes, method=method, maxrate=maxrate)
