"""Frame interpolation, stitching and seam checks, on real encodes of real photographs."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data

from backends.animator import render
from backends.base import CameraMove
from backends.video import VideoWriter, probe, read_frames
from worker.postprocess import (
    INTERPOLATION_MODES,
    SEAM_THRESHOLD,
    frame_differences,
    interpolate,
    interpolate_frames,
    last_frame,
    seam_checks,
    source_positions,
    stitch,
)

ASSET = Path(__file__).resolve().parents[2] / "bot" / "assets" / "astronaut.png"
W, H = 320, 180


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 99.0 if mse == 0 else float(10 * np.log10(255**2 / mse))


def write(path: Path, frames: list[np.ndarray], fps: float, crf: int = 12) -> Path:
    h, w = frames[0].shape[:2]
    with VideoWriter(path, width=w, height=h, fps=fps, crf=crf) as out:
        for frame in frames:
            out.write(frame)
    return path


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(ASSET)), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def clips(tmp_path_factory, astronaut) -> dict[str, Path]:
    """Real 24 fps renders: a detailed pan (coffee), its 8 fps subsample, and two astronaut moves."""
    root = tmp_path_factory.mktemp("clips")
    out = {}
    pan = render(data.coffee(), root / "pan24.mp4", camera=CameraMove.PAN_RIGHT, motion=4,
                 duration=2.0, fps=24, width=W, height=H)  # fmt: skip
    out["pan24"] = pan.path
    out["pan8"] = write(root / "pan8.mp4", list(read_frames(pan.path))[::3], fps=8)
    for name, camera in (("zoom", CameraMove.ZOOM_IN), ("orbit", CameraMove.ORBIT_LEFT)):
        out[name] = render(astronaut, root / f"{name}.mp4", camera=camera, motion=3, duration=2.0, fps=24,
                           width=W, height=H).path  # fmt: skip
    return out


@pytest.mark.parametrize(
    ("frames_in", "src_fps", "expected_head", "expected_len"),
    [
        (40, 8, [0, 1 / 3, 2 / 3, 1, 4 / 3], 120),
        (60, 12, [0, 0.5, 1, 1.5, 2], 120),
        (80, 16, [0, 2 / 3, 4 / 3, 2, 8 / 3], 120),
        (150, 30, [0, 1, 3, 4, 5], 120),  # faster source: nearest frame, like ffmpeg's fps filter
    ],
)
def test_source_positions_cover_the_clip_exactly(frames_in, src_fps, expected_head, expected_len):
    """Output frame k samples the source at k·src_fps/24, one position per output frame."""
    pos = source_positions(frames_in, src_fps, 24)
    assert len(pos) == expected_len
    np.testing.assert_allclose(pos[:5], expected_head)
    assert pos.max() <= frames_in - 1


def test_source_positions_pad_the_tail_with_the_last_frame():
    """Positions past the last source frame repeat it (8 fps: the last two of 120)."""
    pos = source_positions(40, 8, 24)
    assert list(pos[-3:]) == [39, 39, 39]
    assert list(source_positions(40, 8, 24, frames_out=126)[-6:]) == [39] * 6


@pytest.mark.parametrize("src_fps", [8, 12, 16])
def test_interpolate_gives_exactly_the_frames_of_the_duration_at_24_fps(tmp_path, astronaut, src_fps):
    """8, 12 and 16 fps become 24 fps with round(duration·24) frames, original frames in place."""
    src = render(astronaut, tmp_path / "src.mp4", camera=CameraMove.PAN_LEFT, motion=3, duration=2.0,
                 fps=src_fps, width=W, height=H).path  # fmt: skip
    report = interpolate(src, tmp_path / "out.mp4", fps=24, mode="motion")
    info = probe(report.path)
    assert (info.frames, info.fps, info.width, info.height) == (48, 24.0, W, H)
    assert report.frames == 48 and report.frames_in == 2 * src_fps
    source, out = list(read_frames(src)), list(read_frames(report.path))
    landed = [(j, j * 24 // src_fps) for j in range(len(source)) if j * 24 % src_fps == 0]
    assert len(landed) >= len(source) // 2
    for j, k in landed:
        assert psnr(out[k], source[j]) > 34  # source frames pass through (re-encoded at CRF 18)


def test_interpolate_honours_a_requested_duration(tmp_path, clips):
    """duration= fixes the count: 2 s at 8 fps asked as 2.25 s gives 54 frames, the tail padded."""
    report = interpolate(clips["pan8"], tmp_path / "out.mp4", mode="blend", duration=2.25)
    out = list(read_frames(report.path))
    assert len(out) == 54 and report.frames == 54
    assert psnr(out[-1], out[-6]) > 45  # the padding repeats the last source frame


def test_motion_mode_recovers_held_out_frames_of_a_camera_move(tmp_path, clips):
    """Every 3rd frame of a real 24 fps pan, brought back to 24 fps: in-between frames match the originals."""
    truth = list(read_frames(clips["pan24"]))
    motion = list(read_frames(interpolate(clips["pan8"], tmp_path / "m.mp4", mode="motion").path))
    blend = list(read_frames(interpolate(clips["pan8"], tmp_path / "b.mp4", mode="blend").path))
    held_out = [k for k in range(len(truth) - 2) if k % 3]  # the last two are padding, not interpolation
    motion_psnr = [psnr(motion[k], truth[k]) for k in held_out]
    blend_psnr = [psnr(blend[k], truth[k]) for k in held_out]
    assert len(motion) == len(blend) == len(truth) == 48
    assert np.mean(motion_psnr) > 33 and min(motion_psnr) > 30
    assert np.mean(motion_psnr) > np.mean(blend_psnr) + 5  # blending ghosts a 25 %/2 s pan


def test_blend_mode_is_the_weighted_average_of_the_neighbours(clips):
    """In memory: the frame a third of the way is 2/3 of the first frame plus 1/3 of the second."""
    a, b = list(read_frames(clips["pan8"]))[:2]
    out = list(interpolate_frames([a, b], [0.0, 1 / 3, 1.0], mode="blend"))
    assert out[0] is a and out[2] is b
    expected = (a.astype(np.float64) * 2 + b) / 3
    assert np.abs(out[1] - expected).max() <= 1.0


def test_motion_mode_keeps_source_frames_and_handles_static_input():
    """Whole positions return the source frame itself; a still picture interpolates to itself."""
    still = data.astronaut()[:180, :320].copy()
    out = list(interpolate_frames([still, still, still], [0, 0.5, 1, 1.5, 2], mode="motion"))
    assert out[0] is still and out[2] is still
    assert psnr(out[1], still) > 45 and psnr(out[3], still) > 45


def test_mci_mode_pads_minterpolate_to_the_full_count(tmp_path, clips):
    """ffmpeg's minterpolate drops the tail on its own; our mci mode returns every frame."""
    report = interpolate(clips["pan8"], tmp_path / "mci.mp4", mode="mci")
    assert probe(report.path).frames == 48
    truth, out = list(read_frames(clips["pan24"])), list(read_frames(report.path))
    assert np.mean([psnr(out[k], truth[k]) for k in range(46) if k % 3]) > 28  # in step, not shifted


