"""The offline animator: every camera move, measured on real renders of the sample photograph."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

from backends import animator
from backends.animator import RenderInfo, camera_path, render, yuv_frames
from backends.base import Box, CameraMove
from backends.video import probe, read_frames, rgb_to_ycbcr

ASSET = Path(__file__).resolve().parents[2] / "bot" / "assets" / "astronaut.png"
FACE = Box(177, 67, 93, 93)  # Haar frontal-face detection on astronaut.png (512×512)
W, H, FPS, SECONDS = 320, 180, 24, 1.0
FRAMES = 24
MOVES = list(CameraMove)
ORBITS = (CameraMove.ORBIT_LEFT, CameraMove.ORBIT_RIGHT)
PANS = (CameraMove.PAN_LEFT, CameraMove.PAN_RIGHT, CameraMove.PAN_UP, CameraMove.PAN_DOWN)
ECC = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 100, 1e-6)


@dataclass
class Clip:
    info: RenderInfo
    frames: list[np.ndarray]  # decoded RGB

    @property
    def gray(self) -> list[np.ndarray]:
        return [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY).astype(np.float32) for f in self.frames]


@pytest.fixture(scope="module")
def square() -> np.ndarray:
    """The 512×512 photograph, RGB."""
    return cv2.cvtColor(cv2.imread(str(ASSET)), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def photo(square) -> np.ndarray:
    """A 16:9 crop (512×288) that keeps the face: the shape backends receive."""
    return np.ascontiguousarray(square[16:304])


def make(image: np.ndarray, out: Path, camera: CameraMove, motion: int = 2, **kw) -> Clip:
    options = {"duration": SECONDS, "fps": FPS, "width": W, "height": H, **kw}
    info = render(image, out, camera=camera, motion=motion, **options)
    return Clip(info, list(read_frames(out)))


@pytest.fixture(scope="module")
def clips(photo, tmp_path_factory) -> dict[CameraMove, Clip]:
    """Every move at the default strength, rendered once for the module."""
    root = tmp_path_factory.mktemp("clips")
    return {move: make(photo, root / f"{move.value}.mp4", move) for move in MOVES}


@pytest.fixture(scope="module")
def strengths(photo, tmp_path_factory) -> dict[tuple[CameraMove, int], Clip]:
    """Every move at motion 0 and 4, from a brightened photo (no pixel darker than 128)."""
    root = tmp_path_factory.mktemp("strengths")
    bright = (photo // 2 + 128).astype(np.uint8)
    return {
        (move, m): make(bright, root / f"{move.value}-{m}.mp4", move, motion=m)
        for move in MOVES
        for m in (0, 4)
    }


def path_for(move: CameraMove, size=(512, 288), motion: int = 2, **kw) -> list[np.ndarray]:
    options = {"duration": SECONDS, "fps": FPS, "width": W, "height": H, **kw}
    return camera_path(size, camera=move, motion=motion, **options)


def reference_frame(image: np.ndarray, m: np.ndarray, k: int = 4) -> np.ndarray:
    """What a frame should show: the photo through matrix ``m``, 4× supersampled then area-averaged."""
    s = np.array([[1 / k, 0, 0.5 / k - 0.5], [0, 1 / k, 0.5 / k - 0.5], [0, 0, 1]])
    big = cv2.warpPerspective(
        image,
        m @ s,
        (W * k, H * k),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )
    return cv2.resize(big, (W, H), interpolation=cv2.INTER_AREA)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255**2 / mse))


def ecc(template: np.ndarray, moving: np.ndarray, homography: bool = False) -> np.ndarray:
    """3×3 warp mapping ``template`` pixel coordinates to ``moving`` ones, fitted by ECC."""
    mode = cv2.MOTION_HOMOGRAPHY if homography else cv2.MOTION_AFFINE
    warp = np.eye(3 if homography else 2, 3, dtype=np.float32)
    _, warp = cv2.findTransformECC(template, moving, warp, mode, ECC, None, 5)
    return warp.astype(np.float64) if homography else np.vstack([warp, [0, 0, 1]])


def measured_motion(gray: list[np.ndarray], homography: bool = False) -> np.ndarray:
    """Last-frame → first-frame coordinates, chaining ECC fits of consecutive frames (no prior)."""
    total = np.eye(3)
    for earlier, later in itertools.pairwise(gray):
        total = total @ ecc(later, earlier, homography)
    return total


def apply(m: np.ndarray, x: float, y: float) -> np.ndarray:
    p = m @ np.array([x, y, 1.0])
    return p[:2] / p[2]


def corners(m: np.ndarray, w: float = W, h: float = H) -> np.ndarray:
    return np.array([apply(m, x, y) for x in (-0.5, w - 0.5) for y in (-0.5, h - 0.5)])


@pytest.mark.parametrize("move", MOVES)
def test_every_move_renders_a_clip_of_the_requested_shape(clips, move):
    """Frame count, size, frame rate, codec and pixel format are what was asked for."""
    clip = clips[move]
    info = probe(clip.info.path)
    assert (clip.info.frames, clip.info.width, clip.info.height, clip.info.fps) == (FRAMES, W, H, FPS)
    assert (info.width, info.height, info.fps, info.frames) == (W, H, FPS, FRAMES)
    assert (info.codec, info.pix_fmt) == ("h264", "yuv420p")
    assert len(clip.frames) == FRAMES


@pytest.mark.parametrize("move", MOVES)
def test_first_frame_is_the_photo_framed_as_the_path_begins(clips, photo, move):
    """Frame 0 matches the photograph through the path's first matrix: colours, framing, alignment."""
    first = clips[move].frames[0]
    expected = reference_frame(photo, path_for(move)[0])
    assert psnr(first, expected) > 30
    (dx, dy), _ = cv2.phaseCorrelate(
        cv2.cvtColor(expected, cv2.COLOR_RGB2GRAY).astype(np.float32),
        cv2.cvtColor(first, cv2.COLOR_RGB2GRAY).astype(np.float32),
    )
    assert np.hypot(dx, dy) < 0.1


