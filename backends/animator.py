"""The offline procedural animator behind the ``local`` backend: smooth camera moves over a still.

No model and no network: a virtual camera looks at the photograph and moves along an eased path, and
each output frame is one float-precision warp of a pre-scaled copy of the picture::

    info = render(rgb, Path("clip.mp4"), camera=CameraMove.ZOOM_IN, motion=2, duration=5.0,
                  fps=24, width=1280, height=720, focus=face_box)
    mats = camera_path((w, h), camera=CameraMove.ZOOM_IN, motion=2, duration=5.0,
                       fps=24, width=1280, height=720)        # what frame i shows, as a 3×3 matrix

Why not ffmpeg's ``zoompan``: it truncates its crop to a 2-pixel grid, so slow moves judder by 1.2-1.5 px
RMS (reference/video.md §2.3, bench/README.md). Here nothing is rounded: transforms are float matrices
applied with bilinear interpolation; the frames follow the ideal path within 0.002 px RMS (x264 at CRF 20
then adds about 0.01 px of coding noise), within about 5 % of zoompan's wall time (≈15 % more CPU).

How a clip is made, and why it is fast:

1. :func:`camera_path` turns the move into one matrix per frame, mapping output pixel coordinates to
   source pixel coordinates (pixel centres at integers, as OpenCV's ``WARP_INVERSE_MAP`` wants).
2. The part of the photograph the path ever sees is cropped and resized **once** (area filter down,
   bicubic up) so the most zoomed-in frame samples it at 1:1: the per-frame warp never minifies much
   (no aliasing from a 12-megapixel photo) and never magnifies a small one with a cheap filter.
3. That copy is converted once to BT.709 Y'CbCr with 4:2:0 chroma, and each frame is warped straight
   into yuv420p planes: luma at full size, chroma at half size through the same matrix adjusted for
   chroma siting, so colour stays on the sub-pixel path too. ffmpeg then does no colour conversion and
   the pipe carries half the bytes of RGB.
4. A writer thread feeds ffmpeg while the next frame is warped (OpenCV and pipe writes release the GIL).

Moves (``motion`` 0..4 scales each; 2 is the default, 0 still moves, 4 is strong). Directions are the
camera's: ``pan-left`` moves the view left, so the picture slides right.

============  ===========================================================================================
static        a slow breath: zooms in a little and back while drifting (towards the subject if given);
              the clip starts and ends on the full frame, so it loops
zoom-in       full frame → tighter framing centred on the subject (or the centre); log-space zoom,
              smootherstep ease, a pure zoom about one fixed point
zoom-out      the reverse of zoom-in
pan-*         a slightly zoomed window travels across the picture, smoothstep ease; a given subject
              stays inside the frame
dolly-in      the camera travels towards the subject at a steady speed (eased up and down, as on a
              track): magnification is 1/distance, so the picture grows ever faster until the camera
              brakes, where zoom-in's log-zoom speed is a symmetric bell; it also ends closer, subject
              centred. A flat photo has no parallax, so none is faked
orbit-*       the picture plane turns about a vertical axis through the subject (a homography: the near
              side grows, the far side shrinks) while the subject stays put, which is the compensating
              pan a real orbit makes; zoomed just enough that no border ever shows
============  ===========================================================================================

Every window stays inside the picture: no black borders, ever.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from backends.base import Box, CameraMove
from backends.video import CHROMA_SITING, VideoWriter, rgb_to_ycbcr

__all__ = ["RenderInfo", "camera_path", "frame_count", "render", "work_scale", "yuv_frames"]

# Strength tables, indexed by motion 0..4.
LONG_CLIP = 10.0  # seconds; longer clips cruise at a steady speed instead of easing over their length
_ZOOM = (1.08, 1.15, 1.25, 1.38, 1.55)  # zoom-in/out: final zoom factor
_DOLLY = (1.12, 1.22, 1.38, 1.55, 1.80)  # dolly-in: final magnification
_PAN = (0.04, 0.08, 0.12, 0.18, 0.25)  # pans: travel as a fraction of the frame
_ORBIT = (3.0, 5.0, 8.0, 11.0, 15.0)  # orbits: yaw of the picture plane, degrees
_BREATH = (0.02, 0.035, 0.05, 0.07, 0.10)  # static: peak zoom of the breath

_FOCAL = 1.5  # orbit focal length in frame widths (≈37° horizontal field of view)
_MAX_WORK_PIXELS = 24_000_000  # cap on the pre-scaled copy (a 4K frame zoomed 1.7×)
_QUEUE = 3  # frames buffered between the warping and the writing thread


@dataclass(frozen=True)
class RenderInfo:
    """What :func:`render` produced and how long it took."""

    path: Path
    frames: int
    fps: int
    width: int
    height: int
    seconds: float
    work_size: tuple[int, int]  # (width, height) of the pre-scaled source copy


def frame_count(duration: float, fps: int) -> int:
    """Frames in a clip of ``duration`` seconds (at least 2, so every move has a start and an end)."""
    return max(2, round(duration * fps))


def _smoothstep(t: np.ndarray) -> np.ndarray:
    return t * t * (3 - 2 * t)


def _smootherstep(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (6 * t - 15) + 10)


def _dolly_travel(t: np.ndarray, ramp: float = 0.25) -> np.ndarray:
    """Distance covered (0..1) by a dolly that eases up to a steady speed and eases to a stop.

    The speed rises along a smoothstep over the first ``ramp`` of the clip, holds, and falls over the
    last ``ramp``. Steady travel towards a picture magnifies ever faster (1 / distance), which is what
    makes a dolly-in feel unlike a zoom.
    """

    def ramp_area(u: np.ndarray) -> np.ndarray:  # distance covered u·ramp into the speed-up
        return ramp * (u**3 - u**4 / 2)

    total = 1 - ramp
    head = ramp_area(np.clip(t / ramp, 0, 1))
    cruise = np.clip(t - ramp, 0, 1 - 2 * ramp)
    tail = ramp / 2 - ramp_area(np.clip((1 - t) / ramp, 0, 1))
    tail = np.where(t > 1 - ramp, tail, 0.0)
    return (head + cruise + tail) / total


def _translate(dx: float, dy: float) -> np.ndarray:
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


class _Framer:
    """Windows on the source picture in edge coordinates (the picture spans ``[0, W] × [0, H]``)."""

    def __init__(self, src_w: int, src_h: int, out_w: int, out_h: int, focus: Box | None) -> None:
        self.src_w, self.src_h = float(src_w), float(src_h)
        self.out_w, self.out_h = out_w, out_h
        ratio = out_w / out_h
        # The zoom-1 window: the largest rectangle of the output's shape inside the picture.
        if src_w / src_h >= ratio:
            self.bw, self.bh = src_h * ratio, float(src_h)
        else:
            self.bw, self.bh = float(src_w), src_w / ratio
        self.centre = np.array([src_w / 2, src_h / 2])
        self.focus = focus
        if focus is not None:
            fx, fy = focus.center
            self.subject = np.array([min(max(fx, 0.0), src_w), min(max(fy, 0.0), src_h)])
        else:
            self.subject = self.centre.copy()

    def clamp(self, c: np.ndarray, z: float) -> np.ndarray:
        """The nearest window centre for which a window of zoom ``z`` lies inside the picture."""
        hw, hh = self.bw / (2 * z), self.bh / (2 * z)
        return np.array([min(max(c[0], hw), self.src_w - hw), min(max(c[1], hh), self.src_h - hh)])

    def window(self, c: np.ndarray, z: float) -> np.ndarray:
        """Affine map from output edge coordinates to source edge coordinates for a window."""
        s = self.bw / (z * self.out_w)  # source pixels per output pixel; bh/out_h is the same ratio
        return np.array(
            [[s, 0.0, c[0] - s * self.out_w / 2], [0.0, s, c[1] - s * self.out_h / 2], [0.0, 0.0, 1.0]]
        )

    def fit_zoom(self, z: float) -> float:
        """Zoom ``z`` lowered (to no less than halfway) so the focus box fills at most half the frame."""
        if self.focus is None or self.focus.width <= 0 or self.focus.height <= 0:
            return z
        fit = 0.5 * min(self.bw / self.focus.width, self.bh / self.focus.height)
        return max(min(z, fit), 1 + (z - 1) / 2)

    def zoom(self, c0: np.ndarray, z0: float, c1: np.ndarray, z1: float, z: np.ndarray) -> list[np.ndarray]:
        """Windows from ``(c0, z0)`` to ``(c1, z1)`` through zooms ``z``, as one zoom about a fixed point.

        Window edges move as the same convex combination of the two end windows, so if both lie inside
        the picture every window in between does too.
        """
        c0, c1 = self.clamp(c0, z0), self.clamp(c1, z1)
        s = (1 / z0 - 1 / z) / (1 / z0 - 1 / z1)
        return [self.window(c0 + (c1 - c0) * si, zi) for si, zi in zip(s, z, strict=True)]


def _pan(fr: _Framer, camera: CameraMove, motion: int, e: np.ndarray, *, gain: float = 1.0) -> list[np.ndarray]:
    travel = min(_PAN[motion] * gain, 0.4)
    z = 1 / (1 - travel)  # just enough room to travel `travel` frames over a picture of the output's shape
    axis = 0 if camera in (CameraMove.PAN_LEFT, CameraMove.PAN_RIGHT) else 1
    size = (fr.bw, fr.bh)[axis] / z  # window extent along the pan
    full = (fr.src_w, fr.src_h)[axis]
    want = travel * (fr.bw, fr.bh)[axis]
    lo, hi = size / 2, full - size / 2  # window centres inside the picture; hi - lo >= want
    if fr.focus is not None:
        # Keep the subject inside the window (with a margin if there is room) — unless that leaves less
        # than half the travel (a subject at the picture's edge or bigger than the window): then pan anyway,
        # because a frozen clip is worse than a subject that brushes the frame edge.
        b0 = (fr.focus.x, fr.focus.y)[axis]
        b1 = b0 + (fr.focus.width, fr.focus.height)[axis]
        for margin in (0.05 * size, 0.0):
            flo, fhi = max(lo, b1 - size / 2 + margin), min(hi, b0 + size / 2 - margin)
            if fhi - flo >= want / 2:
                lo, hi = flo, fhi
                break
    d = min(want, hi - lo)
    mid = min(max(fr.subject[axis], lo + d / 2), hi - d / 2)
    forward = camera in (CameraMove.PAN_RIGHT, CameraMove.PAN_DOWN)
    start, end = (mid - d / 2, mid + d / 2) if forward else (mid + d / 2, mid - d / 2)
    centre = fr.clamp(fr.subject, z)
    out = []
    for ei in e:
        c = centre.copy()
        c[axis] = start + (end - start) * ei
        out.append(fr.window(c, z))
    return out


def _orbit(fr: _Framer, camera: CameraMove, motion: int, e: np.ndarray) -> list[np.ndarray]:
    sign = 1.0 if camera is CameraMove.ORBIT_LEFT else -1.0  # θ > 0: left side nearer, so larger
    thetas = sign * math.radians(_ORBIT[motion]) * e
    f = _FOCAL * fr.bw
    pivot = fr.subject
    base = fr.window(fr.clamp(pivot, 1.0), 1.0)

    def homography(theta: float, k: float) -> np.ndarray:
        cos, sin = math.cos(theta), math.sin(theta)
        turn = np.array([[f, 0.0, 0.0], [0.0, f * cos, 0.0], [-sin, 0.0, f * cos]])
        zoom = np.diag([1 / k, 1 / k, 1.0])  # about the pivot: the pivot stays where it is on screen
        around = _translate(*pivot) @ turn @ zoom @ _translate(*-pivot)
        return around @ base

    corners = np.array([[0, fr.out_w, 0, fr.out_w], [0, 0, fr.out_h, fr.out_h], [1, 1, 1, 1]], float)

    def inside(theta: float, k: float) -> bool:
        p = homography(theta, k) @ corners
        x, y = p[0] / p[2], p[1] / p[2]
        eps = 1e-6
        return bool(
            np.all(p[2] > 0)
            and np.all((x >= -eps) & (x <= fr.src_w + eps) & (y >= -eps) & (y <= fr.src_h + eps))
        )

    # One zoom for the whole clip (a per-frame zoom would pump): the least that hides every border.
    k = 1.0
    for theta in (thetas[0], thetas[-1]):  # |θ| grows monotonically, so the ends are the extremes
        if not inside(theta, k):
            lo, hi = k, 64.0
            for _ in range(50):
                mid = (lo + hi) / 2
                lo, hi = (lo, mid) if inside(theta, mid) else (mid, hi)
            k = hi
    return [homography(t, k) for t in thetas]


def _edge_path(
    src_w: int, src_h: int, camera: CameraMove, motion: int, n: int, out_w: int, out_h: int, focus: Box | None,
    duration: float = 5.0,
) -> list[np.ndarray]:
    fr = _Framer(src_w, src_h, out_w, out_h, focus)
    t = np.linspace(0.0, 1.0, n)
    # Clips up to LONG_CLIP seconds ease over their whole length. Longer ones would crawl (a 20 s
    # smootherstep barely moves in its first second, which reads as frozen): they ease in and out over
    # half a second, cruise at a steady speed, and travel √(duration/5) times as far, within the picture.
    long = duration > LONG_CLIP
    gain = math.sqrt(duration / 5.0) if long else 1.0

    def ease(whole_clip: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        return _dolly_travel(t, ramp=0.5 / duration) if long else whole_clip(t)

    if camera in (CameraMove.ZOOM_IN, CameraMove.ZOOM_OUT):
        z1 = fr.fit_zoom(_ZOOM[motion] ** gain)
        e = ease(_smootherstep) if camera is CameraMove.ZOOM_IN else 1 - ease(_smootherstep)
        return fr.zoom(fr.subject, 1.0, fr.subject, z1, z1**e)
    if camera is CameraMove.DOLLY_IN:
        z1 = fr.fit_zoom(_DOLLY[motion] ** gain)
        travel = _dolly_travel(t, ramp=0.5 / duration) if long else _dolly_travel(t)
        distance = 1 - (1 - 1 / z1) * travel  # magnification is 1 / distance
        return fr.zoom(fr.subject, 1.0, fr.subject, z1, 1 / distance)
    if camera is CameraMove.STATIC:
        z1 = 1 + _BREATH[motion]
        breaths = max(1, round(duration / 5.0))  # one slow breath every ~5 s, however long the clip
        breath = (1 - np.cos(2 * np.pi * breaths * t)) / 2
        if focus is None:  # drift gently up and to the right while breathing in
            slack = np.array([fr.bw, -fr.bh]) * (1 - 1 / z1) / 2
            target = fr.centre + slack * np.array([0.6, 0.4])
        else:
            target = fr.subject
        return fr.zoom(fr.subject, 1.0, target, z1, z1**breath)
    if camera in (CameraMove.PAN_LEFT, CameraMove.PAN_RIGHT, CameraMove.PAN_UP, CameraMove.PAN_DOWN):
        return _pan(fr, camera, motion, ease(_smoothstep), gain=gain)
    if camera in (CameraMove.ORBIT_LEFT, CameraMove.ORBIT_RIGHT):
        return _orbit(fr, camera, motion, ease(_smoothstep) * min(gain, 2.0))
    raise ValueError(f"unknown camera move {camera!r}")


# Edge coordinates put pixel centres at +0.5; OpenCV's index coordinates put them at integers.
_TO_EDGE = _translate(0.5, 0.5)
_TO_INDEX = _translate(-0.5, -0.5)


def camera_path(
    source_size: tuple[int, int],
    *,
    camera: CameraMove,
    motion: int = 2,
    duration: float,
    fps: int,
    width: int,
    height: int,
    focus: Box | None = None,
) -> list[np.ndarray]:
    """The ideal camera: per frame, a 3×3 matrix mapping output pixel coordinates to source ones.

    Coordinates are OpenCV's (pixel centres at integers), in the *original* picture of size
    ``source_size = (width, height)``: ``cv2.warpPerspective(src, m, (width, height),
    flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)`` renders frame ``i`` directly. Matrices are
    normalised to ``m[2, 2] == 1``; every move but the orbits is affine (last row ``[0, 0, 1]``).
    """
    camera = CameraMove(camera)
    if not 0 <= motion < len(_ZOOM):
        raise ValueError(f"motion must be 0..{len(_ZOOM) - 1}, got {motion!r}")
    src_w, src_h = source_size
    n = frame_count(duration, fps)
    edge = _edge_path(src_w, src_h, camera, motion, n, width, height, focus, duration)
    out = [_TO_INDEX @ m @ _TO_EDGE for m in edge]
    return [m / m[2, 2] for m in out]


def work_scale(path: list[np.ndarray], width: int, height: int) -> float:
    """Output pixels per source pixel at the most zoomed-in point of ``path`` (>1: the source is small).

    Pre-scaling the source by this factor makes the tightest frame sample it 1:1. Measured at the
    corners and the centre of every frame (a homography's scale varies across the frame).
    """
    right, bottom = width - 1.0, height - 1.0
    base = np.array([[0, right, 0, right, right / 2], [0, 0, bottom, bottom, bottom / 2], [1, 1, 1, 1, 1]])
    one_x, one_y = np.array([[1.0], [0.0], [0.0]]), np.array([[0.0], [1.0], [0.0]])
    steps = (base, base + one_x, base + one_y)
    mats = np.stack(path)  # (n, 3, 3)
    mapped = [mats @ p for p in steps]
    q = [m[:, :2] / m[:, 2:] for m in mapped]  # (n, 2, 5) each
    jac = np.stack([q[1] - q[0], q[2] - q[0]], axis=-1)  # (n, 2, 5, 2): columns d/dx, d/dy
    finest = np.linalg.svd(jac.transpose(0, 2, 1, 3), compute_uv=False)[..., -1].min()
    return float(1 / finest)


def _footprint(path: list[np.ndarray], width: int, height: int, src_w: int, src_h: int) -> tuple[int, ...]:
    """Integer bounding box ``(x0, y0, x1, y1)`` of every source pixel the path samples, plus a margin."""
    corners = np.array(
        [[-0.5, width - 0.5, -0.5, width - 0.5], [-0.5, -0.5, height - 0.5, height - 0.5], [1, 1, 1, 1]]
    )
    p = np.stack(path) @ corners
    x, y = p[:, 0] / p[:, 2], p[:, 1] / p[:, 2]
    x0 = max(0, math.floor(x.min()) - 2)
    y0 = max(0, math.floor(y.min()) - 2)
    x1 = min(src_w, math.ceil(x.max()) + 3)
    y1 = min(src_h, math.ceil(y.max()) + 3)
    return x0, y0, x1, y1


@dataclass(frozen=True)
class _Planes:
    y: np.ndarray
    cb: np.ndarray
    cr: np.ndarray
    to_work: np.ndarray  # source index coordinates → work luma *edge* coordinates


def _prepare(image: np.ndarray, path: list[np.ndarray], width: int, height: int) -> _Planes:
    """Crop, pre-scale once and convert to Y'CbCr planes (chroma at half size)."""
    src_h, src_w = image.shape[:2]
    x0, y0, x1, y1 = _footprint(path, width, height, src_w, src_h)
    crop = image[y0:y1, x0:x1]
    k = work_scale(path, width, height)
    ww, wh = (x1 - x0) * k, (y1 - y0) * k
    if ww * wh > _MAX_WORK_PIXELS:
        shrink = math.sqrt(_MAX_WORK_PIXELS / (ww * wh))
        ww, wh = ww * shrink, wh * shrink
    ww, wh = max(2, 2 * round(ww / 2)), max(2, 2 * round(wh / 2))  # even: chroma is exactly half
    if (ww, wh) != (crop.shape[1], crop.shape[0]):
        upscale = ww * wh > crop.shape[0] * crop.shape[1]
        crop = cv2.resize(crop, (ww, wh), interpolation=cv2.INTER_CUBIC if upscale else cv2.INTER_AREA)
    ycc = rgb_to_ycbcr(crop)
    chroma = cv2.resize(ycc[:, :, 1:], (ww // 2, wh // 2), interpolation=cv2.INTER_AREA)
    kx, ky = ww / (x1 - x0), wh / (y1 - y0)
    to_work = np.diag([kx, ky, 1.0]) @ _translate(-x0, -y0) @ _TO_EDGE
    return _Planes(
        y=np.ascontiguousarray(ycc[:, :, 0]),
        cb=np.ascontiguousarray(chroma[:, :, 0]),
        cr=np.ascontiguousarray(chroma[:, :, 1]),
        to_work=to_work,
    )


def _plane_maps(m: np.ndarray, to_work: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Warp matrices for one frame: output luma index → work luma index, output chroma → work chroma."""
    luma = _TO_INDEX @ to_work @ m
    # Output chroma sample (i, j) sits at output luma edge coordinates (2i + sx, 2j + sy); work chroma
    # samples are 2×2 averages, so work luma edge coordinates halve into work chroma edge coordinates.
    sx, sy = CHROMA_SITING
    out_chroma = np.array([[2.0, 0.0, sx], [0.0, 2.0, sy], [0.0, 0.0, 1.0]])
    chroma = _TO_INDEX @ np.diag([0.5, 0.5, 1.0]) @ to_work @ m @ _TO_INDEX @ out_chroma
    return luma / luma[2, 2], chroma / chroma[2, 2]


def _warp_into(buf: np.ndarray, planes: _Planes, m: np.ndarray, w: int, h: int) -> None:
    """Render one frame into ``buf``, a flat yuv420p (I420) buffer of ``w*h*3/2`` bytes."""
    luma, chroma = w * h, (w // 2) * (h // 2)
    y = buf[:luma].reshape(h, w)
    u = buf[luma : luma + chroma].reshape(h // 2, w // 2)
    v = buf[luma + chroma :].reshape(h // 2, w // 2)
    ml, mc = _plane_maps(m, planes.to_work)
    flags, border = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, cv2.BORDER_REPLICATE
    half = (w // 2, h // 2)
    if abs(m[2, 0]) < 1e-12 and abs(m[2, 1]) < 1e-12:  # affine: the cheaper warp
        cv2.warpAffine(planes.y, ml[:2], (w, h), dst=y, flags=flags, borderMode=border)
        cv2.warpAffine(planes.cb, mc[:2], half, dst=u, flags=flags, borderMode=border)
        cv2.warpAffine(planes.cr, mc[:2], half, dst=v, flags=flags, borderMode=border)
    else:
        cv2.warpPerspective(planes.y, ml, (w, h), dst=y, flags=flags, borderMode=border)
        cv2.warpPerspective(planes.cb, mc, half, dst=u, flags=flags, borderMode=border)
        cv2.warpPerspective(planes.cr, mc, half, dst=v, flags=flags, borderMode=border)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.ndim == 3 and image.shape[2] == 4:
        return np.ascontiguousarray(image[:, :, :3])
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    raise ValueError(f"image must be (H, W, 3) RGB, got shape {image.shape}")


def render(
    image: np.ndarray,
    out_path: Path,
    *,
    camera: CameraMove,
    motion: int,
    duration: float,
    fps: int,
    width: int,
    height: int,
    focus: Box | None = None,
    progress: Callable[[float], None] | None = None,
) -> RenderInfo:
    """Animate an RGB uint8 picture into an H.264 MP4 at ``out_path`` with one camera move.

    ``focus`` is the subject (e.g. a face) in the picture's pixel coordinates. ``progress`` is called
    with the fraction done after every frame; if it raises, rendering stops, no file appears and the
    exception propagates (that is how a render is canceled). Width and height must be even.
    """
    started = time.perf_counter()
    rgb = _as_rgb(image)
    path = camera_path(
        (rgb.shape[1], rgb.shape[0]), camera=camera, motion=motion, duration=duration, fps=fps,
        width=width, height=height, focus=focus,
    )
    with VideoWriter(out_path, width=width, height=height, fps=fps, pix_fmt="yuv420p") as writer:
        planes = _prepare(rgb, path, width, height)  # while ffmpeg starts up
        _pump(writer, planes, path, progress)
    if progress is not None:
        progress(1.0)
    return RenderInfo(
        path=Path(out_path),
        frames=len(path),
        fps=fps,
        width=width,
        height=height,
        seconds=time.perf_counter() - started,
        work_size=(planes.y.shape[1], planes.y.shape[0]),
    )


def yuv_frames(
    image: np.ndarray,
    *,
    camera: CameraMove,
    motion: int,
    duration: float,
    fps: int,
    width: int,
    height: int,
    focus: Box | None = None,
) -> Iterator[np.ndarray]:
    """The frames :func:`render` encodes, without encoding: ``(H*3/2, W)`` uint8 I420 arrays.

    Rows ``[:H]`` are BT.709 luma, then the Cb and Cr planes at half size. For tests and benchmarks
    that need to separate the renderer from the encoder.
    """
    rgb = _as_rgb(image)
    path = camera_path(
        (rgb.shape[1], rgb.shape[0]), camera=camera, motion=motion, duration=duration, fps=fps,
        width=width, height=height, focus=focus,
    )
    planes = _prepare(rgb, path, width, height)
    for m in path:
        buf = np.empty(width * height * 3 // 2, np.uint8)
        _warp_into(buf, planes, m, width, height)
        yield buf.reshape(height * 3 // 2, width)


def _pump(
    writer: VideoWriter,
    planes: _Planes,
    path: list[np.ndarray],
    progress: Callable[[float], None] | None,
) -> None:
    """Warp every frame on this thread while a second thread writes finished frames to ffmpeg."""
    w, h = writer.width, writer.height
    luma, chroma = w * h, (w // 2) * (h // 2)
    free: queue.Queue[np.ndarray] = queue.Queue()
    for _ in range(_QUEUE + 1):
        free.put(np.empty(luma + 2 * chroma, np.uint8))
    full: queue.Queue[np.ndarray | None] = queue.Queue()
    failure: list[BaseException] = []

    def feed() -> None:
        try:
            while (buf := full.get()) is not None:
                writer.write(buf)
                free.put(buf)
        except BaseException as exc:  # handed to the warping thread, which re-raises it
            failure.append(exc)
            free.put(np.empty(0, np.uint8))  # wake the warping thread if it waits for a buffer

    feeder = threading.Thread(target=feed, name="animator-writer", daemon=True)
    feeder.start()
    try:
        for i, m in enumerate(path):
            buf = free.get()
            if failure:
                break
            _warp_into(buf, planes, m, w, h)
            full.put(buf)
            if progress is not None:
                progress((i + 1) / (len(path) + 1))
    except BaseException:
        writer.abort()  # unblocks a feeder stuck in a pipe write
        full.put(None)
        feeder.join()
        raise
    full.put(None)
    feeder.join()
    if failure:
        raise failure[0]
