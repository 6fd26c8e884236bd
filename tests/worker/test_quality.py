"""The quality gate: each defect class, made from real photographs and encoded as real H.264, is caught
with its reason; every clean camera move and gentle local motion passes, also at a low bitrate.

The builders at the top (``DEFECTS``, ``camera_frames``, ``local_motion``, ``encode``) are shared with
``bench/quality_gate.py``, which prints the gate's metrics on this same defect set.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

from backends.animator import camera_path, render, yuv_frames
from backends.base import CameraMove
from backends.video import VideoWriter
from worker.quality import REASON_TEXT, REASONS, Thresholds, Verdict, analysis_size, judge, judge_frames

ASSET = Path(__file__).resolve().parents[2] / "bot" / "assets" / "astronaut.png"
W, H, FPS, SECONDS = 320, 180, 24, 2.0
N = round(FPS * SECONDS)
Frames = list[np.ndarray]


# --- real pictures -----------------------------------------------------------------------------------


def load_photo() -> np.ndarray:
    """The astronaut, cropped to 16:9 (512×288) around the face: what a backend receives."""
    square = cv2.cvtColor(cv2.imread(str(ASSET)), cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(square[16:304])


def load_other() -> np.ndarray:
    """A second, unrelated photograph at 512×288: scikit-image's coffee cup (or the astronaut's flag)."""
    try:
        from skimage import data
    except ImportError:  # a different region of the same photograph, mirrored
        square = cv2.cvtColor(cv2.imread(str(ASSET)), cv2.COLOR_BGR2RGB)
        return np.ascontiguousarray(square[224:512, ::-1])
    return cv2.resize(data.coffee()[31:369], (512, 288), interpolation=cv2.INTER_AREA)


def fitted(image: np.ndarray, w: int = W, h: int = H) -> np.ndarray:
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)


# --- clip builders -----------------------------------------------------------------------------------


def camera_frames(
    image: np.ndarray,
    camera: CameraMove = CameraMove.PAN_RIGHT,
    motion: int = 2,
    *,
    n: int = N,
    w: int = W,
    h: int = H,
    jump: dict[int, float] | None = None,
) -> Frames:
    """RGB frames of the animator's camera path; ``jump`` shifts frame i's camera by a fraction of w."""
    work = cv2.resize(image, (w * 8 // 5, h * 8 // 5), interpolation=cv2.INTER_AREA)  # ≈1.6× the output
    path = camera_path(
        (work.shape[1], work.shape[0]), camera=camera, motion=motion, duration=n / FPS, fps=FPS, width=w, height=h
    )
    out = []
    for i, m in enumerate(path):
        if jump and i in jump:
            m = m @ np.array([[1, 0, jump[i] * w * 8 / 5], [0, 1, 0], [0, 0, 1.0]])
        flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
        out.append(cv2.warpPerspective(work, m, (w, h), flags=flags, borderMode=cv2.BORDER_REFLECT))
    return out


def local_motion(image: np.ndarray, kind: str, *, n: int = N, w: int = W, h: int = H) -> Frames:
    """A still camera with a sinusoidal displacement field on part of the picture (``cv2.remap``).

    ``water``: the lower third ripples by 2 px; ``hair``: a patch round the head sways by 2 px;
    ``clouds``: the top quarter drifts sideways with a swirl; ``wobble``: the whole picture trembles
    by 0.3 px (a near-frozen defect, not clean motion).
    """
    base = fitted(image, w, h)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    out = []
    for i in range(n):
        t = i / FPS
        if kind == "water":
            weight = np.clip((ys - h * 0.6) / (h * 0.1), 0, 1)
            dx = 2.0 * np.sin(2 * np.pi * (ys / 23 + t * 0.8)) * weight
            dy = 1.0 * np.sin(2 * np.pi * (xs / 31 + t * 0.6)) * weight
        elif kind == "hair":
            weight = np.exp(-(((xs - w * 0.45) / (w * 0.15)) ** 2 + ((ys - h * 0.2) / (h * 0.2)) ** 2))
            dx = 2.0 * np.sin(2 * np.pi * (t * 0.7 + ys / 40)) * weight
            dy = 0.6 * np.sin(2 * np.pi * t * 0.5) * weight
        elif kind == "clouds":
            weight = np.clip((h * 0.3 - ys) / (h * 0.1), 0, 1)
            dx = (3.0 * t + 1.5 * np.sin(2 * np.pi * (xs / 80 + t * 0.3))) * weight
            dy = 0.8 * np.sin(2 * np.pi * (xs / 60 + t * 0.4)) * weight
        elif kind == "wobble":
            dx = np.full_like(xs, 0.3 * np.sin(2 * np.pi * t * 1.5))
            dy = np.full_like(xs, 0.2 * np.cos(2 * np.pi * t * 1.1))
        else:
            raise ValueError(kind)
        mx, my = (xs + dx).astype(np.float32), (ys + dy).astype(np.float32)
        out.append(cv2.remap(base, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT))
    return out


def encode(frames: Frames, path: Path, *, fps: float = FPS, **options) -> Path:
    """Real H.264 through the product's writer (``options``: crf, maxrate/bufsize...)."""
    h, w = frames[0].shape[:2]
    with VideoWriter(path, width=w, height=h, fps=fps, **options) as out:
        for frame in frames:
            out.write(np.ascontiguousarray(frame))
    return path