@pytest.mark.parametrize("move", MOVES)
def test_last_frame_is_where_the_path_ends(clips, photo, move):
    """The final frame matches the photograph through the path's last matrix."""
    assert psnr(clips[move].frames[-1], reference_frame(photo, path_for(move)[-1])) > 30


def test_zoom_in_starts_on_the_whole_photo():
    """For a photo of the output's shape, zoom-in's first frame is the full picture."""
    first = path_for(CameraMove.ZOOM_IN)[0]
    assert np.allclose(corners(first), [(-0.5, -0.5), (-0.5, 287.5), (511.5, -0.5), (511.5, 287.5)])


@pytest.mark.parametrize("move", MOVES)
def test_measured_motion_follows_the_ideal_path(clips, move):
    """Chained ECC fits of the decoded clip land where the ideal path says, within half a pixel."""
    path = path_for(move)
    measured = measured_motion(clips[move].gray, homography=move in ORBITS)
    ideal = np.linalg.inv(path[0]) @ path[-1]
    assert np.abs(corners(measured) - corners(ideal)).max() < 0.5


def content_shift(t: np.ndarray) -> np.ndarray:
    """Where the first frame's centre went in the last frame (``t`` maps last → first)."""
    centre = ((W - 1) / 2, (H - 1) / 2)
    return apply(np.linalg.inv(t), *centre) - centre


def magnification(t: np.ndarray) -> float:
    """How much larger the content is in the last frame than in the first."""
    return float(1 / np.sqrt(abs(np.linalg.det(t[:2, :2]))))


@pytest.mark.parametrize(
    ("move", "direction"),
    [
        (CameraMove.PAN_LEFT, (1, 0)),
        (CameraMove.PAN_RIGHT, (-1, 0)),
        (CameraMove.PAN_UP, (0, 1)),
        (CameraMove.PAN_DOWN, (0, -1)),
    ],
)
def test_pans_slide_the_picture_opposite_to_the_camera(clips, move, direction):
    """pan-left moves the view left, so the picture slides right (and so on), without zooming."""
    t = measured_motion(clips[move].gray)
    shift = content_shift(t)
    along = W if direction[0] else H
    assert np.dot(shift, direction) > 0.12 * along  # motion 2 travels 12 % of the picture
    assert abs(np.dot(shift, direction[::-1])) < 1
    assert magnification(t) == pytest.approx(1, abs=0.005)


@pytest.mark.parametrize(("move", "grows"), [(CameraMove.ZOOM_IN, True), (CameraMove.ZOOM_OUT, False)])
def test_zooms_change_the_scale_about_the_centre(clips, move, grows):
    """zoom-in magnifies by 1.25 at motion 2, zoom-out shrinks by as much; the centre stays put."""
    t = measured_motion(clips[move].gray)
    expected = 1.25 if grows else 1 / 1.25
    assert magnification(t) == pytest.approx(expected, rel=0.01)
    assert np.hypot(*content_shift(t)) < 0.5


