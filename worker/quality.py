"""Judges a generated clip before a user sees it: accept, or reject with named reasons and the metrics.

Image-to-video models fail in a handful of recognisable ways: the picture never moves, frames go black,
brightness pumps, the shot cuts or jumps, the subject melts into something else, noise or block garbage
appears, the clip does not start from the user's picture, or the file is simply the wrong length or size.
A rejected clip is retried silently (:mod:`worker.pipeline`), so every check must be cheap enough to run on
every attempt (CPU only, no learned weights, well under a second for a 5 s 720p clip) and must never reject
a clean camera move or gentle local motion (water, hair, clouds), even at a low bitrate::

    verdict = judge(path, width=1280, height=720, fps=24, duration=5.0, source=fitted_rgb)
    verdict.accepted, verdict.reasons, verdict.score   # False, ["flicker"], 0.31
    REASON_TEXT["flicker"]                             # "flickered": "that one flickered, trying again"

How: one ffmpeg run (there is no ffprobe) reports the header and decodes the clip **once** to about
320×180 (``scale=…:flags=area``, planar Y'CbCr, so no colour conversion); everything is computed with
numpy/OpenCV on that, in about 0.1 s for 120 frames. Starting points: reference/video.md §3.2.

================  ========================================================================================
reason            measured as (``Y`` is full-range luma 0-255 at the analysis size)
================  ========================================================================================
undecodable       ffmpeg cannot read the file, or it holds no video frames
wrong_resolution  the clip's size differs from the request
wrong_duration    ``|duration - requested| > max(0.25 s, 5 %)``
too_few_frames    fewer than 95 % of ``fps·duration`` frames
black_frames      a run of frames that are black (mean ``Y`` < 16) or blank (std ``Y`` < 5)
frozen            a run of identical frames (MAD to the run's first frame < 0.3) of ≥ 1 s or half the clip,
                  or no real motion at all: optical flow from the first frame never exceeds ``frozen_motion``
hard_cut          a frame-to-frame change far above the clip's usual one that optical flow cannot explain
flicker           the median second difference of mean luma, frame to frame
corruption        noise storms (noise in a frame's temporal residual far above the clip's usual) or block
                  garbage (patches that exist in one frame only, outside the local range of both neighbours)
wrong_start       frame 0, aligned to the source (ORB + RANSAC homography refined by ECC), is not the
                  source: low SSIM, part of the frame not in the source, or too little of the source shown
drift             a later frame, aligned the same way, has lost the source's structure (SSIM, absolute or
                  fallen from frame 0's) or its colours (mean chroma error)
================  ========================================================================================

``wrong_start`` and ``drift`` need the ``source`` picture and are skipped without it. Every threshold is a
field of :class:`Thresholds` with its default documented; they were calibrated on defects made from real
photographs (``tests/worker/test_quality.py``, ``bench/quality_gate.py``) and should be retuned on real
provider output: log the metrics of every attempt and put each cut beyond the 1st/99th percentile of
clips people kept (reference/video.md §3.4).
"""

from __future__ import annotations

import math
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from backends import video

__all__ = ["REASONS", "REASON_TEXT", "Thresholds", "Verdict", "analysis_size", "judge", "judge_frames"]

#: Every reason the gate gives, in the order it reports them (most fundamental first).
REASONS = (
    "undecodable",
    "wrong_resolution",
    "wrong_duration",
    "too_few_frames",
    "black_frames",
    "frozen",
    "hard_cut",
    "corruption",
    "flicker",
    "wrong_start",
    "drift",
)

#: A phrase per reason for messages to users: "that one {text}, trying again".
REASON_TEXT = {
    "undecodable": "could not be played",
    "wrong_resolution": "came out at the wrong size",
    "wrong_duration": "came out the wrong length",
    "too_few_frames": "was missing frames",
    "black_frames": "had black or blank frames",
    "frozen": "came out frozen",
    "hard_cut": "jumped or cut suddenly",
    "corruption": "came out noisy or garbled",
    "flicker": "flickered",
    "wrong_start": "did not start from your picture",
    "drift": "drifted away from your picture",
}


