"""The delivery encode: always under the byte limit, at a size chosen from the budget, on real encodes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data

from backends.animator import camera_path, render
from backends.base import CameraMove
from backends.video import VideoWriter, ffmpeg_exe, probe
from worker.encode import EncodeError, EncodePlan, fit_to_limit, plan_encode

ASSET = Path(__file__).resolve().parents[2] / "bot" / "assets" / "astronaut.png"
KiB, MiB = 1024, 1024 * 1024


@pytest.fixture(scope="module")
def clip720(tmp_path_factory) -> Path:
    """A real 5 s 1280×720 pan over a detailed photograph (coffee), CRF 20."""
    path = tmp_path_factory.mktemp("enc") / "pan720.mp4"
    return render(data.coffee(), path, camera=CameraMove.PAN_RIGHT, motion=3, duration=5.0, fps=24,
                  width=1280, height=720).path  # fmt: skip


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """A 2 s 320×180 zoom of the astronaut: far under any delivery limit."""
    astronaut = cv2.cvtColor(cv2.imread(str(ASSET)), cv2.COLOR_BGR2RGB)
    path = tmp_path_factory.mktemp("enc") / "small.mp4"
    return render(astronaut, path, camera=CameraMove.ZOOM_IN, motion=2, duration=2.0, fps=24,
                  width=320, height=180).path  # fmt: skip


@pytest.mark.parametrize(
    ("size", "duration", "limit", "chosen"),
    [
        ((1920, 1080), 10, 10 * MiB, (1920, 1080)),  # 7.24 Mb/s: 0.146 bit/px
        ((1920, 1080), 10, 5 * MiB // 2, (1920, 1080)),  # 1.81 Mb/s: 0.036, still 1080p
        ((1920, 1080), 10, 1 * MiB, (1280, 720)),  # 0.72 Mb/s: 0.015 at 1080p, 0.033 at 720p
        ((1920, 1080), 10, 300 * KiB, (768, 432)),
        ((1280, 720), 5, 200 * KiB, (960, 540)),
        ((720, 1280), 5, 200 * KiB, (540, 960)),  # portrait: the ladder is by short side
        ((1280, 720), 5, 50 * MiB, (1280, 720)),  # boosted guild: never upscaled
        ((200, 112), 5, 10 * KiB, (200, 112)),  # below every rung: kept, the cap still bounds it
        ((1280, 720), 30, 20 * KiB, (256, 144)),  # hopeless budget: the smallest rung
    ],
)
def test_plan_encode_picks_the_largest_size_with_enough_bits_per_pixel(size, duration, limit, chosen):
    """The size follows the budget: the largest ladder size with ≥ 0.02 bit per pixel per frame."""
    plan = plan_encode(*size, fps=24, duration=duration, limit_bytes=limit)
    assert (plan.width, plan.height) == chosen
    assert plan.scaled == (chosen != size)
    assert plan.maxrate * (duration + 1) <= 0.95 * 8 * limit  # the VBV bound that guarantees the fit


def test_plan_encode_documents_its_example():
    """The docstring's 1 MiB example, to the bit."""
    plan = plan_encode(1920, 1080, fps=24, duration=10, limit_bytes=MiB)
    assert plan == EncodePlan(1280, 720, 724470, 724470, pytest.approx(0.0328, abs=1e-4), True)


def test_a_tight_limit_is_met_at_a_lower_resolution(tmp_path, clip720):
    """5 s of detailed 720p into 200 KiB: re-encoded at 960×540 under a VBV cap, and it fits."""
    report = fit_to_limit(clip720, tmp_path / "out.mp4", limit_bytes=200 * KiB)
    info = probe(report.path)
    assert report.method == "capped-crf" and report.attempts == 1
    assert report.bytes == info.bytes <= 200 * KiB
    assert (info.width, info.height, info.frames, info.fps) == (960, 540, 120, 24.0)
    assert (report.width, report.height, report.source_size) == (960, 540, (1280, 720))
    assert (info.codec, info.pix_fmt) == ("h264", "yuv420p")