def test_dolly_in_ends_closer_and_accelerates_unlike_zoom_in(clips):
    """Dolly-in magnifies more than zoom-in, and its zoom speed peaks late (braking) rather than mid-clip."""
    dolly = magnification(measured_motion(clips[CameraMove.DOLLY_IN].gray))
    zoom = magnification(measured_motion(clips[CameraMove.ZOOM_IN].gray))
    assert dolly > zoom * 1.05

    def peak_speed_at(move: CameraMove) -> float:
        scales = [m[0, 0] for m in path_for(move, duration=4.0)]
        speed = -np.diff(np.log(scales))
        return int(np.argmax(speed)) / len(speed)

    assert peak_speed_at(CameraMove.ZOOM_IN) == pytest.approx(0.5, abs=0.02)
    assert peak_speed_at(CameraMove.DOLLY_IN) > 0.7


@pytest.mark.parametrize(("move", "near_side"), [(CameraMove.ORBIT_LEFT, 0), (CameraMove.ORBIT_RIGHT, 1)])
def test_orbits_turn_the_picture_plane(clips, move, near_side):
    """orbit-left swings the left side nearer (larger) and the right side away; orbit-right the reverse."""
    forward = np.linalg.inv(measured_motion(clips[move].gray, homography=True))  # first → last frame

    def height_at(x: float) -> float:
        return float(np.linalg.norm(apply(forward, x, 0.8 * H) - apply(forward, x, 0.2 * H)))

    left, right = height_at(0.1 * W), height_at(0.9 * W)
    near, far = (left, right) if near_side == 0 else (right, left)
    assert near > far * 1.05
    assert np.hypot(*content_shift(np.linalg.inv(forward))) < 3  # the subject (centre) stays put