def encode_move(image: np.ndarray, path: Path, camera: CameraMove, motion: int, *, w=W, h=H, seconds=SECONDS,
                **options) -> Path:  # fmt: skip
    """The animator's exact frames (``yuv_frames``) encoded with other settings than ``render``'s."""
    with VideoWriter(path, width=w, height=h, fps=FPS, pix_fmt="yuv420p", **options) as out:
        for planes in yuv_frames(image, camera=camera, motion=motion, duration=seconds, fps=FPS, width=w, height=h):
            out.write(planes)
    return path


# --- the defect set ----------------------------------------------------------------------------------


def _hue(frame: np.ndarray, degrees: float) -> np.ndarray:
    hsv = cv2.cvtColor(frame, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = (hsv[..., 0].astype(np.int32) + round(degrees / 2)) % 180
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def _melt(frame: np.ndarray, k: float) -> np.ndarray:
    """Saturation up by 150 % and a warm tint, ``k`` of the way."""
    hsv = cv2.cvtColor(frame, cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 1] = np.clip(hsv[..., 1] * (1 + 1.5 * k), 0, 255)
    out = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32) + np.array([40, 10, -40]) * k
    return np.clip(out, 0, 255).astype(np.uint8)


def _warp_melt(frames: Frames, amplitude: float = 12.0) -> Frames:
    """A smooth random displacement field that grows from 0 to ``amplitude`` px over the clip."""
    h, w = frames[0].shape[:2]
    rng = np.random.default_rng(3)
    fields = [cv2.GaussianBlur(rng.normal(size=(h, w)).astype(np.float32), (0, 0), 18) for _ in range(2)]
    fx, fy = (f / np.abs(f).max() for f in fields)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    out = []
    for i, frame in enumerate(frames):
        k = amplitude * i / (len(frames) - 1)
        out.append(cv2.remap(frame, xs + k * fx, ys + k * fy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT))
    return out


def _noise_storm(frames: Frames, sigma: float = 30.0, at: range = range(20, 24)) -> Frames:
    rng = np.random.default_rng(11)
    noisy = [np.clip(f + rng.normal(0, sigma, f.shape), 0, 255).astype(np.uint8) for f in frames]
    return [noisy[i] if i in at else f for i, f in enumerate(frames)]


