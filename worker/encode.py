"""The final encode: H.264 yuv420p MP4 with ``+faststart`` that is guaranteed to fit a byte limit.

::

    report = fit_to_limit(src, dst, limit_bytes=10 * 2**20)   # EncodeReport(method="capped-crf", ...)
    plan = plan_encode(1920, 1080, fps=24, duration=10, limit_bytes=10 * 2**20)   # what it would do

One pass of CRF with a VBV cap (:func:`backends.video.vbv_cap`): the encoder can never spend more than
``maxrate·T + bufsize`` bits on any window T, which bounds the whole file with 5 % left for the
container. CRF still decides the quality wherever the cap does not bind, so an easy clip comes out
smaller than the limit instead of being padded up to it.

The resolution is chosen from the same budget: a cap that leaves fewer than :data:`MIN_BITS_PER_PIXEL`
bits per pixel per frame starves x264 at that size, and a smaller picture (scaled back up by the
player) looks better than a blocky large one. The rule takes the largest size of :data:`SIZE_LADDER`
(short side, aspect kept, never upscaled) whose bits per pixel reach the threshold::

    budget (10 s, 24 fps)   maxrate     bit/px at 1080p   chosen
    10 MiB                  7.24 Mb/s   0.146             1920×1080
    2.5 MiB                 1.81 Mb/s   0.036             1920×1080
    1 MiB                   0.72 Mb/s   0.015             1280×720  (0.033)
    0.3 MiB                 0.22 Mb/s   0.004             768×432   (0.027)

The 0.02 threshold is measured, not the reference's rule of thumb (downscale below ≈2.5 Mb/s at 720p,
0.11 bit/px): the same 10 s 1080p clips encoded at four sizes under four limits and scored at 1080p
kept 1080p best at 0.036 bit/px and above; 720p beat it at 0.018 on a grainy clip and at 0.009 on a
clean one (bench/README.md, "Fitting a clip for delivery").

x264 runs at ``faster``, CRF 19 (:data:`DEFAULT_PRESET`, :data:`DEFAULT_CRF`): under the cap that beat
``medium`` at CRF 20 and a two-pass ``medium`` encode on SSIM, in about half the two-pass time. A clip
that already fits and is H.264 4:2:0 is only remuxed. The result is measured: a file over the limit is
never returned (one retry at a lower cap, then :class:`EncodeError`).
"""

from __future__ import annotations

import math
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from backends import video

__all__ = [
    "DEFAULT_CRF",
    "DEFAULT_PRESET",
    "MIN_BITS_PER_PIXEL",
    "SIZE_LADDER",
    "EncodeError",
    "EncodePlan",
    "EncodeReport",
    "change_fps",
    "fit_to_limit",
    "plan_encode",
]

#: x264 settings of the delivery encode. Under a VBV cap x264 ``faster`` at CRF 19 came out better
#: (SSIM) than ``medium`` at CRF 20 on every clip and limit measured, for 60-75 % of the CPU: with its
#: shorter lookahead it spends more of the capped budget. Without a binding cap it is as good and a
#: little larger (bench/README.md, "Fitting a clip for delivery").
DEFAULT_CRF = 19
DEFAULT_PRESET = "faster"
#: Least VBV bits per pixel per frame worth keeping a size for (measured; see the module docstring).
MIN_BITS_PER_PIXEL = 0.02
#: Sizes tried when the budget is short, by short side; the source's own size is always tried first.
SIZE_LADDER = (2160, 1440, 1080, 720, 540, 432, 360, 288, 240, 180, 144)
_RETRY_FACTOR = 0.8  # a second pass, should the first ever overshoot, runs at this share of the cap


class EncodeError(RuntimeError):
    """ffmpeg failed or the clip could not be brought under the limit."""


@dataclass(frozen=True)
class EncodePlan:
    """Size and VBV cap for one clip and limit, as :func:`plan_encode` chose them."""

    width: int
    height: int
    maxrate: int  # bit/s
    bufsize: int  # bits
    bits_per_pixel: float  # maxrate per pixel per frame at this size
    scaled: bool  # smaller than the source


@dataclass(frozen=True)
class EncodeReport:
    """What the encode did."""

    path: Path
    bytes: int
    limit: int
    method: str  # "remux" or "capped-crf"
    maxrate: int | None = None
    bufsize: int | None = None
    width: int | None = None
    height: int | None = None
    source_size: tuple[int, int] | None = None
    bits_per_pixel: float | None = None
    seconds: float = 0.0
    attempts: int = 1