def test_static_breathes_and_comes_back(clips):
    """static is not frozen: it drifts during the clip and ends on its first frame (it loops)."""
    gray = clips[CameraMove.STATIC].gray
    middle = measured_motion(gray[: FRAMES // 2 + 1])
    assert np.abs(corners(middle) - corners(np.eye(3))).max() > 2
    path = path_for(CameraMove.STATIC)
    assert np.allclose(path[0], path[-1])
    assert psnr(clips[CameraMove.STATIC].frames[0], clips[CameraMove.STATIC].frames[-1]) > 33


@pytest.mark.parametrize("move", MOVES)
def test_motion_zero_still_moves_but_less_than_motion_four(strengths, move):
    """Strength scales the move: 0 changes the picture visibly, 4 changes it more."""

    def change(clip: Clip) -> float:
        gray = clip.gray
        return max(float(np.mean(np.abs(g - gray[0]))) for g in gray)

    gentle, strong = change(strengths[(move, 0)]), change(strengths[(move, 4)])
    assert gentle > 0.5
    assert strong > gentle * 1.5


@pytest.mark.parametrize("move", MOVES)
def test_no_decoded_frame_shows_black(strengths, move):
    """Even at motion 4, every frame's border rows and columns show the picture (≥ 128), never black."""
    for clip in (strengths[(move, 0)], strengths[(move, 4)]):
        for frame in clip.frames:
            edges = np.concatenate([frame[0], frame[-1], frame[:, 0], frame[:, -1]])
            assert edges.min() > 100


@pytest.mark.parametrize("move", MOVES)
@pytest.mark.parametrize("size", [(512, 288), (512, 512), (300, 900), (1920, 1080)])
@pytest.mark.parametrize("focus", [None, FACE, Box(0, 0, 40, 40), Box(460, 230, 40, 40)])
def test_the_window_never_leaves_the_picture(move, size, focus):
    """For any shape of photo and any subject, every frame samples only inside the picture."""
    w, h = size
    for m in path_for(move, size=size, motion=4, focus=focus):
        pts = corners(m)
        assert pts[:, 0].min() >= -0.5 - 1e-6 and pts[:, 0].max() <= w - 0.5 + 1e-6
        assert pts[:, 1].min() >= -0.5 - 1e-6 and pts[:, 1].max() <= h - 0.5 + 1e-6


@pytest.mark.parametrize("move", [*PANS, *ORBITS, CameraMove.STATIC])
@pytest.mark.parametrize("motion", [2, 4])
def test_the_subject_stays_in_frame(move, motion):
    """With a focus box, pans, orbits and the breath keep the whole box inside every frame."""
    for m in path_for(move, size=(512, 512), motion=motion, focus=FACE):
        inverse = np.linalg.inv(m)
        for x in (FACE.x, FACE.x + FACE.width):
            for y in (FACE.y, FACE.y + FACE.height):
                u, v = apply(inverse, x - 0.5, y - 0.5)
                assert -0.5 <= u <= W - 0.5 and -0.5 <= v <= H - 0.5


@pytest.mark.parametrize("move", [CameraMove.ZOOM_IN, CameraMove.DOLLY_IN])
def test_zooms_converge_on_the_focus(square, tmp_path, move):
    """Given a face, the zoom ends with the face near the frame centre, and the render shows it there."""
    path = path_for(move, size=(512, 512), focus=FACE)
    fx, fy = FACE.center
    on_screen = [apply(np.linalg.inv(m), fx - 0.5, fy - 0.5) for m in path]
    distance = [np.hypot(u - (W - 1) / 2, v - (H - 1) / 2) for u, v in on_screen]
    assert all(b <= a + 1e-9 for a, b in itertools.pairwise(distance))
    assert distance[-1] < 0.05 * H
    clip = make(square, tmp_path / "focus.mp4", move, focus=FACE)
    assert psnr(clip.frames[-1], reference_frame(square, path[-1])) > 30


def centre_jitter(gray: list[np.ndarray], path: list[np.ndarray]) -> float:
    """RMS distance between where consecutive-frame ECC fits and the ideal path put the centre."""
    h, w = gray[0].shape
    errors = []
    for k in range(len(gray) - 1):
        fitted = ecc(gray[k + 1], gray[k])
        ideal = np.linalg.inv(path[k]) @ path[k + 1]
        errors.append(
            np.hypot(*(apply(fitted, (w - 1) / 2, (h - 1) / 2) - apply(ideal, (w - 1) / 2, (h - 1) / 2)))
        )
    return float(np.sqrt(np.mean(np.square(errors))))


def test_rendered_zoom_in_jitters_less_than_a_hundredth_of_a_pixel(photo):
    """The renderer itself follows the ideal zoom within 0.01 px RMS (no 2-pixel grid as in zoompan)."""
    w, h = 640, 360
    options = {
        "camera": CameraMove.ZOOM_IN,
        "motion": 2,
        "duration": 2.0,
        "fps": FPS,
        "width": w,
        "height": h,
    }
    gray = [f[:h].astype(np.float32) for f in yuv_frames(photo, **options)]
    path = camera_path((512, 288), **options)
    assert centre_jitter(gray, path) < 0.01


def test_encoded_zoom_in_jitter_stays_far_below_zoompans(photo, tmp_path):
    """After x264 (CRF 20) the decoded zoom still jitters < 0.05 px RMS; zoompan's is about 1.5 px."""
    clip = make(photo, tmp_path / "zoom.mp4", CameraMove.ZOOM_IN, duration=2.0)
    assert centre_jitter(clip.gray, path_for(CameraMove.ZOOM_IN, duration=2.0)) < 0.05


@pytest.mark.parametrize("move", [CameraMove.ZOOM_IN, CameraMove.PAN_LEFT, CameraMove.ORBIT_LEFT])
def test_chroma_follows_the_same_sub_pixel_path_as_luma(photo, move):
    """Cb sits where H.264's default 'left' 4:2:0 siting says; a centred siting would be ¼ sample off."""
    options = {"camera": move, "motion": 2, "duration": SECONDS, "fps": FPS, "width": W, "height": H}
    frames = list(yuv_frames(photo, **options))
    path = camera_path((512, 288), **options)
    cb = cv2.GaussianBlur(rgb_to_ycbcr(photo)[:, :, 1], (0, 0), 1.2).astype(np.float32)
    left = np.array([[2, 0, 0], [0, 2, 0.5], [0, 0, 1.0]])  # chroma sample → output luma pixel coordinates
    for k in (0, FRAMES // 2, FRAMES - 1):
        rendered = frames[k][H:].ravel()[: (W // 2) * (H // 2)].reshape(H // 2, W // 2).astype(np.float32)
        expected = cv2.warpPerspective(
            cb, path[k] @ left, (W // 2, H // 2), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
        )
        (dx, dy), _ = cv2.phaseCorrelate(expected, rendered)
        assert np.hypot(dx, dy) < 0.1


def test_the_source_is_prescaled_to_the_tightest_framing(photo, tmp_path):
    """Big or small, the working copy samples the tightest frame 1:1 (zoom 1.25 at 320×180: 400×226)."""
    info = render(
        photo,
        tmp_path / "a.mp4",
        camera=CameraMove.ZOOM_IN,
        motion=2,
        duration=0.25,
        fps=FPS,
        width=W,
        height=H,
    )
    assert info.work_size == (400, 226)  # even, for 4:2:0 chroma
    big = cv2.resize(photo, (2048, 1152), interpolation=cv2.INTER_CUBIC)
    info = render(
        big,
        tmp_path / "b.mp4",
        camera=CameraMove.ZOOM_IN,
        motion=2,
        duration=0.25,
        fps=FPS,
        width=W,
        height=H,
    )
    assert info.work_size == (400, 226)


def test_progress_climbs_to_one(photo, tmp_path):
    """progress gets increasing fractions and ends with 1.0."""
    seen: list[float] = []
    render(
        photo,
        tmp_path / "p.mp4",
        camera=CameraMove.PAN_LEFT,
        motion=2,
        duration=0.5,
        fps=FPS,
        width=W,
        height=H,
        progress=seen.append,
    )
    assert seen == sorted(seen)
    assert 0 < seen[0] < 0.2
    assert seen[-1] == 1.0


def test_raising_from_progress_cancels_without_leaving_a_file(photo, tmp_path):
    """An exception from the progress callback stops the render; no clip and no temporary file remain."""

    class Canceled(Exception):
        pass

    def cancel_halfway(fraction: float) -> None:
        if fraction > 0.5:
            raise Canceled

    with pytest.raises(Canceled):
        render(
            photo,
            tmp_path / "c.mp4",
            camera=CameraMove.ZOOM_IN,
            motion=2,
            duration=2.0,
            fps=FPS,
            width=W,
            height=H,
            progress=cancel_halfway,
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("channels", [None, 4])
def test_gray_and_rgba_pictures_are_accepted(photo, tmp_path, channels):
    """A 2-D gray picture or an RGBA one renders like RGB."""
    image = (
        cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY)
        if channels is None
        else cv2.cvtColor(photo, cv2.COLOR_RGB2RGBA)
    )
    info = render(
        image,
        tmp_path / "g.mp4",
        camera=CameraMove.STATIC,
        motion=2,
        duration=0.25,
        fps=FPS,
        width=W,
        height=H,
    )
    assert probe(info.path).frames == 6


@pytest.mark.parametrize(
    ("change", "error"),
    [({"motion": 5}, "motion"), ({"motion": -1}, "motion"), ({"camera": "sideways"}, "sideways")],
)
def test_bad_requests_are_refused(photo, tmp_path, change, error):
    """An out-of-range strength or an unknown move is a ValueError that names it."""
    kwargs = {
        "camera": CameraMove.ZOOM_IN,
        "motion": 2,
        "duration": 0.25,
        "fps": FPS,
        "width": W,
        "height": H,
    }
    with pytest.raises(ValueError, match=error):
        render(photo, tmp_path / "x.mp4", **{**kwargs, **change})
    assert list(tmp_path.iterdir()) == []


def test_non_uint8_pictures_are_refused(photo, tmp_path):
    """Float pictures are refused rather than silently rescaled."""
    with pytest.raises(ValueError, match="uint8"):
        render(
            photo.astype(np.float32),
            tmp_path / "x.mp4",
            camera=CameraMove.ZOOM_IN,
            motion=2,
            duration=0.25,
            fps=FPS,
            width=W,
            height=H,
        )


def test_only_orbits_need_a_perspective_warp():
    """Every move but the orbits is affine; the orbits are true homographies."""
    for move in MOVES:
        last_rows = np.array([m[2] for m in path_for(move)])
        assert np.allclose(last_rows, [0, 0, 1]) == (move not in ORBITS)


def test_frame_count_rounds_and_never_drops_below_two():
    """Five seconds at 24 fps is 120 frames; a tiny clip still has a start and an end."""
    assert animator.frame_count(5.0, 24) == 120
    assert animator.frame_count(0.01, 24) == 2