def test_interpolate_rejects_an_unknown_mode(tmp_path, clips):
    """A typo in the setting fails loudly and writes nothing."""
    with pytest.raises(ValueError, match="mode must be one of motion, blend, mci"):
        interpolate(clips["pan8"], tmp_path / "x.mp4", mode="optical")
    assert not (tmp_path / "x.mp4").exists()
    assert INTERPOLATION_MODES == ("motion", "blend", "mci")


def test_last_frame_is_exactly_the_last_decoded_frame(clips):
    """last_frame returns what a decoder shows last, and before=k the frame k earlier."""
    frames = list(read_frames(clips["zoom"]))
    assert np.array_equal(last_frame(clips["zoom"]), frames[-1])
    assert np.array_equal(last_frame(clips["zoom"], before=11), frames[-12])
    assert last_frame(clips["zoom"]).flags.writeable


def test_stitch_cross_fades_a_continued_clip_without_a_visible_seam(tmp_path, clips):
    """A clip continued from its own frame joins seamlessly: 2 s + 2 s - 0.5 s, seam within bounds."""
    first = clips["zoom"]
    # Given a second segment that starts where the fade starts (12 frames before the end)
    start = last_frame(first, before=11)
    second = render(start, tmp_path / "second.mp4", camera=CameraMove.PAN_RIGHT, motion=2, duration=2.0,
                    fps=24, width=W, height=H).path  # fmt: skip
    # When they are stitched with half a second of overlap
    report = stitch([first, second], tmp_path / "joined.mp4", overlap=0.5)
    # Then the clip is 3.5 s long and the seam does not stand out
    info = probe(report.path)
    assert (info.frames, info.fps, info.width, info.height) == (84, 24.0, W, H)
    assert report.frames == 84 and report.duration == pytest.approx(3.5)
    assert report.seams == [(1.5, 2.0)]
    (check,) = seam_checks(report.path, report.seams)
    assert not check.visible and check.score < 2.0
    frames = list(read_frames(report.path))
    assert psnr(frames[0], next(iter(read_frames(first)))) > 38
    assert psnr(frames[-1], last_frame(second)) > 38


def test_a_hard_cut_between_unrelated_clips_is_a_visible_seam(tmp_path, clips):
    """overlap=0 concatenates; a cut from the astronaut to coffee scores far above the threshold."""
    report = stitch([clips["zoom"], clips["pan24"]], tmp_path / "cut.mp4", overlap=0)
    assert report.frames == 96 and report.seams == [(2.0, 2.0)]
    diffs = frame_differences(report.path)
    (check,) = seam_checks(report.path, report.seams, diffs=diffs, fps=24)
    assert check.visible and check.score > 2 * SEAM_THRESHOLD
    assert check.peak == pytest.approx(diffs.max())


def test_stitch_normalises_size_and_frame_rate(tmp_path, clips):
    """A 4:3 12 fps segment is scaled to cover, centre-cropped and re-timed to join a 16:9 24 fps one."""
    other = render(data.chelsea(), tmp_path / "cat.mp4", camera=CameraMove.ZOOM_OUT, motion=2, duration=1.0,
                   fps=12, width=240, height=180).path  # fmt: skip
    report = stitch([clips["orbit"], other, clips["zoom"]], tmp_path / "joined.mp4", overlap=0.25)
    info = probe(report.path)
    assert (info.width, info.height, info.fps) == (W, H, 24.0)
    assert report.normalised == [False, True, False]
    assert report.segment_frames == [48, 24, 48]
    assert report.frames == info.frames == 48 + 24 + 48 - 2 * 6
    assert report.seams == [(1.75, 2.0), (2.5, 2.75)]


def test_stitch_refuses_what_it_cannot_join(tmp_path, clips):
    """No segments, a negative overlap or one longer than a segment are errors, and nothing is written."""
    with pytest.raises(ValueError, match="nothing to stitch"):
        stitch([], tmp_path / "x.mp4")
    with pytest.raises(ValueError, match="overlap must be"):
        stitch([clips["zoom"], clips["orbit"]], tmp_path / "x.mp4", overlap=-1)
    with pytest.raises(ValueError, match="not shorter than every segment"):
        stitch([clips["zoom"], clips["orbit"]], tmp_path / "x.mp4", overlap=2.0)
    assert not (tmp_path / "x.mp4").exists()