@dataclass(frozen=True)
class Thresholds:
    """Every limit the gate applies, with its default; settings expose each as ``ANIMABOT_QC_<FIELD>``.

    Distances in pixels are at the analysis size (about 320×180, whatever the clip's size); luma values
    are full-range 0-255. Defaults: reference/video.md §3.2, checked on ``tests/worker/test_quality.py``.
    """

    # Metadata: |duration - requested| may be up to max(duration_slack_s, duration_slack · requested).
    duration_slack_s: float = 0.25
    duration_slack: float = 0.05
    # Frames decoded must be at least this fraction of fps · duration.
    min_frames: float = 0.95
    # Black frame: mean luma below this (not judged when the source itself averages below twice this).
    black_luma: float = 16.0
    # Blank frame: luma standard deviation below this: a flat grey or single-colour frame (not judged
    # when the source itself is that flat).
    blank_std: float = 5.0
    # Reject when black/blank frames form a run this long, or exceed black_fraction of the clip.
    black_run: int = 3
    black_fraction: float = 0.03
    # Frozen: consecutive frames within this mean absolute luma difference of the run's first frame are
    # "the same picture" (0.3 ≈ ffmpeg freezedetect's -60 dB; encoded frozen frames measure ≤ 0.02).
    # Comparing with the run's first frame keeps the slow start of an eased move from counting. On
    # smooth pictures (mean luma gradient below 3 per px) the limit shrinks in proportion, to ≥ 0.02.
    frozen_mad: float = 0.3
    # ...and a run of them lasting this long, or this fraction of the clip, is a freeze.
    frozen_run_s: float = 1.0
    frozen_fraction: float = 0.5
    # No real motion: optical flow from frame 0 (99th percentile over textured pixels, px) never exceeds
    # this. A 0.3 px wobble measures 0.6-0.8 (codec noise included); hair swaying by 2 px ≈1.5, water
    # rippling by 2 px ≈3, camera moves 6-95. That is ≈4 px at 1280×720: slower motion counts as none.
    frozen_motion: float = 1.0
    # Hard cut / jump: a frame-to-frame MAD this many times the clip's usual MAD (median over the pairs
    # that change at all, at least 1)... Clean moves peak at 1.8×; cuts and jumps at 24 fps reach 8-20×.
    cut_spike: float = 6.0
    # ...and at least this large (unrelated pictures and jumps: 50-140).
    cut_mad: float = 20.0
    # A smaller spike, down to this many times the usual MAD, is a cut too if the change is still cut_mad
    # after optical-flow motion compensation (cuts and big jumps leave 50-70; fast clean moves 1-3).
    # Catches cuts in fast content, e.g. 8 fps steps repeated to 24 fps, where a cut is 3-5× a step.
    cut_weak_spike: float = 2.5
    # Flicker: median |L_t - (L_t-1 + L_t+1)/2| of the mean luma L. Clean moves score 0-0.3; brightness
    # alternating by ±2 % scores ≈5, by ±8 % ≈22.
    flicker_luma: float = 2.0
    # Noise storm: Immerkær sigma of a frame's temporal residual this many times the median of the
    # frames within a second of it in the same shot (at least 1)... Clean moves peak at 1.8×. Gaussian
    # noise of sigma 30 on some 720p frames reaches 4.9× (sigma 15: 2.5×, missed), on 320×180 frames 7-9×.
    noise_ratio: float = 3.0
    # ...and at least this sigma.
    noise_min: float = 3.0
    # Block garbage: a block (8×8 px) lying on average this far outside the local range (5×5 px) of
    # both neighbouring frames exists in one frame only (clean moves: no such block at all)...
    garbage_level: float = 24.0
    # ...and a frame with more than this fraction of such blocks is corrupt (≈4 of 880 at 320×180;
    # 100 random 16×16 blocks on a 720p frame make 0.014).
    garbage_blocks: float = 0.005
    # Wrong start: frame 0, aligned to the source, has SSIM below this...
    start_ssim: float = 0.5
    # ...or less than this fraction of it shows the source (the rest is invented or shifted in)...
    # (every clean move: 1.0; the picture shifted by 35 %: 0.65)
    start_coverage: float = 0.85
    # ...or it shows less than this fraction of the source's area (zoom-out at motion 4 starts at 1.55×,
    # that is 0.42 of the area; pans at motion 4 at 1.33×, 0.56).
    start_area: float = 0.3
    # Drift: a later frame, aligned to the source, has SSIM below this...
    drift_ssim: float = 0.5
    # ...or this much below frame 0's (clean moves lose < 0.06, also at CRF 35; moving clouds 0.1; a
    # picture melting by 8 px of smooth warp over the clip 0.3)...
    drift_drop: float = 0.25
    # ...or a mean chroma error (|ΔCb| + |ΔCr|, 8-bit, blurred) against the aligned source above this
    # (clean photographs 1-3, also at CRF 35; a hue turning by 15° over the clip scores ≈5, by 30° ≈10).
    drift_colour: float = 8.0


@dataclass(frozen=True)
class Verdict:
    """The gate's decision on one clip.

    ``reasons`` are names from :data:`REASONS` (empty when accepted); ``metrics`` is a flat dict of
    rounded floats; ``score`` in [0, 1] ranks candidates (accepted clips score 0.5-1, rejected below
    0.5); ``detail`` says why a file could not be decoded.
    """

    accepted: bool
    reasons: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    score: float = 0.0
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        """``{"accepted": ..., "reasons": [...], "score": ..., "metrics": {...}}`` (plus ``detail``)."""
        out: dict[str, Any] = {
            "accepted": self.accepted,
            "reasons": list(self.reasons),
            "score": self.score,
            "metrics": dict(self.metrics),
        }
        if self.detail:
            out["detail"] = self.detail
        return out

    def describe(self) -> str:
        """The reasons as one phrase for a user: ``"came out frozen and flickered"`` (empty if accepted)."""
        parts = [REASON_TEXT.get(r, r) for r in self.reasons]
        if len(parts) <= 1:
            return "".join(parts)
        return ", ".join(parts[:-1]) + " and " + parts[-1]


# ---------------------------------------------------------------------------------------------------
# Decoding

_ANALYSIS_PIXELS = 320 * 180
_MAX_FRAMES_FACTOR = 2.0  # decode at most twice the requested frames (a 10-minute file is not a clip)
# Limited-range (16-235) luma to full range (0-255).
_FULL_RANGE = np.clip((np.arange(256, dtype=np.float32) - 16) * 255 / 219, 0, 255).astype(np.float32)


@dataclass(frozen=True)
class _Decoded:
    """What one ffmpeg run told us: the stream's header, and every frame at the analysis size."""

    width: int
    height: int
    fps: float
    duration: float  # the container's, in seconds (0 if unknown)
    y: np.ndarray  # (n, h, w) uint8 limited-range luma
    cb: np.ndarray  # (n, h/2, w/2) uint8
    cr: np.ndarray


def analysis_size(width: int, height: int) -> tuple[int, int]:
    """The size the gate looks at: about 320×180 worth of pixels, same aspect, even, never upscaled."""
    s = min(1.0, math.sqrt(_ANALYSIS_PIXELS / max(1, width * height)))
    # floor(x + 0.5), not round(): ffmpeg's round() goes half away from zero, Python's half to even
    return max(2, math.floor(width * s / 2 + 0.5) * 2), max(2, math.floor(height * s / 2 + 0.5) * 2)