@pytest.mark.parametrize("limit", [150 * KiB, 400 * KiB, 1 * MiB])
def test_every_limit_is_met(tmp_path, clip720, limit):
    """Whatever the limit, the file that comes back is under it and decodes completely."""
    report = fit_to_limit(clip720, tmp_path / "out.mp4", limit_bytes=limit, preset="veryfast")
    assert report.bytes <= limit
    assert probe(report.path).frames == 120


def test_a_clip_that_already_fits_is_only_remuxed(tmp_path, small):
    """H.264 yuv420p under the limit: streams copied, +faststart, nothing re-encoded."""
    report = fit_to_limit(small, tmp_path / "out.mp4", limit_bytes=10 * MiB)
    assert report.method == "remux" and report.maxrate is None
    assert abs(report.bytes - small.stat().st_size) < 2 * KiB
    assert probe(report.path).frames == probe(small).frames == 48


def test_a_clip_in_another_codec_is_re_encoded_even_if_small(tmp_path, small):
    """MPEG-4 Part 2 does not play inline on Discord: it is encoded to H.264 although it fits."""
    mpeg4 = tmp_path / "mpeg4.mp4"
    subprocess.run([ffmpeg_exe(), "-loglevel", "error", "-i", str(small), "-c:v", "mpeg4", str(mpeg4)], check=True)
    report = fit_to_limit(mpeg4, tmp_path / "out.mp4", limit_bytes=10 * MiB)
    assert report.method == "capped-crf"
    assert probe(report.path).codec == "h264"


def test_an_impossible_limit_fails_and_leaves_nothing_behind(tmp_path, small):
    """2 KiB cannot hold 48 frames: EncodeError, no output and no temporary file."""
    with pytest.raises(EncodeError, match="over the 2048-byte limit"):
        fit_to_limit(small, tmp_path / "out.mp4", limit_bytes=2 * KiB, preset="veryfast")
    assert list(tmp_path.iterdir()) == []


def _mosaic() -> np.ndarray:
    """Skimage photographs at native resolution in a 2600×1400 grid: detail everywhere."""
    tiles = [
        data.hubble_deep_field()[:700, :900], data.coffee(), data.rocket(), data.chelsea(), data.astronaut(),
        data.retina()[300:1000, 300:1000], np.dstack([data.gravel()] * 3), data.immunohistochemistry(),
    ]  # fmt: skip
    rows = []
    for r in range(4):
        row = []
        for c in range(5):
            t = tiles[(r * 5 + c) % len(tiles)]
            k = max(520 / t.shape[1], 350 / t.shape[0], 1.0)
            t = cv2.resize(t, None, fx=k, fy=k, interpolation=cv2.INTER_CUBIC) if k > 1 else t
            y, x = (t.shape[0] - 350) // 2, (t.shape[1] - 520) // 2
            row.append(t[y : y + 350, x : x + 520])
        rows.append(np.hstack(row))
    return np.vstack(rows)


@pytest.mark.slow
def test_a_hard_1080p_clip_fits_10_mib_at_full_size(tmp_path):
    """6 s of detailed 1080p with sigma=6 grain (plain CRF 20: about 16 MiB): 1080p kept, ≤ 10 MiB."""
    picture = _mosaic()
    mats = camera_path((picture.shape[1], picture.shape[0]), camera=CameraMove.ZOOM_IN, motion=3, duration=6.0,
                       fps=24, width=1920, height=1080)  # fmt: skip
    rng = np.random.default_rng(6)
    src = tmp_path / "hard.mp4"
    with VideoWriter(src, width=1920, height=1080, fps=24, crf=10, preset="ultrafast") as out:
        for m in mats:
            frame = cv2.warpAffine(picture, m[:2], (1920, 1080), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
            grain = rng.normal(0, 6, frame.shape).astype(np.float32)
            out.write(cv2.add(frame, grain, dtype=cv2.CV_8U))
    assert src.stat().st_size > 10 * MiB

    report = fit_to_limit(src, tmp_path / "out.mp4", limit_bytes=10 * MiB)

    assert report.method == "capped-crf" and (report.width, report.height) == (1920, 1080)
    assert report.bytes <= 10 * MiB
    assert report.bytes > 0.6 * report.maxrate * 6 / 8  # the cap binds: CRF alone would spend more
    assert probe(report.path).frames == 144
