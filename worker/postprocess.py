"""Post-processing between generation and delivery: frame interpolation, stitching, seam checks.

::

    report = interpolate(src, dst, fps=24, mode="motion")   # an 8/12/16 fps clip brought to 24 fps
    still = last_frame(path)                                # RGB uint8: where an extension starts
    joined = stitch([first, second], dst, overlap=0.5)      # one clip, cross-faded, 24 fps yuv420p
    checks = seam_checks(dst, joined.seams)                 # does any seam show?

Interpolation modes (``mode=``; 5 s of 1280×720 from 8 fps to 24 fps, x264 included, on 2 cores;
bench/README.md):

==========  =================================================================================================
``motion``  ours, the default: DIS optical flow both ways between neighbouring source frames at ≤320 px
            wide, forward-splatted to the in-between time (so a moving object carries its own motion, not
            the background's), both neighbours warped at full resolution with ``cv2.remap`` and blended by
            how visible each is (forward/backward consistency, frame edges). 3.1-3.5 s; 33 dB on the
            held-out frames of a hard scene (crossing objects over a fast pan), 38-41 dB on camera moves.
``blend``   a cross-dissolve of the two neighbours: 1.4-1.8 s, ghosts on any motion (18-37 dB).
``mci``     ffmpeg's ``minterpolate`` motion-compensated mode at full resolution, padded so no frame is
            lost: about 16 s (one core) and 2-5 dB below ``motion``; kept as a reference.
==========  =================================================================================================

Timing is exact and the same for every mode: output frame ``k`` shows the source at position
``k·src_fps/fps`` (in source frames), so source frames land on every ``fps/src_fps``-th output frame
(bit-exact until x264: frames stay yuv420p from decoder to encoder, see :func:`read_i420`), and a clip
of ``n`` source frames gives ``round(n·fps/src_fps)`` frames (or ``round(duration·fps)`` when the caller
says how long it must be). Positions past the last source frame repeat it: the tail is padded, never
dropped (``minterpolate`` alone returns 115 of 120 frames). A source at or above ``fps`` is resampled
to the nearest frame, like ffmpeg's ``fps`` filter.

A seam is where one segment cross-fades into the next. :func:`seam_checks` compares the largest
frame-to-frame change around each seam with the clip's typical change; a cut or a jump scores high.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import queue
import subprocess
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import cv2
import imageio_ffmpeg
import numpy as np

from backends import video

__all__ = [
    "INTERPOLATION_MODES",
    "SEAM_THRESHOLD",
    "Interpolation",
    "InterpolationReport",
    "MotionInterpolator",
    "SeamCheck",
    "StitchReport",
    "frame_differences",
    "i420_planes",
    "interpolate",
    "interpolate_frames",
    "last_frame",
    "read_i420",
    "seam_checks",
    "source_positions",
    "stitch",
]

Interpolation = Literal["motion", "blend", "mci"]
INTERPOLATION_MODES: tuple[str, ...] = get_args(Interpolation)

#: A seam whose largest frame-to-frame change is more than this many times the clip's typical change
#: shows (measured: hard cuts 8-18, a dissolve between unrelated clips 4.1, continued clips 1.1-1.3).
SEAM_THRESHOLD = 3.0

_EPS = 1e-6  # positions this close to a whole source frame are that frame
_QUEUE = 4  # finished frames buffered for the writer thread
_FLOW_WIDTH = 320  # optical flow is computed at most this wide (and the picture's aspect)
_SPLAT_KERNEL = 7  # Gaussian kernel that fills holes between splatted samples (normalised convolution)


@dataclass(frozen=True)
class InterpolationReport:
    """What :func:`interpolate` wrote."""

    path: Path
    mode: str
    src_fps: float
    fps: int
    frames_in: int
    frames: int
    width: int
    height: int
    seconds: float


def source_positions(frames_in: int, src_fps: float, fps: float, *, frames_out: int | None = None) -> np.ndarray:
    """Where each output frame samples the source, in source frame indices (float64, one per output frame).

    ``frames_out`` defaults to ``round(frames_in·fps/src_fps)``. Positions past the last source frame are
    clamped to it (the tail is padded with the last frame). Slower-to-faster positions are fractional;
    from a source at or above ``fps`` they are rounded to whole frames::

        source_positions(40, 8, 24)[:5]     # [0, 1/3, 2/3, 1, 4/3]; 120 positions, the last three 39
    """
    if frames_in <= 0 or src_fps <= 0 or fps <= 0:
        raise ValueError("frames_in, src_fps and fps must be positive")
    if frames_out is None:
        frames_out = max(1, round(frames_in * fps / src_fps))
    pos = np.arange(frames_out, dtype=np.float64) * (src_fps / fps)
    if src_fps >= fps - _EPS:
        pos = np.floor(pos + 0.5)
    return np.minimum(pos, frames_in - 1)


def i420_planes(frame: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Views of the Y', Cb and Cr planes of an I420 frame of shape ``(H*3/2, W)`` (as ``yuv420p`` lays them)."""
    rows, w = frame.shape
    h = rows * 2 // 3
    flat = frame.reshape(-1)
    n, c = w * h, (w // 2) * (h // 2)
    return flat[:n].reshape(h, w), flat[n : n + c].reshape(h // 2, w // 2), flat[n + c :].reshape(h // 2, w // 2)


class MotionInterpolator:
    """Motion-compensated in-between frames for one pair of neighbouring frames at a time.

    ::

        mi = MotionInterpolator(1280, 720)
        mi.set_pair(frame0, frame1)          # computes the flows (about 10 ms at 320 px wide)
        mid = mi.between(0.5)                # the picture halfway from frame0 to frame1

    Frames are uint8 RGB ``(H, W, 3)`` or I420 ``(H*3/2, W)`` (what :func:`interpolate` uses: no colour
    conversion, chroma warped at its own resolution); ``between`` returns the same layout.

    How: DIS optical flow both ways on a ``flow_width``-wide grey copy (ULTRAFAST preset, but down to
    the finest scale: as good as FAST at 480 px on bench/README.md's clips, for 20 % less CPU); each
    pixel of both frames is splatted to where it is at time ``t`` with its velocity, weighted by
    forward/backward consistency (a pixel about to be covered has no reliable flow); a small Gaussian
    fills the holes. Both frames are then warped to ``t`` at full resolution
    (bilinear) and blended by how visible the content is in each, so a region that one frame does not
    show (disoccluded, or outside its edges) is taken from the other.
    """

    def __init__(
        self,
        width: int,
        height: int,
        *,
        flow_width: int = _FLOW_WIDTH,
        preset: int = cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
        finest_scale: int | None = 0,
    ) -> None:
        self.width, self.height = width, height
        fw = min(flow_width, width)
        fh = max(8, round(height * fw / width))
        self.flow_size = (fw, fh)
        self._scale = np.array([width / fw, height / fh], np.float32)
        self._dis = cv2.DISOpticalFlow_create(preset)
        if finest_scale is not None:
            self._dis.setFinestScale(finest_scale)
        self._grid_small = np.meshgrid(np.arange(fw, dtype=np.float32), np.arange(fh, dtype=np.float32))
        self._grid = self._grid_of(width, height)
        self._grid_chroma = self._grid_of(width // 2, height // 2)
        self._pair: tuple[np.ndarray, np.ndarray] | None = None
        self._flows: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None

    @staticmethod
    def _grid_of(width: int, height: int) -> np.ndarray:
        gx, gy = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
        return np.dstack([gx, gy])

    def _is_i420(self, frame: np.ndarray) -> bool:
        if frame.shape == (self.height, self.width, 3):
            return False
        if frame.shape == (self.height * 3 // 2, self.width):
            return True
        raise ValueError(f"expected a {self.width}x{self.height} RGB or I420 frame, got shape {frame.shape}")

    def gray(self, frame: np.ndarray) -> np.ndarray:
        """The small grey copy of a frame that flow is computed on (callers may cache it)."""
        g = frame[: self.height] if self._is_i420(frame) else cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
        if (g.shape[1], g.shape[0]) != self.flow_size:
            g = cv2.resize(g, self.flow_size, interpolation=cv2.INTER_AREA)
        return g

    def set_pair(
        self, frame0: np.ndarray, frame1: np.ndarray, gray0: np.ndarray | None = None, gray1: np.ndarray | None = None
    ) -> None:
        """Make ``frame0 → frame1`` the current pair and compute its flows (grey copies may be passed in)."""
        g0 = self.gray(frame0) if gray0 is None else gray0
        g1 = self.gray(frame1) if gray1 is None else gray1
        f01 = self._dis.calc(g0, g1, None)
        f10 = self._dis.calc(g1, g0, None)
        self._pair = (frame0, frame1)
        self._flows = (f01, f10, self._consistent(f01, f10), self._consistent(f10, f01))

    def _consistent(self, fa: np.ndarray, fb: np.ndarray) -> np.ndarray:
        """1.0 where following ``fa`` and then ``fb`` comes back to the start: visible in both frames."""
        gx, gy = self._grid_small
        back = cv2.remap(fb, gx + fa[..., 0], gy + fa[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        loop = fa + back
        err = np.einsum("...i,...i->...", loop, loop)
        mag = np.einsum("...i,...i->...", fa, fa) + np.einsum("...i,...i->...", back, back)
        return (err <= 0.01 * mag + 0.5).astype(np.float32)

    def _velocity(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        """Velocity (frame0→frame1 displacement, small grid) of the content at time ``t``, and its blend alpha."""
        assert self._flows is not None
        f01, f10, ok0, ok1 = self._flows
        gx, gy = self._grid_small
        fw, fh = self.flow_size
        n = fw * fh
        acc = [np.zeros(n), np.zeros(n), np.zeros(n)]
        seen = []
        for flow, ok, s, sign in ((f01, ok0, t, 1.0), (f10, ok1, 1.0 - t, -1.0)):
            xi = np.rint(gx + s * flow[..., 0]).astype(np.int32)
            yi = np.rint(gy + s * flow[..., 1]).astype(np.int32)
            inside = (xi >= 0) & (xi < fw) & (yi >= 0) & (yi < fh)
            idx = (yi * fw + xi)[inside]
            okv = ok[inside]
            weight = okv * 0.99 + 0.01  # inconsistent pixels only fill what nothing better reaches
            acc[0] += np.bincount(idx, weight, minlength=n)
            acc[1] += np.bincount(idx, weight * (sign * flow[..., 0][inside]), minlength=n)
            acc[2] += np.bincount(idx, weight * (sign * flow[..., 1][inside]), minlength=n)
            seen.append(np.bincount(idx, okv, minlength=n))
        k = (_SPLAT_KERNEL, _SPLAT_KERNEL)
        wsum, vx, vy = (cv2.GaussianBlur(a.reshape(fh, fw).astype(np.float32), k, 0) for a in acc)
        # Where no splat lands (large disocclusions), fall back to the linear estimate of Super SloMo.
        vel = (1 - t) * f01 - t * f10
        hit = wsum > 0.05
        vel[..., 0][hit] = vx[hit] / wsum[hit]
        vel[..., 1][hit] = vy[hit] / wsum[hit]
        vis0, vis1 = (np.minimum(cv2.GaussianBlur(s.reshape(fh, fw).astype(np.float32), k, 0), 1.0) for s in seen)
        # Content whose source position falls outside a frame is not in that frame.
        for vis, d in ((vis0, -t), (vis1, 1.0 - t)):
            x, y = gx + d * vel[..., 0], gy + d * vel[..., 1]
            vis[(x < -0.5) | (x > fw - 0.5) | (y < -0.5) | (y > fh - 0.5)] = 0.0
        w0, w1 = (1 - t) * (vis0 + 0.02), t * (vis1 + 0.02)
        return vel * self._scale, w1 / (w0 + w1)

    def _warp_blend(
        self, p0: Sequence[np.ndarray], p1: Sequence[np.ndarray], out: Sequence[np.ndarray],
        vel: np.ndarray, alpha: np.ndarray, t: float, grid: np.ndarray,
    ) -> None:  # fmt: skip
        """Warp planes ``p0`` back and ``p1`` forward to time ``t`` and blend them into ``out`` (same size)."""
        size = (grid.shape[1], grid.shape[0])
        up = cv2.resize(vel, size, interpolation=cv2.INTER_LINEAR)
        a1 = cv2.resize(alpha, size, interpolation=cv2.INTER_LINEAR)
        a0 = 1.0 - a1
        map0, map1 = cv2.scaleAdd(up, -t, grid), cv2.scaleAdd(up, 1.0 - t, grid)
        for a, b, dst in zip(p0, p1, out, strict=True):
            w0 = cv2.remap(a, map0, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            w1 = cv2.remap(b, map1, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            dst[...] = cv2.blendLinear(w0, w1, a0, a1)

    def between(self, t: float) -> np.ndarray:
        """The frame at time ``t`` (0 < t < 1) between the current pair, at full size, in the pair's layout."""
        if self._pair is None:
            raise RuntimeError("set_pair() first")
        frame0, frame1 = self._pair
        vel, alpha = self._velocity(t)  # vel in full-size luma pixels
        out = np.empty_like(frame0)
        if not self._is_i420(frame0):
            self._warp_blend([frame0], [frame1], [out], vel, alpha, t, self._grid)
            return out
        (y0, *c0), (y1, *c1), (yo, *co) = i420_planes(frame0), i420_planes(frame1), i420_planes(out)
        self._warp_blend([y0], [y1], [yo], vel, alpha, t, self._grid)
        self._warp_blend(c0, c1, co, vel * 0.5, alpha, t, self._grid_chroma)  # chroma: half the displacement
        return out


def interpolate_frames(
    frames: Iterable[np.ndarray], positions: Sequence[float] | np.ndarray, *, mode: str = "motion"
) -> Iterator[np.ndarray]:
    """Frames at fractional source ``positions`` (from :func:`source_positions`), made from a stream.

    ``frames`` is consumed once, in order, holding two source frames at a time; ``mode`` is ``motion``
    or ``blend``. Whole positions yield the source frame itself (the same array).
    """
    if mode not in ("motion", "blend"):
        raise ValueError(f"interpolate_frames mode must be 'motion' or 'blend', got {mode!r}")
    it = iter(frames)
    cur = next(it, None)
    if cur is None:
        raise ValueError("no frames to interpolate")
    nxt = next(it, None)
    idx = 0
    mi: MotionInterpolator | None = None
    grays: dict[int, np.ndarray] = {}
    paired = -1
    for s in positions:
        whole = math.floor(s + _EPS)
        while idx < whole and nxt is not None:
            cur, nxt, idx = nxt, next(it, None), idx + 1
        t = float(s) - idx
        if t < _EPS or nxt is None:
            yield cur  # a source frame, or past the end: the tail repeats the last frame
            continue
        if mode == "blend":
            yield cv2.addWeighted(cur, 1.0 - t, nxt, t, 0.0)
            continue
        if mi is None:  # RGB (H, W, 3) or I420 (H*3/2, W)
            mi = MotionInterpolator(cur.shape[1], cur.shape[0] if cur.ndim == 3 else cur.shape[0] * 2 // 3)
        if paired != idx:
            g0 = grays.pop(idx, None)
            g0 = mi.gray(cur) if g0 is None else g0
            g1 = mi.gray(nxt)
            grays = {idx + 1: g1}
            mi.set_pair(cur, nxt, g0, g1)
            paired = idx
        yield mi.between(t)


def _write_all(writer: video.VideoWriter, frames: Iterable[np.ndarray]) -> int:
    """Write ``frames`` from a second thread so making frame n+1 overlaps the pipe write of frame n."""
    full: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=_QUEUE)
    failure: list[BaseException] = []

    def feed() -> None:
        try:
            while (frame := full.get()) is not None:
                if not failure:
                    writer.write(frame)
        except BaseException as exc:  # handed to the producing thread, which re-raises it
            failure.append(exc)
            with contextlib.suppress(queue.Empty):
                while True:  # unblock a producer waiting for room
                    full.get_nowait()

    feeder = threading.Thread(target=feed, name="postprocess-writer", daemon=True)
    feeder.start()
    count = 0
    try:
        for frame in frames:
            if failure:
                break
            full.put(frame)
            count += 1
    except BaseException:
        writer.abort()  # unblocks a feeder stuck in a pipe write
        failure.append(RuntimeError("producer failed"))
        full.put(None)
        feeder.join()
        raise
    full.put(None)
    feeder.join()
    if failure:
        raise failure[0]
    return count


def read_i420(path: str | os.PathLike[str]) -> Iterator[np.ndarray]:
    """Decode a clip to I420 frames ``(H*3/2, W)``: BT.709 limited-range yuv420p, as :class:`VideoWriter` takes.

    A file that already is yuv420p (BT.709 or untagged, limited range) comes out bit-exact, so frames
    that pass through post-processing unchanged are not touched by any colour conversion (an RGB round
    trip costs about 3 dB PSNR on a clean clip before x264 even starts). Anything else is converted by
    ffmpeg (``scale=out_color_matrix=bt709:out_range=tv``); odd sizes lose their last row or column.
    """
    path = Path(path)
    info = video.probe(path, count=False)
    filters = [] if _is_bt709_yuv420p(_pix_fmt(path)) else ["scale=out_color_matrix=bt709:out_range=tv"]
    w, h = info.width - info.width % 2, info.height - info.height % 2
    if (w, h) != (info.width, info.height):
        filters.append(f"crop={w}:{h}:0:0")
    out = ["-vf", ",".join(filters)] if filters else []
    gen = imageio_ffmpeg.read_frames(str(path), pix_fmt="yuv420p", bits_per_pixel=12, output_params=out)
    try:
        next(gen)  # the metadata
        for buf in gen:
            yield np.frombuffer(buf, np.uint8).reshape(h * 3 // 2, w)
    except (OSError, RuntimeError) as exc:
        raise video.VideoError(f"cannot decode {path.name}: {str(exc)[-2000:]}") from exc
    finally:
        gen.close()


def _is_bt709_yuv420p(pix_fmt: str) -> bool:
    """Whether ffmpeg's pixel format line (``yuv420p(tv, bt709/unknown/unknown, progressive)``) needs no conversion.

    Untagged counts as BT.709: that is what players assume for HD, and what our own files say.
    """
    fmt, _, tags = pix_fmt.partition("(")
    parts = [p.strip() for p in tags.rstrip(")").split(",") if p.strip()]
    matrix = next((p.split("/")[0] for p in parts if p not in ("tv", "pc") and "progressive" not in p
                   and "first" not in p), "unknown")  # fmt: skip
    return fmt.strip() == "yuv420p" and "pc" not in parts and matrix in ("bt709", "unknown")


def _pix_fmt(path: Path) -> str:
    """The pixel format as ffmpeg describes the video stream, e.g. ``yuv420p(tv, bt709, progressive)``."""
    gen = imageio_ffmpeg.read_frames(str(path))
    try:
        return str(next(gen).get("pix_fmt", ""))
    except (OSError, RuntimeError, StopIteration) as exc:
        raise video.VideoError(f"cannot decode {path.name}: {str(exc)[-2000:]}") from exc
    finally:
        gen.close()


def _ffmpeg_to(dst: Path, args: Sequence[str]) -> None:
    """Run ffmpeg writing an MP4 to a temporary file next to ``dst``, renamed into place on success."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.part")
    cmd = [video.ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *args, "-f", "mp4", str(tmp)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise video.VideoError(f"ffmpeg failed writing {dst.name}: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def interpolate(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    fps: int = 24,
    mode: str = "motion",
    duration: float | None = None,
    crf: int = 18,
    preset: str = "veryfast",
) -> InterpolationReport:
    """Re-time ``src`` to ``fps`` with motion-compensated (or blended) in-between frames; write ``dst``.

    ::

        interpolate(Path("wan-16fps.mp4"), Path("24fps.mp4"))                 # 81 frames → 122
        interpolate(src, dst, mode="blend", duration=5.0)                      # exactly 120 frames

    The output has exactly ``round(duration·fps)`` frames (``duration`` defaults to the source's), at
    the size of the source, encoded with :func:`backends.video.encoder_args` (``crf``, ``preset``).
    Raises :class:`backends.video.VideoError` if a file cannot be read or written.
    """
    if mode not in INTERPOLATION_MODES:
        raise ValueError(f"mode must be one of {', '.join(INTERPOLATION_MODES)}, got {mode!r}")
    started = time.perf_counter()
    src, dst = Path(src), Path(dst)
    info = video.probe(src, count=False)
    if info.fps <= 0:
        raise video.VideoError(f"{src.name} has no frame rate")
    frames_out = round((info.duration if duration is None else duration) * fps)
    if frames_out <= 0:
        raise ValueError("the output would have no frames")
    if mode == "mci":
        # minterpolate stops at the last input timestamp; cloning the last input frame for as long as
        # the output still needs makes it produce every frame (-frames:v then cuts at the count).
        pad = max(1, math.ceil((frames_out - 1) * info.fps / fps) - (info.frames - 1) + 1)
        vf = f"crop=trunc(iw/2)*2:trunc(ih/2)*2,tpad=stop_mode=clone:stop={pad},minterpolate=fps={fps}:mi_mode=mci"
        args = ["-i", str(src), "-vf", vf, "-frames:v", str(frames_out), *video.encoder_args(crf=crf, preset=preset)]
        _ffmpeg_to(dst, args)
    else:
        positions = source_positions(info.frames, info.fps, fps, frames_out=frames_out)
        # The header's frame count may be off by one: past the real end, interpolate_frames repeats the
        # last frame, so positions may safely reach as far as the header says.
        w, h = info.width - info.width % 2, info.height - info.height % 2
        with video.VideoWriter(dst, width=w, height=h, fps=fps, pix_fmt="yuv420p", crf=crf, preset=preset) as out:
            written = _write_all(out, interpolate_frames(read_i420(src), positions, mode=mode))
        if written != frames_out:
            raise video.VideoError(f"wrote {written} frames to {dst.name}, expected {frames_out}")
    return InterpolationReport(
        path=dst, mode=mode, src_fps=info.fps, fps=fps, frames_in=info.frames, frames=frames_out,
        width=info.width - info.width % 2, height=info.height - info.height % 2,
        seconds=time.perf_counter() - started,
    )  # fmt: skip


def last_frame(path: str | os.PathLike[str], *, before: int = 0) -> np.ndarray:
    """The last decoded frame of a clip (RGB uint8), or the one ``before`` frames earlier.

    Decodes the whole clip (about 0.3 s for 5 s of 720p: a generated clip has one keyframe, so seeking
    would not save anything) and returns exactly what a player shows last. To extend a clip without
    ghosting in the cross-fade, continue from the frame the fade starts on,
    ``before=round(overlap·fps) - 1``: the new segment's first ``overlap`` seconds then retrace the old
    segment's last ones instead of running ahead of them (:func:`stitch` fades ``round(overlap·fps)``
    frames).
    """
    if before < 0:
        raise ValueError("before must be >= 0")
    tail: collections.deque[np.ndarray] = collections.deque(maxlen=before + 1)
    tail.extend(video.read_frames(path))
    if len(tail) <= before:
        raise video.VideoError(f"{Path(path).name} has fewer than {before + 1} frames")
    return tail[0].copy()


@dataclass(frozen=True)
class StitchReport:
    """What :func:`stitch` wrote; ``seams`` are the cross-fades as ``(start, end)`` seconds of the output."""

    path: Path
    frames: int
    fps: int
    width: int
    height: int
    duration: float
    seams: list[tuple[float, float]]
    normalised: list[bool]  # per segment: whether its size or frame rate had to change
    seconds: float
    segment_frames: list[int] = field(default_factory=list)  # per segment, after normalising


def _segment_filter(i: int, path: Path, fps: int, width: int, height: int) -> str:
    """Filter chain that normalises input ``i``: frame rate, size (cover, centre crop), colour, timebase."""
    scale = f"scale={width}:{height}:force_original_aspect_ratio=increase:flags=lanczos"
    if not _is_bt709_yuv420p(_pix_fmt(path)):
        scale += ":out_color_matrix=bt709:out_range=tv"
    return f"[{i}:v]fps={fps},{scale},crop={width}:{height},setsar=1,format=yuv420p,settb=AVTB[v{i}]"


def stitch(
    segments: Sequence[str | os.PathLike[str]],
    dst: str | os.PathLike[str],
    *,
    overlap: float = 0.5,
    fps: int = 24,
    width: int | None = None,
    height: int | None = None,
    crf: int = 18,
    preset: str = "veryfast",
) -> StitchReport:
    """Join clips end to end, each cross-faded into the next over ``overlap`` seconds, into ``dst``.

    ::

        report = stitch([first, extension], Path("joined.mp4"), overlap=0.5)
        report.duration     # first + extension - 0.5 s
        report.seams        # [(4.5, 5.0)]: check them with seam_checks(report.path, report.seams)

    One ffmpeg pass: every segment is normalised by filters (to ``fps`` by nearest frame, so interpolate
    a slow segment first for smooth motion; to ``width``×``height``, by default the first segment's,
    scaling to cover and cropping the centre; to BT.709 yuv420p), then ``xfade`` fades each into the
    next over ``round(overlap·fps)`` frames (linear, weights ``(j+½)/m``), then one x264 encode. Our
    own numpy fade of I420 frames piped to x264 measured the same within 7 % (bench/README.md); the
    filter graph also normalises for free. ``overlap=0`` concatenates.
    """
    paths = [Path(p) for p in segments]
    if not paths:
        raise ValueError("nothing to stitch")
    if overlap < 0:
        raise ValueError("overlap must be >= 0")
    started = time.perf_counter()
    infos = [video.probe(p, count=False) for p in paths]
    out_w = width or infos[0].width
    out_h = height or infos[0].height
    out_w, out_h = out_w - out_w % 2, out_h - out_h % 2
    counts = [len(source_positions(i.frames, i.fps, fps)) for i in infos]
    m = round(overlap * fps)
    if len(paths) > 1 and m >= min(counts):
        raise ValueError(f"overlap of {m} frames is not shorter than every segment ({min(counts)} frames)")
    normalised = [(i.width, i.height) != (out_w, out_h) or abs(i.fps - fps) > 1e-3 for i in infos]
    total = sum(counts) - m * (len(paths) - 1)

    graph = [_segment_filter(i, p, fps, out_w, out_h) for i, p in enumerate(paths)]
    seams, start, last = [], 0, "v0"
    for i, count in enumerate(counts[:-1], start=1):
        start += count - m
        seams.append((start / fps, (start + m) / fps))
        if m:  # half a frame early, so that frame `start` is surely the first one in the fade
            fade = f"xfade=transition=fade:duration={m / fps:.6f}:offset={(start - 0.5) / fps:.6f}"
            graph.append(f"[{last}][v{i}]{fade}[x{i}]")
            last = f"x{i}"
    if not m and len(paths) > 1:
        graph.append("".join(f"[v{i}]" for i in range(len(paths))) + f"concat=n={len(paths)}:v=1:a=0[cat]")
        last = "cat"
    inputs = [arg for p in paths for arg in ("-i", str(p))]
    args = [*inputs, "-filter_complex", ";".join(graph), "-map", f"[{last}]", "-frames:v", str(total)]
    _ffmpeg_to(Path(dst), [*args, *video.encoder_args(crf=crf, preset=preset)])
    return StitchReport(
        path=Path(dst), frames=total, fps=fps, width=out_w, height=out_h, duration=total / fps,
        seams=seams, normalised=normalised, seconds=time.perf_counter() - started, segment_frames=counts,
    )  # fmt: skip


@dataclass(frozen=True)
class SeamCheck:
    """How much a seam stands out from the rest of the clip (changes are mean |ΔY'| on 0-255)."""

    start: float
    end: float
    peak: float  # the largest change between consecutive frames in the seam's window
    typical: float  # the median change between consecutive frames outside every seam window
    score: float  # peak / max(typical, 1): above SEAM_THRESHOLD the seam shows
    visible: bool


def frame_differences(path: str | os.PathLike[str], *, width: int = 320) -> np.ndarray:
    """Mean absolute luma difference between consecutive frames (0-255), decoded ``width`` px wide.

    ``result[i]`` is the change from frame ``i`` to ``i + 1``. About 0.4 s for 5 s of 720p.
    """
    info = video.probe(path, count=False)
    w = min(width, info.width)
    h = max(2, round(info.height * w / info.width / 2) * 2)
    prev: np.ndarray | None = None
    diffs = []
    for gray in video.read_frames(path, size=(w, h), gray=True):
        if prev is not None:
            diffs.append(float(cv2.norm(gray, prev, cv2.NORM_L1)) / gray.size)
        prev = gray
    return np.asarray(diffs)


def seam_checks(
    path: str | os.PathLike[str],
    seams: Sequence[tuple[float, float]],
    *,
    margin: float = 0.25,
    threshold: float = SEAM_THRESHOLD,
    fps: float | None = None,
    diffs: np.ndarray | None = None,
) -> list[SeamCheck]:
    """Judge each seam ``(start, end)`` (seconds, as :class:`StitchReport` gives them) of a clip.

    A seam's window is the fade widened by ``margin`` seconds each side; its score is the largest
    frame-to-frame change in the window over the clip's median change elsewhere (floored at 1 grey
    level, so a still clip's tiny changes do not make every fade look like a jump). Pass ``diffs``
    (from :func:`frame_differences`) and ``fps`` to reuse a decode.
    """
    if diffs is None:
        diffs = frame_differences(path)
    if fps is None:
        fps = video.probe(path, count=False).fps
    n = len(diffs)
    windows = []
    for start, end in seams:
        lo = max(0, math.floor((start - margin) * fps) - 1)
        hi = min(n, math.ceil((end + margin) * fps) + 1)
        windows.append((lo, max(hi, lo + 1)))
    outside = np.ones(n, bool)
    for lo, hi in windows:
        outside[lo:hi] = False
    typical = float(np.median(diffs[outside])) if outside.any() else float(np.median(diffs)) if n else 0.0
    checks = []
    for (start, end), (lo, hi) in zip(seams, windows, strict=True):
        peak = float(diffs[lo:hi].max()) if hi > lo and n else 0.0
        score = peak / max(typical, 1.0)
        checks.append(SeamCheck(start, end, peak, typical, score, score > threshold))
    return checks