def _block_garbage(frames: Frames, count: int = 24, at: tuple[int, ...] = (15, 16, 30), size: int = 16) -> Frames:
    """``count`` random 16×16 blocks of noise or flat colour, fresh on each frame in ``at``."""
    rng = np.random.default_rng(5)
    out = []
    for i, frame in enumerate(frames):
        if i in at:
            frame = frame.copy()
            h, w = frame.shape[:2]
            for _ in range(count):
                y, x = rng.integers(0, h // size) * size, rng.integers(0, w // size) * size
                noise = rng.random() < 0.5
                frame[y : y + size, x : x + size] = rng.integers(0, 256, (size, size, 3) if noise else 3)
        out.append(frame)
    return out


def _flicker(frames: Frames, amount: float) -> Frames:
    """Brightness alternating by ±``amount`` frame to frame."""
    return [cv2.convertScaleAbs(f, alpha=1 + amount if i % 2 else 1 - amount) for i, f in enumerate(frames)]


def _repeat(frames: Frames, times: int) -> Frames:
    """Each frame shown ``times`` times: low-frame-rate content in a 24 fps file."""
    return [f for f in frames for _ in range(times)]


def _mid(n: int, length: int) -> range:
    return range(n // 2 - length // 2, n // 2 - length // 2 + length)


@dataclass(frozen=True)
class Defect:
    """One defective clip: how to make its frames from (photo, other), and the reason it must get."""

    name: str
    reason: str
    frames: Callable[[np.ndarray, np.ndarray], Frames]
    also: tuple[str, ...] = ()  # other reasons that are true of it too
    duration: float = SECONDS  # what was asked for
    size: tuple[int, int] = (W, H)


DEFECTS = [
    Defect("frozen", "frozen", lambda p, o: [fitted(p)] * N),
    Defect("frozen tail", "frozen", lambda p, o: (f := camera_frames(p))[:19] + [f[19]] * (N - 19)),
    Defect("near-frozen wobble", "frozen", lambda p, o: local_motion(p, "wobble")),
    Defect("black frames", "black_frames",
           lambda p, o: [np.zeros_like(f) if i in _mid(N, 6) else f for i, f in enumerate(camera_frames(p))]),
    Defect("blank frames", "black_frames",
           lambda p, o: [np.full_like(f, 128) if i in _mid(N, 6) else f for i, f in enumerate(camera_frames(p))]),
    Defect("flicker ±8 %", "flicker", lambda p, o: _flicker(camera_frames(p), 0.08)),
    Defect("hard cut", "hard_cut", lambda p, o: camera_frames(p)[: N // 2] + camera_frames(o)[N // 2 :],
           also=("drift",)),
    Defect("hard cut, 8 fps shown 3×", "hard_cut", lambda p, o: _repeat(
        camera_frames(p, motion=3, n=N // 3)[: N // 6] + camera_frames(o, motion=3, n=N // 3)[N // 6 :], 3),
           also=("drift",)),
    Defect("teleport jump", "hard_cut", lambda p, o: camera_frames(p, jump={N // 2: 0.2})),
    Defect("drift: warp", "drift", lambda p, o: _warp_melt(camera_frames(p))),
    Defect("drift: morph", "drift", lambda p, o: [
        cv2.addWeighted(a, 1 - i / (N - 1), b, i / (N - 1), 0)
        for i, (a, b) in enumerate(zip(camera_frames(p), camera_frames(o), strict=True))
    ]),
    Defect("drift: hue", "drift", lambda p, o: [_hue(f, 120 * i / (N - 1)) for i, f in enumerate(camera_frames(p))]),
    Defect("colour melting", "drift", lambda p, o: [_melt(f, i / (N - 1)) for i, f in enumerate(camera_frames(p))]),
    Defect("noise storm", "corruption", lambda p, o: _noise_storm(camera_frames(p))),
    Defect("block garbage", "corruption", lambda p, o: _block_garbage(camera_frames(p))),
    Defect("wrong start: other picture", "wrong_start", lambda p, o: camera_frames(o), also=("drift",)),
    Defect("wrong start: shifted", "wrong_start", lambda p, o: [
        cv2.warpAffine(f, np.float32([[1, 0, 0.35 * W], [0, 1, 0]]), (W, H), borderMode=cv2.BORDER_REFLECT)
        for f in camera_frames(p)
    ]),
    Defect("wrong length", "wrong_duration", lambda p, o: camera_frames(p, n=3 * FPS), also=("too_few_frames",),
           duration=5.0),
    Defect("wrong resolution", "wrong_resolution", lambda p, o: camera_frames(p, w=256, h=144)),
]  # fmt: skip
CLEAN_MOVES = list(CameraMove)
LOCAL_MOTION = ("water", "hair", "clouds")


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return load_photo()


@pytest.fixture(scope="module")
def other() -> np.ndarray:
    return load_other()


def check(path: Path, photo: np.ndarray, *, duration: float = SECONDS, size: tuple[int, int] = (W, H)) -> Verdict:
    return judge(path, width=size[0], height=size[1], fps=FPS, duration=duration, source=photo)


# --- defects are caught ------------------------------------------------------------------------------


@pytest.mark.parametrize("defect", DEFECTS, ids=[d.name for d in DEFECTS])
def test_each_defect_is_caught_with_its_reason(defect, photo, other, tmp_path):
    """An encoded defective clip is rejected with its reason, and nothing unrelated."""
    path = encode(defect.frames(photo, other), tmp_path / "clip.mp4")

    verdict = check(path, photo, duration=defect.duration, size=defect.size)

    assert not verdict.accepted
    assert defect.reason in verdict.reasons, verdict.metrics
    assert set(verdict.reasons) <= {defect.reason, *defect.also}, verdict.reasons
    assert verdict.score < 0.5


# --- clean clips pass --------------------------------------------------------------------------------


@pytest.mark.parametrize("motion", [2, 4])
@pytest.mark.parametrize("camera", CLEAN_MOVES, ids=[c.value for c in CLEAN_MOVES])
def test_every_camera_move_passes(camera, motion, photo, tmp_path):
    """Each move the animator renders (CRF 20) is accepted against its source."""
    path = tmp_path / "clip.mp4"
    render(photo, path, camera=camera, motion=motion, duration=SECONDS, fps=FPS, width=W, height=H)

    verdict = check(path, photo)

    assert verdict.accepted, (verdict.reasons, verdict.metrics)
    assert verdict.score >= 0.9


@pytest.mark.parametrize("motion", [2, 4])
@pytest.mark.parametrize("camera", CLEAN_MOVES, ids=[c.value for c in CLEAN_MOVES])
def test_every_camera_move_passes_at_low_bitrate(camera, motion, photo, tmp_path):
    """The same frames at CRF 35 (≈150 kb/s at 320×180) still pass."""
    path = encode_move(photo, tmp_path / "clip.mp4", camera, motion, crf=35)

    verdict = check(path, photo)

    assert verdict.accepted, (verdict.reasons, verdict.metrics)


@pytest.mark.parametrize("crf", [20, 35])
@pytest.mark.parametrize("kind", LOCAL_MOTION)
def test_gentle_local_motion_passes(kind, crf, photo, tmp_path):
    """Water, hair and clouds moving in a still frame are motion, not a freeze, and not drift."""
    path = encode(local_motion(photo, kind), tmp_path / "clip.mp4", crf=crf)

    verdict = check(path, photo)

    assert verdict.accepted, (verdict.reasons, verdict.metrics)
    assert verdict.metrics["motion_px"] >= Thresholds().frozen_motion


@pytest.mark.parametrize("camera", [CameraMove.PAN_LEFT, CameraMove.DOLLY_IN], ids=lambda c: c.value)
def test_repeated_frames_pass(camera, photo, tmp_path):
    """8 fps content with each frame shown three times (a 24 fps file) is neither frozen nor jumpy."""
    frames = _repeat(camera_frames(photo, camera, 4, n=N // 3), 3)

    verdict = check(encode(frames, tmp_path / "clip.mp4"), photo)

    assert verdict.accepted, (verdict.reasons, verdict.metrics)


def _crop16x9(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    ch = min(h, w * 9 // 16)
    cw = ch * 16 // 9
    y, x = (h - ch) // 2, (w - cw) // 2
    crop = image[y : y + ch, x : x + cw]
    return cv2.resize(crop if crop.ndim == 3 else cv2.cvtColor(crop, cv2.COLOR_GRAY2RGB), (512, 288))


SOFT = {
    "blurred astronaut": lambda: cv2.GaussianBlur(load_photo(), (0, 0), 6),
    "moon": lambda: _crop16x9(pytest.importorskip("skimage.data").moon()),
    "hubble deep field": lambda: _crop16x9(pytest.importorskip("skimage.data").hubble_deep_field()),
}


@pytest.mark.parametrize("camera", [CameraMove.PAN_LEFT, CameraMove.ZOOM_OUT, CameraMove.ORBIT_RIGHT], ids=str)
@pytest.mark.parametrize("picture", list(SOFT))
def test_soft_and_dark_pictures_pass(picture, camera, tmp_path):
    """Few features to match (a blurred face, the Moon) or a dark frame (deep space) are no defect."""
    image = SOFT[picture]()
    path = tmp_path / "clip.mp4"
    render(image, path, camera=camera, motion=4, duration=SECONDS, fps=FPS, width=W, height=H)

    verdict = check(path, image)

    assert verdict.accepted, (verdict.reasons, verdict.metrics)


# --- the full-size path ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_size(photo, tmp_path_factory) -> dict[str, Path]:
    """5-second 1280×720 clips: a render, a pan capped at 300 kb/s, and a noise storm."""
    root = tmp_path_factory.mktemp("full")
    size = {"w": 1280, "h": 720}
    clips = {
        "render": root / "render.mp4",
        "300 kb/s": encode_move(photo, root / "vbv.mp4", CameraMove.PAN_RIGHT, 2, seconds=5.0, **size,
                                maxrate=300_000, bufsize=300_000),
    }  # fmt: skip
    render(photo, clips["render"], camera=CameraMove.ZOOM_IN, motion=2, duration=5.0, fps=FPS, width=1280, height=720)
    pan = camera_frames(photo, n=5 * FPS, **size)
    clips["noise storm"] = encode(_noise_storm(pan, at=range(50, 56)), root / "noise.mp4")
    return clips


@pytest.mark.parametrize(("name", "reason"), [("render", None), ("300 kb/s", None), ("noise storm", "corruption")])
def test_full_size_clips(full_size, photo, name, reason):
    """At 1280×720 the gate decodes to 320×180 once and still tells clean from corrupt."""
    verdict = judge(full_size[name], width=1280, height=720, fps=FPS, duration=5.0, source=photo)

    assert verdict.metrics["frames"] == 120 and verdict.metrics["width"] == 1280
    assert verdict.reasons == ([reason] if reason else []), verdict.metrics


def test_analysis_size_keeps_aspect_and_never_upscales():
    """About 320×180 worth of pixels, even sides, same shape, never bigger than the clip."""
    assert analysis_size(1280, 720) == (320, 180)
    assert analysis_size(720, 1280) == (180, 320)
    assert analysis_size(1024, 1024) == (240, 240)
    assert analysis_size(256, 144) == (256, 144)


# --- the API -----------------------------------------------------------------------------------------


def test_the_old_call_still_works(photo, tmp_path):
    """``judge(path, width=, height=, fps=, duration=)`` without a source skips only source checks."""
    frames = [_hue(f, 120 * i / (N - 1)) for i, f in enumerate(camera_frames(photo))]
    path = encode(frames, tmp_path / "hue.mp4")

    blind = judge(path, width=W, height=H, fps=FPS, duration=SECONDS)
    seeing = judge(path, width=W, height=H, fps=FPS, duration=SECONDS, source=photo)

    assert blind.accepted and "drift_colour" not in blind.metrics
    assert seeing.reasons == ["drift"]


@pytest.mark.parametrize("content", [b"\x00garbage, not a video\x00" * 64, b""])
def test_an_unreadable_file_is_undecodable(tmp_path, content):
    """A file ffmpeg cannot read is rejected, never raised."""
    path = tmp_path / "clip.mp4"
    path.write_bytes(content)

    verdict = judge(path, width=W, height=H, fps=FPS, duration=SECONDS)

    assert verdict.reasons == ["undecodable"] and verdict.score == 0.0 and verdict.detail


def test_a_missing_file_is_undecodable(tmp_path):
    """No file at all is also just a rejection."""
    assert judge(tmp_path / "nope.mp4", width=W, height=H, fps=FPS, duration=SECONDS).reasons == ["undecodable"]


def test_verdict_is_json(photo, tmp_path):
    """``to_json()`` survives ``json.dumps``; metrics are rounded floats."""
    verdict = check(encode(camera_frames(photo), tmp_path / "clip.mp4"), photo)

    data = json.loads(json.dumps(verdict.to_json()))

    assert data["accepted"] is True and data["reasons"] == [] and 0.5 <= data["score"] <= 1
    assert all(isinstance(v, float) and round(v, 4) == v for v in data["metrics"].values())
    assert {"motion_px", "flicker_luma", "cut_spike", "noise_peak", "start_ssim", "drift_ssim"} <= set(data["metrics"])


def test_every_reason_has_a_phrase():
    """Users read "that one {phrase}, trying again" for each reason."""
    assert set(REASON_TEXT) == set(REASONS)
    assert Verdict(False, ["frozen", "flicker"]).describe() == "came out frozen and flickered"
    assert Verdict(True).describe() == ""


def test_thresholds_are_plain_settings():
    """Every threshold is a plain number with a default, so settings can expose ANIMABOT_QC_<FIELD>."""
    fields = dataclasses.fields(Thresholds)

    assert len(fields) >= 20
    for f in fields:
        assert f.name.islower() and f.name.isidentifier()
        assert isinstance(f.default, int | float) and not isinstance(f.default, bool)


def test_thresholds_are_honoured(photo):
    """A looser limit lets the same flickering frames through (checked in memory via judge_frames)."""
    frames = _flicker(camera_frames(photo), 0.08)

    assert judge_frames(frames, fps=FPS, source=photo).reasons == ["flicker"]
    assert judge_frames(frames, fps=FPS, source=photo, thresholds=Thresholds(flicker_luma=50)).accepted


def test_score_ranks_clean_above_defective(photo, other):
    """Accepted clips score 0.5-1, rejected ones below; a sharper clip outranks a softer one."""
    clean = judge_frames(camera_frames(photo), fps=FPS, source=photo)
    soft = judge_frames([cv2.GaussianBlur(f, (0, 0), 1.2) for f in camera_frames(photo)], fps=FPS, source=photo)
    cut = judge_frames(camera_frames(photo)[: N // 2] + camera_frames(other)[N // 2 :], fps=FPS, source=photo)

    assert clean.accepted and soft.accepted and not cut.accepted
    assert clean.score > soft.score >= 0.5 > cut.score