def _ffmpeg(*args: str) -> None:
    cmd = [video.ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise EncodeError(f"ffmpeg failed: {proc.stderr.strip()[-500:]}")


def change_fps(src: Path, dst: Path, fps: int) -> None:
    """Re-time ``src`` to ``fps`` by dropping or repeating frames (no motion interpolation)."""
    _ffmpeg("-i", str(src), "-vf", f"fps={fps}", *video.encoder_args(crf=18), "-f", "mp4", str(dst))


def _even(x: float) -> int:
    return max(2, 2 * round(x / 2))


def _sizes(width: int, height: int) -> list[tuple[int, int]]:
    """The source size, then every ladder size below it, largest first (aspect kept, even sides)."""
    short = min(width, height)
    sizes = [(width - width % 2, height - height % 2)]
    for side in SIZE_LADDER:
        if side < short:
            k = side / short
            sizes.append((_even(width * k), _even(height * k)))
    return sizes


def plan_encode(
    width: int,
    height: int,
    *,
    fps: float,
    duration: float,
    limit_bytes: int,
    min_bits_per_pixel: float = MIN_BITS_PER_PIXEL,
) -> EncodePlan:
    """The size and VBV cap that fit ``duration`` seconds of ``width``×``height`` video in ``limit_bytes``.

    ::

        plan_encode(1920, 1080, fps=24, duration=10, limit_bytes=2**20)
        # EncodePlan(width=1280, height=720, maxrate=724470, bufsize=724470, bits_per_pixel=0.0328, scaled=True)

    The largest size whose cap gives at least ``min_bits_per_pixel``; the smallest ladder size if none
    does (it still fits: the cap, not the size, guarantees that).
    """
    if width <= 0 or height <= 0 or fps <= 0:
        raise ValueError("width, height and fps must be positive")
    maxrate, bufsize = video.vbv_cap(limit_bytes, duration)
    sizes = _sizes(width, height)
    w, h = next(((w, h) for w, h in sizes if maxrate / (w * h * fps) >= min_bits_per_pixel), sizes[-1])
    return EncodePlan(
        width=w, height=h, maxrate=maxrate, bufsize=bufsize, bits_per_pixel=maxrate / (w * h * fps),
        scaled=(w, h) != sizes[0],
    )  # fmt: skip


def fit_to_limit(
    src: Path, dst: Path, *, limit_bytes: int, crf: int = DEFAULT_CRF, preset: str = DEFAULT_PRESET
) -> EncodeReport:
    """Write ``src`` to ``dst`` as an MP4 that plays inline on Discord and is at most ``limit_bytes``.

    One encode (CRF ``crf`` under the VBV cap of :func:`plan_encode`, at the size it chose, Lanczos
    scaling) or a remux if ``src`` is already H.264 yuv420p and small enough. The size is checked on
    the finished file; ``dst`` appears only if it fits.
    """
    started = time.perf_counter()
    src, dst = Path(src), Path(dst)
    info = video.probe(src, count=False)
    tmp = dst.with_name(f".{dst.name}.part")
    source_size = (info.width, info.height)
    try:
        if info.codec == "h264" and info.pix_fmt == "yuv420p" and info.bytes <= limit_bytes:
            _ffmpeg("-i", str(src), "-map", "0:v:0", "-c", "copy", "-an", "-movflags", "+faststart",
                    "-f", "mp4", str(tmp))  # fmt: skip
            size = tmp.stat().st_size
            if size <= limit_bytes:
                os.replace(tmp, dst)
                return EncodeReport(
                    path=dst, bytes=size, limit=limit_bytes, method="remux", width=info.width,
                    height=info.height, source_size=source_size, seconds=time.perf_counter() - started,
                )  # fmt: skip
        plan = plan_encode(info.width, info.height, fps=info.fps or 24.0, duration=info.duration,
                           limit_bytes=limit_bytes)  # fmt: skip
        maxrate, bufsize = plan.maxrate, plan.bufsize
        scale = ["-vf", f"scale={plan.width}:{plan.height}:flags=lanczos"] if plan.scaled else []
        for attempt in (1, 2):
            args = video.encoder_args(crf=crf, preset=preset, maxrate=maxrate, bufsize=bufsize)
            _ffmpeg("-i", str(src), "-map", "0:v:0", *scale, *args, "-f", "mp4", str(tmp))
            size = tmp.stat().st_size
            if size <= limit_bytes:
                os.replace(tmp, dst)
                return EncodeReport(
                    path=dst, bytes=size, limit=limit_bytes, method="capped-crf", maxrate=maxrate,
                    bufsize=bufsize, width=plan.width, height=plan.height, source_size=source_size,
                    bits_per_pixel=plan.bits_per_pixel, seconds=time.perf_counter() - started,
                    attempts=attempt,
                )  # fmt: skip
            # The cap bounds the video stream; only a container far larger than the 5 % margin (a
            # very short clip with a tiny limit) can overshoot. Shrink the cap by the overshoot and more.
            shrink = min(_RETRY_FACTOR, limit_bytes / size * 0.95)
            maxrate, bufsize = math.floor(maxrate * shrink), math.floor(bufsize * shrink)
        raise EncodeError(f"encoded clip is {size} bytes, over the {limit_bytes}-byte limit")
    finally:
        tmp.unlink(missing_ok=True)