def _stream(text: str, path: Path) -> tuple[int, int, float]:
    """Size and frame rate from the first video stream line of an ffmpeg banner."""
    stream = re.search(r"Stream #\d+:\d+.*?: Video: (.*)", text)
    if stream is None:
        raise video.VideoError(f"{path.name} has no video stream: {text.strip()[-300:]}")
    size = re.search(r"(?:^|[\s,])(\d{1,5})x(\d{1,5})(?=[\s,\[]|$)", stream.group(1))
    rate = re.search(r"([\d.]+)(k?) (?:fps|tbr)", stream.group(1))
    if size is None:
        raise video.VideoError(f"{path.name}: no frame size in {stream.group(0)!r}")
    fps = float(rate.group(1)) * (1000 if rate.group(2) else 1) if rate else 0.0
    return int(size.group(1)), int(size.group(2)), fps


def _decode(path: Path, max_frames: int) -> _Decoded:
    """Decode once to planar yuv420p at the analysis size; the header comes from the same ffmpeg run.

    One process instead of a probe and then a decode saves ≈25 ms; the size is chosen by an ffmpeg
    expression equivalent to :func:`analysis_size` and read back from the output stream's banner.
    Planar Y'CbCr needs no colour conversion, and deblocking stays on: what we measure is what plays.
    """
    if not path.is_file():
        raise video.VideoError(f"{path} does not exist")
    s = f"min(1,sqrt({_ANALYSIS_PIXELS}/(iw*ih)))"
    scale = f"scale=w='max(2,2*round(iw*{s}/2))':h='max(2,2*round(ih*{s}/2))':flags=area"
    cmd = [
        video.ffmpeg_exe(), "-hide_banner", "-nostdin", "-nostats", "-loglevel", "info", "-i", str(path),
        "-map", "0:v:0", "-frames:v", str(max_frames), "-vf", scale, "-pix_fmt", "yuv420p",
        "-f", "rawvideo", "pipe:1",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, timeout=300, check=False)
    text = proc.stderr.decode(errors="replace")
    if proc.returncode != 0:
        raise video.VideoError(f"cannot decode {path.name}: {text.strip()[-300:]}")
    head, _, tail = text.partition("Output #0")
    width, height, fps = _stream(head, path)
    w, h, _ = _stream(tail, path)
    span = re.search(r"Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)", head)
    seconds = int(span.group(1)) * 3600 + int(span.group(2)) * 60 + float(span.group(3)) if span else 0.0
    luma, quarter = w * h, (w // 2) * (h // 2)
    n = len(proc.stdout) // (luma + 2 * quarter)
    if n == 0:
        raise video.VideoError(f"{path.name} holds no decodable video frames")
    raw = np.frombuffer(proc.stdout, np.uint8, count=n * (luma + 2 * quarter)).reshape(n, -1)
    y = raw[:, :luma].reshape(n, h, w)
    cb = raw[:, luma : luma + quarter].reshape(n, h // 2, w // 2)
    cr = raw[:, luma + quarter :].reshape(n, h // 2, w // 2)
    return _Decoded(width, height, fps, seconds, y, cb, cr)


# ---------------------------------------------------------------------------------------------------
# Measuring

_IMMERKAER = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)
_MOTION_SAMPLES = 8  # frames compared with frame 0 by optical flow
_SOURCE_SAMPLES = 8  # frames aligned to the source for drift (plus frame 0 for the start)
_MIN_INLIERS = 12  # RANSAC inliers for a trusted alignment
_BLOCK = 8  # garbage block size at the analysis size
_SPECKLE = 3.0  # a frame whose spatial noise sigma is this × the clip's median is noise, not a cut
_MIN_SIDE = 16  # below this many pixels a side only the metadata is judged
_TEXTURE = 6.0  # luma gradient (per px) above which optical flow is trusted
_ECC = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 30, 1e-4)
_GOOD_MATCH = 0.9  # an alignment with this SSIM ends the search for a better one
_PLAUSIBLE_AREA = (0.05, 2.0)  # a frame shows between 5 % and 200 % of the source's area
_FLAT = 3.0  # mean luma gradient (per px) below which a picture is smooth enough to scale frozen_mad down


@dataclass
class _Source:
    """The source picture prepared once: luma for matching at 2× the analysis size, Y'CbCr for comparing."""

    keypoints: Any
    descriptors: np.ndarray | None
    ycc: np.ndarray  # (h, w, 3) float32: full-range Y, Cb, Cr at the analysis size
    half: np.ndarray  # (h/2, w/2) float32 full-range luma, what ECC aligns frames to
    mean: float
    std: float


def _luma_full(y: np.ndarray) -> np.ndarray:
    """Limited-range uint8 luma of any shape to full-range float32."""
    flat = y.reshape(-1, y.shape[-1])
    return cv2.LUT(flat, _FULL_RANGE).reshape(y.shape)


def _noise(y: np.ndarray) -> float:
    """Immerkær (1996) noise sigma of one float32 luma frame."""
    h, w = y.shape
    resp = cv2.filter2D(y, cv2.CV_32F, _IMMERKAER)[1:-1, 1:-1]
    return float(cv2.norm(resp, cv2.NORM_L1)) * math.sqrt(math.pi / 2) / (6 * (w - 2) * (h - 2))


def _orb() -> Any:
    # A low FAST threshold (default 20) still finds corners in soft or slightly blurred pictures.
    return cv2.ORB_create(nfeatures=500, edgeThreshold=19, patchSize=19, fastThreshold=7)


def _prepare_source(source: np.ndarray, size: tuple[int, int]) -> _Source:
    w, h = size
    if source.dtype != np.uint8 or source.ndim not in (2, 3):
        raise ValueError(f"source must be an RGB uint8 image, got {source.dtype} {source.shape}")
    rgb = source if source.ndim == 3 else cv2.cvtColor(source, cv2.COLOR_GRAY2RGB)
    rgb = np.ascontiguousarray(rgb[:, :, :3])

    def fit(scale: int) -> np.ndarray:
        big = rgb.shape[1] >= w * scale
        interp = cv2.INTER_AREA if big else cv2.INTER_CUBIC
        return cv2.resize(rgb, (w * scale, h * scale), interpolation=interp)

    ycc = video.rgb_to_ycbcr(fit(1)).astype(np.float32)
    ycc[..., 0] = _FULL_RANGE[ycc[..., 0].astype(np.uint8)]
    match = _FULL_RANGE[video.rgb_to_ycbcr(fit(2))[..., 0]].astype(np.uint8)
    keypoints, descriptors = _orb().detectAndCompute(match, None)
    mean, std = cv2.meanStdDev(ycc[..., 0])
    half = cv2.resize(ycc[..., 0], (w // 2, h // 2), interpolation=cv2.INTER_AREA)
    return _Source(keypoints, descriptors, ycc, half, float(mean[0, 0]), float(std[0, 0]))


def _runs(flags: np.ndarray) -> int:
    """Length of the longest run of True."""
    best = cur = 0
    for f in flags:
        cur = cur + 1 if f else 0
        best = max(best, cur)
    return best


def _ssim(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Mean SSIM (Gaussian sigma=1.5 windows, 8-bit constants) of two float32 images over ``mask``."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def blur(x: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(x, (7, 7), 1.5)

    ma, mb = blur(a), blur(b)
    va, vb, cov = blur(a * a) - ma * ma, blur(b * b) - mb * mb, blur(a * b) - ma * mb
    s = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2))
    if not mask.any():
        return 0.0
    return float(s[mask].mean())


@dataclass
class _Alignment:
    ssim: float
    colour: float
    coverage: float
    area: float
    inliers: int


def _match(y8: np.ndarray, src: _Source) -> tuple[np.ndarray | None, int]:
    """ORB features of a frame matched to the source's: a RANSAC homography and its inlier count."""
    h, w = y8.shape
    keypoints, descriptors = _orb().detectAndCompute(y8, None)
    if descriptors is None or src.descriptors is None or len(keypoints) < _MIN_INLIERS:
        return None, 0
    pairs = cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(descriptors, src.descriptors, k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < 0.8 * p[1].distance]
    if len(good) < _MIN_INLIERS:
        return None, 0
    a = np.float32([keypoints[g.queryIdx].pt for g in good])
    b = np.float32([src.keypoints[g.trainIdx].pt for g in good]) * 0.5 - 0.25  # 2× → analysis px
    try:
        found, mask = cv2.findHomography(a, b, cv2.RANSAC, 1.5)
    except cv2.error:  # degenerate point sets
        return None, 0
    if found is None or mask is None or int(mask.sum()) < _MIN_INLIERS or not _plausible(found, w, h, src):
        return None, 0
    return found, int(mask.sum())


def _refine(matrix: np.ndarray, small: np.ndarray, src: _Source) -> np.ndarray | None:
    """ECC homography refinement on half-size luma (``None`` if it fails or lands somewhere absurd)."""
    half = np.array([[2, 0, 0.5], [0, 2, 0.5], [0, 0, 1.0]])  # half px → analysis px: x = 2·x' + 0.5
    start = np.linalg.inv(half) @ matrix @ half
    try:
        _, found = cv2.findTransformECC(
            small, src.half, (start / start[2, 2]).astype(np.float32), cv2.MOTION_HOMOGRAPHY, _ECC, None, 3
        )
    except cv2.error:  # did not converge (drifted content often does this)
        return None
    refined = half @ found.astype(np.float64) @ np.linalg.inv(half)
    h, w = small.shape
    return refined if _plausible(refined, 2 * w, 2 * h, src) else None  # ECC can slide off on flat pictures


def _compare(
    matrix: np.ndarray, small: np.ndarray, cb: np.ndarray, cr: np.ndarray, src: _Source, inliers: int
) -> _Alignment:
    """SSIM, chroma error, coverage and area of a frame against the source seen through ``matrix``."""
    hh, hw = small.shape
    m = matrix @ np.array([[2, 0, 0.5], [0, 2, 0.5], [0, 0, 1.0]])
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    warped = cv2.warpPerspective(src.ycc, m, (hw, hh), flags=flags, borderMode=cv2.BORDER_CONSTANT)
    ones = np.ones(src.ycc.shape[:2], np.float32)
    valid = cv2.warpPerspective(ones, m, (hw, hh), flags=flags, borderMode=cv2.BORDER_CONSTANT) > 0.999
    core = cv2.erode(valid.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    ssim = _ssim(small, warped[..., 0], core)
    diff = cv2.GaussianBlur(np.dstack([cb, cr]).astype(np.float32) - warped[..., 1:], (0, 0), 2.0)
    colour = float(np.abs(diff).sum(axis=2)[core].mean()) if core.any() else 255.0
    quad = _quad(matrix, 2 * hw, 2 * hh)
    sh, sw = src.ycc.shape[:2]
    area = float(abs(cv2.contourArea(quad))) / (sw * sh) if quad is not None else 0.0
    return _Alignment(ssim, colour, float(valid.mean()), area, inliers)


def _align(
    y: np.ndarray, y8: np.ndarray, cb: np.ndarray, cr: np.ndarray, src: _Source, guess: np.ndarray | None
) -> tuple[_Alignment, np.ndarray]:
    """Align one frame to the source and compare them at half the analysis size.

    Candidates, best match kept: the ORB + RANSAC homography and ``guess`` (the previous sample's, or
    the identity), each refined by ECC and as is. The first candidate that matches well ends the search,
    so a clean frame costs one match, one ECC and one comparison; ECC brings the corners within ≈0.5 px
    of the true camera path. Returns the comparison and the homography (frame px → source px, both at
    the analysis size).
    """
    h, w = y.shape
    small = cv2.resize(y, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
    found, inliers = _match(y8, src)
    best: tuple[_Alignment, np.ndarray] | None = None
    for start in (found, guess if guess is not None else np.eye(3)):
        if start is None:
            continue
        for matrix in (_refine(start, small, src), start):
            if matrix is None:
                continue
            result = _compare(matrix, small, cb, cr, src, inliers)
            if best is None or result.ssim > best[0].ssim:
                best = (result, matrix)
        if best is not None and best[0].ssim >= _GOOD_MATCH:
            break
    assert best is not None
    return best


def _quad(matrix: np.ndarray, w: int, h: int) -> np.ndarray | None:
    """Where a homography puts the corners of a w×h frame (``None`` if one lands behind the camera)."""
    corners = np.array([[-0.5, w - 0.5, w - 0.5, -0.5], [-0.5, -0.5, h - 0.5, h - 0.5], [1, 1, 1, 1]])
    p = matrix @ corners
    if np.any(p[2] <= 0):
        return None
    return (p[:2] / p[2]).T.astype(np.float32)


def _plausible(matrix: np.ndarray, w: int, h: int, src: _Source) -> bool:
    """A frame can be some view of the source: a convex quad of sane size, mostly on the picture."""
    quad = _quad(matrix, w, h)
    if quad is None or not cv2.isContourConvex(quad.reshape(-1, 1, 2)):
        return False
    sh, sw = src.ycc.shape[:2]
    area = abs(cv2.contourArea(quad))
    picture = np.float32([[-0.5, -0.5], [sw - 0.5, -0.5], [sw - 0.5, sh - 0.5], [-0.5, sh - 0.5]])
    overlap, _ = cv2.intersectConvexConvex(quad, picture)
    return _PLAUSIBLE_AREA[0] <= area / (sw * sh) <= _PLAUSIBLE_AREA[1] and overlap >= 0.5 * area


def _nearest_good(target: int, bad: np.ndarray) -> int | None:
    n = len(bad)
    for d in range(n):
        for i in (target - d, target + d):
            if 0 <= i < n and not bad[i]:
                return i
    return None


@dataclass
class _Frames:
    """One clip at the analysis size, and what several checks share."""

    y: np.ndarray  # (n, h, w) float32 full-range luma
    y8: np.ndarray  # the same as uint8, for OpenCV's feature, flow and morphology code
    cb: np.ndarray  # (n, h/2, w/2) uint8
    cr: np.ndarray
    fps: float
    means: np.ndarray  # (n,) mean luma
    mads: np.ndarray  # (n-1,) mean |Y_t - Y_t-1|
    black: np.ndarray  # (n,) bool: black or blank
    metrics: dict[str, float] = field(default_factory=dict)
    reasons: set[str] = field(default_factory=set)

    @property
    def n(self) -> int:
        return len(self.y)


def _check_black(c: _Frames, src: _Source | None, t: Thresholds, stds: np.ndarray) -> None:
    """Black (dark) or blank (flat) frames; relaxed when the source itself is dark or flat."""
    dark = c.means < t.black_luma
    flat = stds < t.blank_std
    if src is not None:
        dark &= src.mean >= 2 * t.black_luma
        flat &= src.std >= 2 * t.blank_std
    c.black = dark | flat
    c.metrics.update(
        black_frames=float(c.black.sum()), black_run=float(_runs(c.black)),
        luma_min=float(c.means.min()), std_min=float(stds.min()),
    )  # fmt: skip
    if _runs(c.black) >= t.black_run or c.black.mean() > t.black_fraction:
        c.reasons.add("black_frames")


def _check_frozen(c: _Frames, t: Thresholds) -> float:
    """Frozen runs, and the clip's motion extent (returned, px at the analysis size)."""
    n, (h, w) = c.n, c.y.shape[1:]
    soft = cv2.GaussianBlur(c.y[0], (0, 0), 1.0)
    gradient = cv2.magnitude(cv2.Sobel(soft, cv2.CV_32F, 1, 0), cv2.Sobel(soft, cv2.CV_32F, 0, 1)) / 8
    # On a smooth picture real motion changes little: scale the limit down (frozen clips measure ≤ 0.02).
    limit = max(0.02, t.frozen_mad * min(1.0, float(gradient.mean()) / _FLAT))
    longest, run, anchor = 1, 1, 0
    for i in range(1, n):  # a run: frames within the limit of the run's *first* frame (slow eases move on)
        same = c.mads[i - 1] < 4 * limit and cv2.norm(c.y[i], c.y[anchor], cv2.NORM_L1) / (w * h) < limit
        run, anchor = (run + 1, anchor) if same else (1, i)
        longest = max(longest, run)
    # Motion extent: optical flow from frame 0 at a few frames, 99th percentile over textured pixels
    # (flow in flat areas is mostly codec noise; a small moving region still reaches the 99th).
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST)
    textured = gradient > _TEXTURE
    if textured.mean() < 0.02:  # a nearly flat picture: use every pixel
        textured[:] = True
    motion = 0.0
    for i in np.unique(np.linspace(0, n - 1, _MOTION_SAMPLES + 1).round().astype(int))[1:]:
        if not c.black[i]:
            flow = dis.calc(c.y8[0], c.y8[i], None)
            magnitude = cv2.magnitude(flow[..., 0], flow[..., 1])
            motion = max(motion, float(np.percentile(magnitude[textured], 99)))
    c.metrics.update(frozen_run_s=longest / c.fps, frozen_fraction=longest / n, motion_px=motion)
    if longest / c.fps >= t.frozen_run_s or longest / n >= t.frozen_fraction or motion < t.frozen_motion:
        c.reasons.add("frozen")
    return motion


def _check_cuts(c: _Frames, t: Thresholds) -> np.ndarray:
    """Hard cuts and jumps. Returns the cut pairs (``cut[k]``: between frames k and k+1).

    A pair whose change is large (``cut_mad``) is a cut when it is far above the clip's usual change
    (``cut_spike``), or somewhat above it (``cut_weak_spike``) and optical flow from the earlier frame
    (plus a brightness offset) cannot explain it either: fast moves leave 1-3 unexplained, cuts and big
    jumps 50-70. (Flow does explain a small jump, which the spike alone catches.) Pairs touching a
    reported black run, or a frame whose spatial noise jumped (a noise storm: corruption), are not cuts.
    """
    # A noise frame is noisier than usual and unlike *both* neighbours; a cut to a detailed picture is
    # also noisier, but the frames after it carry on from it.
    spatial = np.array([_noise(f) for f in c.y])
    big = np.concatenate([[True], c.mads >= t.cut_mad, [True]])
    speckled = (spatial > _SPECKLE * float(np.median(spatial))) & big[:-1] & big[1:]
    excused = (c.black if "black_frames" in c.reasons else np.zeros(c.n, bool)) | speckled
    # The usual change between frames that differ at all: content made at 8 fps and repeated to 24 fps
    # has two identical pairs for each real step, which must not make every step look like a jump.
    moving = c.mads[c.mads >= t.frozen_mad]
    usual = float(np.median(moving)) if len(moving) else 0.0
    spikes = c.mads / max(usual, 1.0)
    large = (c.mads >= t.cut_mad) & ~(excused[1:] | excused[:-1])
    cut = large & (spikes >= t.cut_spike)
    candidates = large & ~cut & (spikes >= t.cut_weak_spike)
    unexplained = 0.0
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST) if candidates.any() else None
    for k in np.flatnonzero(candidates):
        moved = _follow(dis, c.y8[k + 1], c.y8[k]).astype(np.float32)
        offset = float(c.means[k + 1] - c.means[k])
        left = float(cv2.norm(c.y[k + 1], moved + offset, cv2.NORM_L1)) / c.y[k + 1].size
        unexplained = max(unexplained, left)
        cut[k] = left >= t.cut_mad
    worst = int(spikes.argmax())
    c.metrics.update(
        mad_usual=usual, cut_spike=float(spikes[worst]), cut_mad=float(c.mads[worst]),
        cut_unexplained=unexplained, cuts=float(cut.sum()),
    )  # fmt: skip
    if cut.any():
        c.reasons.add("hard_cut")
    return cut


def _check_flicker(c: _Frames, t: Thresholds) -> float:
    """Mean luma that zigzags frame to frame: median |L_t - (L_t-1 + L_t+1)/2|."""
    value = 0.0
    if c.n >= 3:
        value = float(np.median(np.abs(c.means[1:-1] - (c.means[:-2] + c.means[2:]) / 2)))
    c.metrics["flicker_luma"] = value
    if value > t.flicker_luma:
        c.reasons.add("flicker")
    return value


def _outside(frame: np.ndarray, lo: np.ndarray, hi: np.ndarray, offset: int) -> np.ndarray:
    """How far each pixel of ``frame`` lies outside ``[lo, hi] + offset`` (uint8, saturating)."""
    if offset >= 0:
        lo, hi = cv2.add(lo, offset), cv2.add(hi, offset)
    else:
        lo, hi = cv2.subtract(lo, -offset), cv2.subtract(hi, -offset)
    return cv2.max(cv2.subtract(frame, hi), cv2.subtract(lo, frame))


def _block_share(outside: np.ndarray, level: float) -> float:
    """The share of 8×8 blocks whose mean of ``outside`` exceeds ``level``."""
    h, w = outside.shape
    blocks = cv2.resize(outside, (w // _BLOCK, h // _BLOCK), interpolation=cv2.INTER_AREA)
    return float(np.count_nonzero(blocks > level)) / blocks.size


def _follow(dis: Any, frame: np.ndarray, other: np.ndarray) -> np.ndarray:
    """``other`` warped onto ``frame`` along the optical flow between them."""
    flow = dis.calc(frame, other, None)
    h, w = frame.shape
    grid = np.indices((h, w), np.float32)
    return cv2.remap(other, grid[1] + flow[..., 0], grid[0] + flow[..., 1], cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REPLICATE)  # fmt: skip


def _check_corruption(c: _Frames, t: Thresholds, cut: np.ndarray) -> tuple[np.ndarray, float]:
    """Noise storms and block garbage. Returns the corrupt frames and the peak noise ratio.

    Noise: Immerkær sigma of each frame's temporal residual ``Y_t - (Y_t-1 + Y_t+1)/2``, against the
    median of the frames within a second. Texture that moves smoothly mostly cancels out, so unlike a
    plain spatial sigma it barely rises when a pan reaches a detailed region, and it survives the 4×
    downscale of a 720p clip better.

    Garbage: per pixel, how far ``Y_t`` lies outside the 5×5 local range of each neighbouring frame
    (after evening out global brightness, so flicker does not count twice); the smaller of the two,
    averaged over 8×8 blocks. Content that is in one frame only scores high; motion does not.
    """
    n = c.n
    near_cut = np.zeros(n, bool)
    near_cut[1:] |= cut
    near_cut[:-1] |= cut
    skip = near_cut.copy()
    if "black_frames" in c.reasons:  # black frames and their neighbours are already accounted for
        skip |= c.black
        skip[1:] |= c.black[:-1]
        skip[:-1] |= c.black[1:]
    residual = np.zeros(n)
    if n >= 3:
        for i in range(1, n - 1):
            residual[i] = _noise(c.y[i] - (c.y[i - 1] + c.y[i + 1]) * 0.5)
        # End frames: against the straight-line extrapolation of the next two (halved: same noise scale).
        residual[0] = _noise(c.y[0] - 2 * c.y[1] + c.y[2]) / 2
        residual[-1] = _noise(c.y[-1] - 2 * c.y[-2] + c.y[-3]) / 2
    # Fine texture in motion leaves some residual too (≈4 on a detailed picture at 320×180), so each frame
    # is compared with the median of its own second either side, within its shot: a pan from sky into
    # foliage raises both together, a noise storm shorter than that stands out.
    reach = max(2, round(c.fps))
    shot = np.concatenate([[0], np.cumsum(cut)])  # shot number of each frame
    base = np.array([
        np.median(residual[max(0, i - reach) : i + reach + 1][shot[max(0, i - reach) : i + reach + 1] == shot[i]])
        for i in range(n)
    ])  # fmt: skip
    base = np.maximum(base, 1.0)
    noisy = (residual > np.maximum(t.noise_min, t.noise_ratio * base)) & ~skip
    ratio = np.where(skip, 0.0, residual / base)
    peak = float(ratio.max())

    kernel = np.ones((5, 5), np.uint8)
    lo = [cv2.erode(f, kernel) for f in c.y8]
    hi = [cv2.dilate(f, kernel) for f in c.y8]
    jumped = np.zeros(n, bool)
    jumped[1:-1] = cut[:-1] & cut[1:]  # a frame that jumps away and back is a cut, not garbage
    garbage = np.zeros(n)
    dis = None
    for i in range(1, n - 1):
        if noisy[i] or jumped[i] or c.black[i - 1 : i + 2].any():
            continue
        outside = [_outside(c.y8[i], lo[j], hi[j], round(c.means[i] - c.means[j])) for j in (i - 1, i + 1)]
        garbage[i] = _block_share(cv2.min(*outside), t.garbage_level)
        if garbage[i] > t.garbage_blocks:
            # Fast motion also leaves edges outside a ±2 px range: look again with each neighbour moved
            # onto this frame by optical flow (only here, so clean clips rarely pay for it).
            dis = dis or cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST)
            outside = []
            for j in (i - 1, i + 1):
                moved = _follow(dis, c.y8[i], c.y8[j])
                off = round(c.means[i] - c.means[j])
                outside.append(_outside(c.y8[i], cv2.erode(moved, kernel), cv2.dilate(moved, kernel), off))
            garbage[i] = _block_share(cv2.min(*outside), t.garbage_level)
    corrupt = noisy | (garbage > t.garbage_blocks)
    c.metrics.update(
        noise_base=float(np.median(base)), noise_peak=peak, noisy_frames=float(noisy.sum()),
        garbage_blocks=float(garbage.max()), garbage_frames=float((garbage > t.garbage_blocks).sum()),
    )  # fmt: skip
    if corrupt.any():
        c.reasons.add("corruption")
    return corrupt | jumped, peak


def _check_source(c: _Frames, src: _Source, t: Thresholds, bad: np.ndarray) -> float:
    """Wrong start (frame 0) and drift (later frames), aligned to the source. Returns the mean SSIM."""
    start, matrix = _align(c.y[0], c.y8[0], c.cb[0], c.cr[0], src, None)
    c.metrics.update(
        start_ssim=start.ssim, start_coverage=start.coverage, start_area=start.area,
        start_inliers=float(start.inliers),
    )  # fmt: skip
    if start.ssim < t.start_ssim or start.coverage < t.start_coverage or start.area < t.start_area:
        c.reasons.add("wrong_start")
    sims, colours = [start.ssim], [start.colour]
    for target in np.linspace(0, c.n - 1, _SOURCE_SAMPLES + 1).round().astype(int)[1:]:
        i = _nearest_good(int(target), bad)
        if i is None or i == 0:
            continue
        found, matrix = _align(c.y[i], c.y8[i], c.cb[i], c.cr[i], src, matrix)  # the last match guides the next
        sims.append(found.ssim)
        colours.append(found.colour)
    lowest = float(min(sims))
    drop = max(0.0, start.ssim - lowest)
    c.metrics.update(drift_ssim=lowest, drift_drop=drop, drift_colour=float(max(colours)))
    if lowest < t.drift_ssim or drop > t.drift_drop or max(colours) > t.drift_colour:
        c.reasons.add("drift")
    return float(np.mean(sims))


class _Clock:
    """Adds the time since the last call to ``timings[step]`` (does nothing without a dict)."""

    def __init__(self, timings: dict[str, float] | None) -> None:
        self.timings = timings
        self.last = time.perf_counter()

    def __call__(self, step: str) -> None:
        now = time.perf_counter()
        if self.timings is not None:
            self.timings[step] = self.timings.get(step, 0.0) + now - self.last
        self.last = now


def _analyse(
    y8: np.ndarray,
    cb: np.ndarray,
    cr: np.ndarray,
    *,
    fps: float,
    source: np.ndarray | None,
    t: Thresholds,
    timings: dict[str, float] | None = None,
) -> tuple[list[str], dict[str, float], float]:
    """Content checks on decoded limited-range planes. Returns reasons, metrics and a quality in [0, 1].

    ``timings``, if given, receives the seconds spent per step (for ``bench/quality_gate.py``).
    """
    clock = _Clock(timings)
    n, h, w = y8.shape
    y = _luma_full(y8)
    stats = [cv2.meanStdDev(f) for f in y]
    means = np.array([s[0][0, 0] for s in stats])
    stds = np.array([s[1][0, 0] for s in stats])
    mads = np.array([cv2.norm(y[i], y[i - 1], cv2.NORM_L1) for i in range(1, n)]) / (w * h)
    c = _Frames(y, y.astype(np.uint8), cb, cr, fps, means, mads, np.zeros(n, bool))
    src = _prepare_source(source, (w, h)) if source is not None else None

    clock("prepare")
    _check_black(c, src, t, stds)
    motion = _check_frozen(c, t)
    clock("black, frozen")
    cut = _check_cuts(c, t)
    flicker = _check_flicker(c, t)
    clock("cuts, flicker")
    corrupt, noise = _check_corruption(c, t, cut)
    clock("corruption")
    fidelity = 1.0
    if src is not None:
        similarity = _check_source(c, src, t, c.black | corrupt)
        fidelity = float(np.clip((similarity - t.drift_ssim) / (1 - t.drift_ssim), 0, 1))
        clock("start, drift")

    # Quality for ranking: closeness to the source counts double, then steadiness, motion, cleanliness.
    steady = 1 - min(1.0, flicker / t.flicker_luma)
    moving = min(1.0, motion / (4 * t.frozen_motion))
    clean = 1 - min(1.0, max(0.0, noise - 1) / max(t.noise_ratio - 1, 1e-6))
    quality = (2 * fidelity + steady + moving + clean) / 5
    return [r for r in REASONS if r in c.reasons], c.metrics, quality


def _rounded(metrics: dict[str, float]) -> dict[str, float]:
    return {k: round(float(v), 4) for k, v in metrics.items()}


def _score(reasons: list[str], quality: float) -> float:
    if reasons:
        return round(0.5 * quality / (1 + len(reasons)), 4)
    return round(0.5 + 0.5 * quality, 4)


def judge_frames(
    frames: np.ndarray | list[np.ndarray],
    *,
    fps: float,
    source: np.ndarray | None = None,
    thresholds: Thresholds = Thresholds(),
) -> Verdict:
    """The content checks of :func:`judge` on RGB uint8 frames already in memory (no file, no metadata).

    Frames are converted with the encoder's BT.709 matrix and scaled to the analysis size, so results
    match :func:`judge` on the same frames up to compression. For tests and tools.
    """
    frames = list(frames)
    if len(frames) < 2:
        raise ValueError("judge_frames needs at least 2 frames")
    h0, w0 = frames[0].shape[:2]
    w, h = analysis_size(w0, h0)
    ycc = [video.rgb_to_ycbcr(cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA)) for f in frames]
    y = np.stack([f[..., 0] for f in ycc])
    cb = np.stack([cv2.resize(f[..., 1], (w // 2, h // 2), interpolation=cv2.INTER_AREA) for f in ycc])
    cr = np.stack([cv2.resize(f[..., 2], (w // 2, h // 2), interpolation=cv2.INTER_AREA) for f in ycc])
    reasons, metrics, quality = _analyse(y, cb, cr, fps=fps, source=source, t=thresholds)
    return Verdict(not reasons, reasons, _rounded(metrics), _score(reasons, quality))


def judge(
    path: str | Path,
    *,
    width: int,
    height: int,
    fps: float,
    duration: float,
    source: np.ndarray | None = None,
    thresholds: Thresholds = Thresholds(),
) -> Verdict:
    """Judge the clip at ``path`` against the request and, if given, the ``source`` picture.

    ``source`` is the RGB uint8 picture exactly as sent to the backend (already fitted to the output's
    aspect); without it ``wrong_start`` and ``drift`` are not judged. Never raises for a bad file: an
    unreadable one is rejected as ``undecodable`` (a ``source`` that is not uint8 is a ValueError).
    """
    t = thresholds
    path = Path(path)
    limit = max(48, math.ceil(_MAX_FRAMES_FACTOR * fps * duration))
    try:
        clip = _decode(path, limit)
    except (video.VideoError, OSError, subprocess.SubprocessError) as exc:
        return Verdict(False, ["undecodable"], {}, 0.0, detail=str(exc)[:300])
    n = len(clip.y)
    clip_fps = clip.fps or fps
    # Frames counted by decoding, unless we stopped early (then the container's duration says more).
    clip_duration = n / clip_fps if n < limit else max(clip.duration, n / clip_fps)
    metrics: dict[str, float] = {
        "width": clip.width, "height": clip.height, "fps": clip_fps, "frames": n,
        "duration": clip_duration, "bytes": path.stat().st_size,
    }  # fmt: skip
    reasons: list[str] = []
    if (clip.width, clip.height) != (width, height):
        reasons.append("wrong_resolution")
    if abs(clip_duration - duration) > max(t.duration_slack_s, t.duration_slack * duration):
        reasons.append("wrong_duration")
    if n < t.min_frames * fps * duration:
        reasons.append("too_few_frames")
    quality = 0.0
    if n >= 2 and min(clip.y.shape[1:]) >= _MIN_SIDE:
        found, content, quality = _analyse(clip.y, clip.cb, clip.cr, fps=clip_fps, source=source, t=t)
        reasons += found
        metrics.update(content)
    ordered = [r for r in REASONS if r in reasons]
    return Verdict(not ordered, ordered, _rounded(metrics), _score(ordered, quality))
