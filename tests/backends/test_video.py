"""VideoWriter, probe and read_frames against the real bundled ffmpeg."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from backends.video import (
    VideoError,
    VideoInfo,
    VideoWriter,
    encoder_args,
    probe,
    read_frames,
    rgb_to_ycbcr,
    vbv_cap,
)

ASSET = Path(__file__).resolve().parents[2] / "bot" / "assets" / "astronaut.png"
W, H = 256, 144


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    rgb = cv2.cvtColor(cv2.imread(str(ASSET)), cv2.COLOR_BGR2RGB)
    return cv2.resize(rgb[16:304], (W, H), interpolation=cv2.INTER_AREA)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255**2 / mse))


def to_i420(rgb: np.ndarray) -> np.ndarray:
    """yuv420p planes with 'left' chroma siting: [1, 2, 1]/4 across, 2-row mean down."""
    ycc = rgb_to_ycbcr(rgb).astype(np.float32)
    planes = [ycc[:, :, 0]]
    for c in (1, 2):
        rows = (ycc[0::2, :, c] + ycc[1::2, :, c]) / 2
        pad = np.pad(rows, ((0, 0), (1, 1)), mode="edge")
        planes.append((pad[:, 0:-2:2] + 2 * pad[:, 1:-1:2] + pad[:, 2::2]) / 4)
    return np.concatenate([np.rint(p).clip(0, 255).astype(np.uint8).ravel() for p in planes])


def write_clip(path: Path, frames: list[np.ndarray], **options) -> None:
    with VideoWriter(path, width=W, height=H, fps=24, **options) as out:
        for frame in frames:
            out.write(frame)


def test_writes_an_h264_yuv420p_mp4_that_probe_describes(tmp_path, photo):
    """Ten RGB frames become a 10-frame 24 fps H.264 yuv420p MP4 of the right size."""
    path = tmp_path / "clip.mp4"
    write_clip(path, [photo] * 10)
    info = probe(path)
    assert info == VideoInfo(
        width=W,
        height=H,
        fps=24.0,
        frames=10,
        duration=pytest.approx(10 / 24),
        codec="h264",
        pix_fmt="yuv420p",
        bytes=path.stat().st_size,
    )


def test_file_is_faststart(tmp_path, photo):
    """The moov atom comes before the media data, so Discord can play while downloading."""
    path = tmp_path / "clip.mp4"
    write_clip(path, [photo] * 3)
    data = path.read_bytes()
    assert 0 <= data.find(b"moov") < data.find(b"mdat")


def test_rgb_frames_decode_to_the_same_picture(tmp_path, photo):
    """What goes in as RGB comes back out within compression noise."""
    path = tmp_path / "clip.mp4"
    write_clip(path, [photo] * 3, crf=10)
    decoded = next(read_frames(path))
    assert decoded.shape == (H, W, 3)
    assert psnr(decoded, photo) > 35


def test_yuv420p_input_decodes_like_rgb_input(tmp_path, photo):
    """Planes made with rgb_to_ycbcr decode to the colours the RGB path gives: same matrix, range, tags."""
    rgb_path, yuv_path = tmp_path / "rgb.mp4", tmp_path / "yuv.mp4"
    write_clip(rgb_path, [photo] * 2, crf=10)
    write_clip(yuv_path, [to_i420(photo)] * 2, crf=10, pix_fmt="yuv420p")
    via_rgb, via_yuv = next(read_frames(rgb_path)), next(read_frames(yuv_path))
    assert psnr(via_yuv, photo) > 35
    assert psnr(via_yuv, via_rgb) > 38
    assert np.abs(via_yuv.astype(float).mean((0, 1)) - via_rgb.astype(float).mean((0, 1))).max() < 1.0


def test_read_frames_scales_and_converts_to_gray(tmp_path, photo):
    """size= and gray=True give (h, w) uint8 luma, one array per frame."""
    path = tmp_path / "clip.mp4"
    write_clip(path, [photo] * 4)
    frames = list(read_frames(path, size=(64, 36), gray=True))
    assert len(frames) == 4
    assert frames[0].shape == (36, 64)
    assert frames[0].dtype == np.uint8
    expected = cv2.resize(cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY), (64, 36), interpolation=cv2.INTER_AREA)
    assert np.abs(frames[0].astype(int) - expected).mean() < 4


def test_nothing_appears_at_the_path_until_close(tmp_path, photo):
    """The clip is written next to the target and renamed only after ffmpeg succeeded."""
    path = tmp_path / "clip.mp4"
    with VideoWriter(path, width=W, height=H, fps=24) as out:
        out.write(photo)
        assert not path.exists()
    assert path.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]


def test_an_error_inside_the_block_leaves_no_file(tmp_path, photo):
    """Leaving the with block by an exception kills ffmpeg and removes the temporary file."""
    path = tmp_path / "clip.mp4"
    with pytest.raises(RuntimeError, match="boom"), VideoWriter(path, width=W, height=H, fps=24) as out:
        out.write(photo)
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_encode_keeps_the_previous_file(tmp_path, photo):
    """An existing file at the target survives a failed encode untouched."""
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"previous")
    with pytest.raises(VideoError):
        write_clip(path, [photo], extra_args=["-vf", "no_such_filter"])
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]


def test_ffmpeg_errors_carry_its_stderr(tmp_path, photo):
    """The exception names what ffmpeg complained about."""
    with pytest.raises(VideoError, match="no_such_filter"):
        write_clip(tmp_path / "clip.mp4", [photo], extra_args=["-vf", "no_such_filter"])


def test_closing_without_frames_is_an_error(tmp_path):
    """An empty clip is a failure, not a zero-frame file."""
    with (
        pytest.raises(VideoError, match="no frames"),
        VideoWriter(tmp_path / "x.mp4", width=W, height=H, fps=24),
    ):
        pass
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (np.zeros((H, W + 2, 3), np.uint8), "bytes"),
        (np.zeros((H, W, 3), np.float32), "uint8"),
        (b"\0" * 10, "bytes"),
    ],
)
def test_wrong_frames_are_refused(tmp_path, frame, message):
    """A frame of the wrong size or type is a ValueError, and the file is not written."""
    path = tmp_path / "clip.mp4"
    with pytest.raises(ValueError, match=message), VideoWriter(path, width=W, height=H, fps=24) as out:
        out.write(frame)
    assert not path.exists()


@pytest.mark.parametrize(
    "options",
    [{"width": 255, "height": 144}, {"width": 256, "height": 0}, {"pix_fmt": "rgba64"}, {"fps": 0}],
)
def test_bad_writer_options_are_refused(tmp_path, options):
    """Odd sizes (4:2:0 needs even), unknown pixel formats and zero fps fail before ffmpeg starts."""
    kwargs = {"width": W, "height": H, "fps": 24, **options}
    with pytest.raises(ValueError):
        VideoWriter(tmp_path / "x.mp4", **kwargs)


def test_vbv_cap_guarantees_the_size_limit(tmp_path, photo):
    """maxrate·D + bufsize stays within 95 % of the limit, and ffmpeg accepts the cap."""
    limit, seconds = 10 * 2**20, 5.0
    maxrate, bufsize = vbv_cap(limit, seconds)
    assert maxrate * seconds + bufsize <= 0.95 * 8 * limit
    noisy = [np.random.default_rng(i).integers(0, 256, (H, W, 3), dtype=np.uint8) for i in range(12)]
    path = tmp_path / "capped.mp4"
    write_clip(path, noisy, maxrate=200_000, bufsize=200_000)
    assert path.stat().st_size < 200_000 * (12 / 24 + 1) / 8 * 1.1


def test_maxrate_needs_bufsize():
    """A VBV cap without a buffer size is refused."""
    with pytest.raises(ValueError, match="bufsize"):
        encoder_args(maxrate=1_000_000)


@pytest.mark.parametrize("content", [b"", b"not a video at all" * 100])
def test_probe_refuses_what_is_not_video(tmp_path, content):
    """A file ffmpeg cannot decode raises VideoError."""
    path = tmp_path / "bad.mp4"
    path.write_bytes(content)
    with pytest.raises(VideoError):
        probe(path)


def test_probe_refuses_a_missing_file(tmp_path):
    """A missing file raises VideoError that names it."""
    with pytest.raises(VideoError, match="missing"):
        probe(tmp_path / "missing.mp4")


def test_read_frames_refuses_what_is_not_video(tmp_path):
    """Decoding garbage raises VideoError instead of yielding nothing."""
    path = tmp_path / "bad.mp4"
    path.write_bytes(b"garbage" * 100)
    with pytest.raises(VideoError):
        list(read_frames(path, size=(32, 18)))


def test_a_header_only_probe_agrees_with_the_full_decode(tmp_path):
    """probe(count=False) reads the header only and derives the same frame count for our own clips."""
    path = tmp_path / "clip.mp4"
    with VideoWriter(path, width=64, height=48, fps=24) as writer:
        for i in range(36):
            writer.write(np.full((48, 64, 3), i * 7, np.uint8))
    full, quick = probe(path), probe(path, count=False)
    assert (quick.width, quick.height, quick.frames, quick.codec) == (full.width, full.height, 36, "h264")
    assert abs(quick.duration - full.duration) < 0.05
