"""Validation and fitting of uploaded pictures, on real files made from the sample photograph."""


from __future__ import annotations

import io
import json
import struct
import time
import warnings
import zipfile
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from backends.base import Aspect
from worker.errors import ImageRejected
from worker.imaging import FitReport, SourceImage, describe, fit, load_image, plan_fit, resolve_aspect
from worker.settings import Settings

ASTRONAUT = Path(__file__).resolve().parents[2] / "bot" / "assets" / "astronaut.png"


# -- helpers ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    with Image.open(ASTRONAUT) as im:
        return im.convert("RGB")


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(data_dir=tmp_path)


def encode(im: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **options)
    return buf.getvalue()


def difference(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute difference per channel, 0..255."""
    assert a.size == b.size, (a.size, b.size)
    return float(np.abs(np.asarray(a, np.int16) - np.asarray(b.convert("RGB"), np.int16)).mean())


def blank_png(width: int, height: int) -> bytes:
    """A real, valid 1-bit PNG of zeros: tens of KiB on disk however many pixels it claims."""
    row = b"\x00" * (1 + (width + 7) // 8)
    comp = zlib.compressobj(9)
    parts = [comp.compress(row * 256) for _ in range(height // 256)]
    parts += [comp.compress(row * (height % 256)), comp.flush()]

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def office_document() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("[Content_Types].xml", "<Types/>")
        z.writestr("word/document.xml", "<w:document/>")
    return buf.getvalue()


# -- formats ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "options", "tolerance"),
    [
        ("JPEG", {"quality": 92}, 4),
        ("PNG", {}, 0),
        ("WEBP", {"quality": 90}, 5),
        ("GIF", {}, 12),
        ("BMP", {}, 0),
        ("TIFF", {}, 0),
    ],
)
def test_common_formats_decode_to_the_same_rgb_picture(astronaut, settings, fmt, options, tolerance):
    """JPEG, PNG, WebP, GIF, BMP and TIFF all give an RGB picture matching the original."""
    data = encode(astronaut, fmt, **options)
    source = load_image(data, settings)

    assert isinstance(source, SourceImage)
    assert source.format == fmt
    assert source.image.mode == "RGB"
    assert source.size == source.original_size == source.image.size == (512, 512)
    assert source.bytes == len(data)
    assert not source.orientation_fixed
    assert difference(source.image, astronaut) <= tolerance


def test_a_path_is_read_and_fully_loaded(astronaut, settings, tmp_path):
    """A path works like bytes, and the picture no longer needs the file once loaded."""
    path = tmp_path / "upload.jpg"
    path.write_bytes(encode(astronaut, "JPEG"))
    source = load_image(path, settings)
    path.unlink()

    assert source.bytes > 0
    assert (
        source.image.getpixel((256, 256)) == astronaut.getpixel((256, 256))
        or difference(source.image, astronaut) < 4
    )


@pytest.mark.parametrize(("fmt", "options"), [("GIF", {}), ("WEBP", {"lossless": True}), ("PNG", {})])
def test_an_animation_gives_its_first_frame(astronaut, settings, fmt, options):
    """Animated GIF, WebP and PNG: the first frame is used, and the note says how many there were."""
    frames = [astronaut, *(Image.new("RGB", astronaut.size, c) for c in ("red", "green", "blue"))]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **options)
    source = load_image(data, settings)

    assert f"first frame of 4-frame {fmt}" in source.conversions
    assert difference(source.image, astronaut) < 12


def test_a_multi_page_tiff_gives_its_first_page(astronaut, settings):
    """A three-page TIFF: page one, noted as such."""
    pages = [astronaut, astronaut.rotate(90), astronaut.rotate(180)]
    source = load_image(encode(pages[0], "TIFF", save_all=True, append_images=pages[1:]), settings)

    assert "first page of 3-page TIFF" in source.conversions
    assert difference(source.image, astronaut) == 0


# -- orientation --------------------------------------------------------------------------------

# How a camera stores an upright scene for each EXIF orientation (the inverse of what undoes it).
STORED_AS = {
    3: Image.Transpose.ROTATE_180,
    6: Image.Transpose.ROTATE_90,
    8: Image.Transpose.ROTATE_270,
}


@pytest.mark.parametrize("orientation", [6, 8, 3])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_exif_orientation_is_applied(astronaut, settings, fmt, orientation):
    """A sideways or upside-down phone photo comes out upright, with width and height swapped as needed."""
    upright = astronaut.crop((0, 64, 512, 448))  # 512×384, so a wrong rotation changes the size
    stored = upright.transpose(STORED_AS[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    source = load_image(
        encode(stored, fmt, exif=exif, **({"quality": 95} if fmt != "TIFF" else {})), settings
    )

    assert source.orientation_fixed
    assert source.original_size == stored.size
    assert source.size == source.image.size == (512, 384)
    assert difference(source.image, upright) < 4
    assert "exif" not in source.image.info  # nothing downstream can rotate it twice


def test_orientation_1_changes_nothing(astronaut, settings):
    """An explicit "normal" orientation is not reported as fixed."""
    exif = Image.Exif()
    exif[0x0112] = 1
    source = load_image(encode(astronaut, "JPEG", exif=exif), settings)
    assert not source.orientation_fixed and source.size == (512, 512)


# -- colour modes -------------------------------------------------------------------------------


def test_a_cmyk_jpeg_becomes_rgb(astronaut, settings):
    """A print-shop CMYK JPEG is converted to RGB with its colours intact."""
    source = load_image(encode(astronaut.convert("CMYK"), "JPEG", quality=95), settings)
    assert source.image.mode == "RGB"
    assert any(note.startswith("CMYK → RGB") for note in source.conversions)
    assert difference(source.image, astronaut) < 6


def test_a_16_bit_png_keeps_its_tonal_range(settings):
    """A 16-bit grayscale ramp is scaled to 0..255, not clipped to white."""
    ramp = np.tile(np.linspace(0, 65535, 512).round().astype(np.uint16), (256, 1))
    image = Image.fromarray(ramp)
    assert image.mode == "I;16"
    source = load_image(encode(image, "PNG"), settings)

    gray = np.asarray(source.image)[..., 0].astype(int)
    assert "16-bit → 8-bit" in source.conversions
    assert gray.min() == 0 and gray.max() == 255
    assert abs(gray.mean() - 127.5) < 1
    assert abs(gray[0, 256] - 128) <= 1  # the middle of the ramp is mid-grey
    assert (np.diff(gray[0]) >= 0).all()  # still a ramp


@pytest.mark.parametrize(
    ("samples", "note"),
    [
        (np.linspace(0.0, 1.0, 512, dtype=np.float32), "32-bit float → 8-bit"),
        (np.linspace(-1000, 3000, 512).astype(np.int32), "32-bit → 8-bit (stretched -1000..3000)"),
    ],
)
def test_32_bit_tiffs_are_scaled_to_8_bit(settings, samples, note):
    """Float (0..1) and 32-bit integer TIFFs from scientific tools become a full-range ramp."""
    source = load_image(encode(Image.fromarray(np.tile(samples, (256, 1))), "TIFF"), settings)
    gray = np.asarray(source.image)[..., 0].astype(int)
    assert note in source.conversions
    assert gray.min() == 0 and gray.max() == 255 and (np.diff(gray[0]) >= 0).all()


def test_a_16_bit_rgb_png_is_noted_and_matches(astronaut, settings):
    """A 16-bit-per-channel RGB PNG (as Photoshop and cameras write) decodes to the same picture."""
    rgb16 = np.asarray(astronaut).astype(np.uint16) * 257
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb16, cv2.COLOR_RGB2BGR))
    assert ok
    source = load_image(png.tobytes(), settings)

    assert "16-bit → 8-bit" in source.conversions
    assert difference(source.image, astronaut) < 1


def test_a_palette_png_with_transparency_is_flattened_on_white(astronaut, settings):
    """Transparent palette entries become white; the rest keeps its colours."""
    palette = astronaut.quantize(255)
    palette.putpalette([*palette.getpalette(), 0, 0, 0])  # a 256th entry, the transparent one
    palette.paste(255, (0, 0, 128, 128))
    source = load_image(encode(palette, "PNG", transparency=255), settings)

    assert source.conversions == ["palette → RGB", "alpha flattened on white"]
    assert source.image.getpixel((10, 10)) == (255, 255, 255)
    assert difference(source.image.crop((256, 256, 512, 512)), astronaut.crop((256, 256, 512, 512))) < 8


def test_rgba_is_flattened_on_white(astronaut, settings):
    """Clear pixels turn white, half-clear ones blend, opaque ones are kept."""
    rgba = astronaut.convert("RGBA")
    alpha = Image.new("L", rgba.size, 255)
    alpha.paste(0, (0, 0, 100, 100))
    alpha.paste(128, (0, 400, 100, 512))
    rgba.putalpha(alpha)
    source = load_image(encode(rgba, "PNG"), settings)

    assert "alpha flattened on white" in source.conversions
    assert source.image.getpixel((50, 50)) == (255, 255, 255)
    r, g, b = astronaut.getpixel((50, 450))
    blended = source.image.getpixel((50, 450))
    assert all(abs(v - (c * 128 + 255 * 127) / 255) <= 2 for v, c in zip(blended, (r, g, b), strict=True))
    assert source.image.getpixel((300, 300)) == astronaut.getpixel((300, 300))


def test_an_opaque_alpha_channel_is_simply_dropped(astronaut, settings):
    """An RGBA file with nothing transparent is noted as such, not "flattened"."""
    source = load_image(encode(astronaut.convert("RGBA"), "PNG"), settings)
    assert source.conversions == ["opaque alpha channel dropped"]
    assert difference(source.image, astronaut) == 0


@pytest.mark.parametrize(
    ("mode", "note"), [("L", "grayscale → RGB"), ("LA", "grayscale → RGB"), ("1", "1-bit → RGB")]
)
def test_grayscale_becomes_rgb(astronaut, settings, mode, note):
    """Grayscale, grayscale with alpha and 1-bit pictures come out as RGB with equal channels."""
    source = load_image(encode(astronaut.convert(mode), "PNG"), settings)
    pixels = np.asarray(source.image)
    assert note in source.conversions
    assert source.image.mode == "RGB"
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()


# -- refusals -----------------------------------------------------------------------------------

SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="512" height="512"><circle r="9"/></svg>'
MP4 = b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00isomiso2avc1mp41\x00\x00\x00\x08free" + b"\x00" * 64
WEBM = b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\xf7\x81\x01\x42\x82\x84webm" + b"\x00" * 64
HEIC = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64


def _refusals(astronaut: Image.Image) -> list:
    jpeg = encode(astronaut, "JPEG")
    png = encode(astronaut, "PNG")
    return [
        # name, bytes, settings overrides, code, fragments the message must contain
        ("empty", b"", {}, "empty_file", ["empty", "0 bytes"]),
        ("over size", png, {"max_upload_bytes": 100_000}, "file_too_large", ["0.4 MiB", "limit is 0.1 MiB"]),
        ("svg", SVG, {}, "vector_image", ["SVG", "vector images are not supported", "PNG or JPEG"]),
        ("svg with prolog", b'<?xml version="1.0"?>\n' + SVG, {}, "vector_image", ["SVG"]),
        ("pdf", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", {}, "vector_image", ["PDF", "PNG or JPEG"]),
        ("eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", {}, "vector_image", ["EPS"]),
        ("html", b"<!DOCTYPE html>\n<html><body><img src=x.png></body></html>", {}, "not_an_image", ["HTML"]),
        ("office document", office_document(), {}, "not_an_image", ["Office document"]),
        ("mp4", MP4, {}, "not_an_image", ["video", "MP4", "PNG or JPEG"]),
        ("webm", WEBM, {}, "not_an_image", ["video", "WebM"]),
        ("plain text", b"these are my notes, not a picture\n", {}, "not_an_image", ["text file"]),
        ("heic", HEIC, {}, "unsupported_format", ["HEIC", "JPEG"]),
        (
            "truncated jpeg",
            jpeg[: len(jpeg) // 2],
            {},
            "corrupt_image",
            ["truncated or corrupt", "re-export"],
        ),
        ("truncated png", png[: len(png) // 2], {}, "corrupt_image", ["truncated or corrupt", "PNG"]),
        ("png header only", png[:40], {}, "corrupt_image", ["truncated or corrupt", "PNG"]),
        (
            "bomb",
            blank_png(20_000, 20_000),
            {},
            "too_many_pixels",
            ["400.0 megapixels", "limit is 50 megapixels"],
        ),
        (
            "over the pixel limit",
            png,
            {"max_image_pixels": 200_000},
            "too_many_pixels",
            ["512×512", "limit is 0.2 megapixels", "447×447"],
        ),
        ("too small", encode(astronaut.resize((100, 100)), "PNG"), {}, "too_small", ["100×100", "128 px"]),
        (
            "too wide",
            encode(astronaut.resize((1024, 256)), "PNG"),
            {},
            "extreme_aspect",
            ["4.00:1", "3:1", "crop"],
        ),
        (
            "too tall",
            encode(astronaut.resize((200, 700)), "PNG"),
            {},
            "extreme_aspect",
            ["3.50:1", "tall", "9:16"],
        ),
    ]


REFUSAL_NAMES = (
    "empty",
    "over size",
    "svg",
    "svg with prolog",
    "pdf",
    "eps",
    "html",
    "office document",
    "mp4",
    "webm",
    "plain text",
    "heic",
    "truncated jpeg",
    "truncated png",
    "png header only",
    "bomb",
    "over the pixel limit",
    "too small",
    "too wide",
    "too tall",
)


@pytest.fixture(scope="module")
def refusals(astronaut) -> dict:
    cases = {case[0]: case[1:] for case in _refusals(astronaut)}
    assert tuple(cases) == REFUSAL_NAMES
    return cases


@pytest.mark.parametrize("name", REFUSAL_NAMES)
def test_unusable_uploads_are_refused_in_one_line(refusals, tmp_path, name):
    """Each bad upload gets its own code and a one-line message with the useful numbers."""
    data, overrides, code, fragments = refusals[name]
    with pytest.raises(ImageRejected) as caught:
        load_image(data, Settings(data_dir=tmp_path, **overrides))

    error = caught.value
    assert error.code == code, error.message
    assert "\n" not in error.message and "Traceback" not in error.message
    for fragment in fragments:
        assert fragment in error.message


def test_an_oversized_file_is_refused_before_it_is_read(tmp_path):
    """The size limit applies to a path from its directory entry, whatever the content."""
    path = tmp_path / "huge.jpg"
    path.write_bytes(b"\xff" * 5000)
    with pytest.raises(ImageRejected) as caught:
        load_image(path, Settings(data_dir=tmp_path, max_upload_bytes=4096))
    assert caught.value.code == "file_too_large"


def test_pillows_own_bomb_warning_does_not_escape(tmp_path):
    """A 100-megapixel header trips Pillow's warning; it stays silent even under -W error."""
    data = blank_png(10_000, 10_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageRejected) as caught:
            load_image(data, Settings(data_dir=tmp_path))
    assert caught.value.code == "too_many_pixels"
    assert "10000×10000 (100.0 megapixels)" in caught.value.message


def test_a_format_pillow_knows_but_we_do_not_decode_is_named(astronaut, settings):
    """An ICO file is refused by its name, with what to send instead."""
    with pytest.raises(ImageRejected) as caught:
        load_image(encode(astronaut.resize((256, 256)), "ICO"), settings)
    assert caught.value.code == "unsupported_format"
    assert caught.value.message == "ICO images are not supported; export it as PNG or JPEG"


# -- reduced-scale decoding and speed ------------------------------------------------------------


@pytest.fixture(scope="module")
def photo_12mp(astronaut) -> bytes:
    return encode(astronaut.resize((4000, 3000), Image.Resampling.BICUBIC), "JPEG", quality=90)


def test_a_large_jpeg_is_decoded_at_reduced_scale_for_a_small_target(settings, photo_12mp):
    """4000×3000 for a 1280×720 target decodes at 1/2: still larger than any crop needs."""
    source = load_image(photo_12mp, settings, target=(1280, 720))

    assert source.size == (4000, 3000)
    assert source.image.size == (2000, 1500) and source.scale == 0.5
    assert "decoded at 1/2 scale for a 1280×720 target" in source.conversions
    frame, report = fit(source.image, Aspect.LANDSCAPE, width=1280, height=720, mode="crop")
    assert frame.size == (1280, 720) and not report.upscaled


def test_reduced_scale_follows_the_orientation(astronaut, settings):
    """A sideways 4000×3000 photo for a portrait 720×1280 target decodes at 1/2, upright 1500×2000."""
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(astronaut.resize((4000, 3000)), "JPEG", exif=exif)
    source = load_image(data, settings, target=(720, 1280))
    assert source.size == (3000, 4000)
    assert source.image.size == (1500, 2000)


def test_no_reduced_scale_when_the_target_is_not_much_smaller(settings, photo_12mp):
    """A 2560×1440 target is more than half of 4000×3000: full decode."""
    source = load_image(photo_12mp, settings, target=(2560, 1440))
    assert source.image.size == (4000, 3000) and source.scale == 1.0


def test_a_12_megapixel_jpeg_validates_and_fits_well_under_a_second(settings, photo_12mp):
    """Decode, orientation, colour and fitting of a 12 MP photo take a fraction of a second."""
    start = time.perf_counter()
    source = load_image(photo_12mp, settings, target=(1280, 720))
    fit(source.image, Aspect.LANDSCAPE, width=1280, height=720, mode="crop")
    fit(source.image, Aspect.PORTRAIT, width=720, height=1280, mode="pad")
    assert time.perf_counter() - start < 1.0


# -- aspect ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "allowed", "expected"),
    [
        (1920, 1080, None, Aspect.LANDSCAPE),
        (1080, 1920, None, Aspect.PORTRAIT),
        (512, 512, None, Aspect.SQUARE),
        (4032, 3024, None, Aspect.CLASSIC),
        (3024, 4032, None, Aspect.CLASSIC_PORTRAIT),
        (3000, 1000, None, Aspect.LANDSCAPE),
        (1000, 1000, {Aspect.PORTRAIT, Aspect.LANDSCAPE}, Aspect.LANDSCAPE),
        (1100, 1000, [Aspect.PORTRAIT, Aspect.SQUARE], Aspect.SQUARE),
        (4032, 3024, [Aspect.LANDSCAPE, Aspect.SQUARE], Aspect.LANDSCAPE),
    ],
)
def test_auto_aspect_picks_the_closest_allowed(width, height, allowed, expected):
    """ "auto" is the allowed aspect nearest in log ratio; ties go to the earlier Aspect member."""
    assert resolve_aspect(width, height, allowed) is expected


def test_auto_aspect_compares_log_ratios():
    """2:1 and 1:2 are equally far from 1:1, so a 4:3 picture prefers 16:9 over 1:1 only if nearer in log."""
    # log(4/3)=0.288, log(16/9)=0.575: 4:3 is 0.288 from both 1:1 and 16:9, a tie that 16:9 wins by order.
    assert resolve_aspect(4, 3, [Aspect.SQUARE, Aspect.LANDSCAPE]) is Aspect.LANDSCAPE
    assert resolve_aspect(3, 4, [Aspect.SQUARE, Aspect.PORTRAIT]) is Aspect.PORTRAIT


@pytest.mark.parametrize(("width", "height", "allowed"), [(0, 10, None), (10, 10, [])])
def test_auto_aspect_rejects_nonsense(width, height, allowed):
    """A zero size or an empty allowed list is a programming error."""
    with pytest.raises(ValueError):
        resolve_aspect(width, height, allowed)


# -- fitting ------------------------------------------------------------------------------------


def test_crop_cuts_the_centre_and_upscales_to_the_exact_size(astronaut):
    """512×512 to 16:9 at 1280×720: the middle 512×288 band, upscaled with Lanczos, and it says so."""
    frame, report = fit(astronaut, Aspect.LANDSCAPE, width=1280, height=720, mode="crop")

    assert isinstance(report, FitReport)
    assert frame.size == (1280, 720) and frame.mode == "RGB"
    assert report.crop_box == (0, 112, 512, 400) and report.pad is None
    assert report.upscaled
    assert report.notes == (
        "cropped 512×512 → 512×288 (centre)",
        "upscaled 512×288 → 1280×720 (Lanczos)",
    )
    band = astronaut.crop(report.crop_box)
    assert difference(frame.resize(band.size, Image.Resampling.LANCZOS), band) < 4


@pytest.mark.parametrize(
    ("focus", "expected_top"),
    [
        ((256, 450), 224),  # near the bottom: the window stops at the edge
        ((256, 10), 0),  # near the top
        ((256, 300), 156),  # in the middle: centred on it
    ],
)
def test_a_focused_crop_keeps_the_focus_in_frame(astronaut, focus, expected_top):
    """The crop window is centred on the focus point as far as the picture's edges allow."""
    frame, report = fit(astronaut, Aspect.LANDSCAPE, width=640, height=360, mode="crop", focus=focus)

    left, top, right, bottom = report.crop_box
    assert top == expected_top and bottom - top == 288 and (left, right) == (0, 512)
    assert left <= focus[0] < right and top <= focus[1] < bottom
    assert frame.size == (640, 360)
    assert "around focus" in report.notes[0]


def test_pad_keeps_the_whole_picture_on_a_blurred_backdrop(astronaut):
    """Pad to 16:9: the picture whole in the middle, the sides a darkened blur of it, not black."""
    frame, report = fit(astronaut, Aspect.LANDSCAPE, width=1280, height=720, mode="pad")

    assert frame.size == (1280, 720)
    assert report.pad == (280, 0, 280, 0) and report.content_size == (720, 720) and report.crop_box is None
    assert any("blurred backdrop" in note for note in report.notes)
    assert "upscaled 512×512 → 720×720 (Lanczos)" in report.notes
    middle = frame.crop((280, 0, 1000, 720))
    assert difference(middle, astronaut.resize((720, 720), Image.Resampling.LANCZOS)) < 1

    side = np.asarray(frame.crop((0, 0, 280, 720)), float)
    assert side.mean() > 10  # not flat black
    assert side.std() > 3  # an image, not a flat colour
    assert side.mean() < np.asarray(middle, float).mean()  # darker than the picture
    assert np.abs(np.diff(side, axis=1)).mean() < 2  # smooth: blurred


def test_pad_to_portrait_pads_top_and_bottom(astronaut):
    """Pad a square picture to 9:16: bands above and below."""
    frame, report = fit(astronaut, Aspect.PORTRAIT, width=360, height=640, mode="pad")
    assert frame.size == (360, 640)
    assert report.pad == (0, 140, 0, 140) and not report.upscaled


def test_a_large_picture_is_downscaled_and_the_report_says_so(astronaut):
    """1024×576 to 640×360: no crop, a Lanczos reduction."""
    large = astronaut.resize((1024, 576))
    frame, report = fit(large, Aspect.LANDSCAPE, width=640, height=360, mode="crop")
    assert frame.size == (640, 360)
    assert report.notes == ("downscaled 1024×576 → 640×360 (Lanczos)",)
    assert report.crop_box == (0, 0, 1024, 576) and report.scale == 0.625


@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_a_picture_that_already_fits_is_returned_as_is(astronaut, mode):
    """Nothing to crop and nothing to resize: the same image, no notes."""
    frame, report = fit(astronaut, Aspect.SQUARE, width=512, height=512, mode=mode)
    assert frame is astronaut and report.notes == () and not report.upscaled


@pytest.mark.parametrize(
    ("aspect", "size", "mode"),
    [
        (Aspect.SQUARE, (1280, 720), "crop"),
        (Aspect.LANDSCAPE, (1280, 720), "stretch"),
        (Aspect.SQUARE, (0, 0), "crop"),
    ],
)
def test_fit_rejects_inconsistent_arguments(astronaut, aspect, size, mode):
    """An aspect that disagrees with the size, an unknown mode or a zero size is a programming error."""
    with pytest.raises(ValueError):
        fit(astronaut, aspect, width=size[0], height=size[1], mode=mode)


def test_plan_fit_is_the_geometry_of_fit():
    """plan_fit answers without pixels, for the full-size picture."""
    report = plan_fit((4000, 3000), Aspect.LANDSCAPE, width=1280, height=720, mode="crop")
    assert report.crop_box == (0, 375, 4000, 2625) and not report.upscaled


# -- describe ------------------------------------------------------------------------------------


def test_describe_reports_validation_and_the_planned_fit(astronaut, settings):
    """The inspect report is plain JSON with the size, format, fixes and what fitting would do."""
    upright = astronaut.crop((0, 64, 512, 448))
    exif = Image.Exif()
    exif[0x0112] = 6
    source = load_image(encode(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif), settings)

    report = describe(source, settings)

    assert json.loads(json.dumps(report)) == report
    assert report["ok"] is True
    assert report["format"] == "JPEG" and report["bytes"] == source.bytes
    assert (report["width"], report["height"]) == (512, 384)
    assert (report["stored_width"], report["stored_height"]) == (384, 512)
    assert report["orientation_fixed"] is True
    assert report["conversions"] == []
    target = report["target"]
    assert target["auto"] is True and target["aspect"] == "4:3" and target["mode"] == "crop"
    assert (target["width"], target["height"]) == (1280, 960)
    assert target["upscaled"] is True
    assert target["notes"] == ["upscaled 512×384 → 1280×960 (Lanczos)"]


def test_describe_with_a_chosen_aspect_and_pad(astronaut, settings):
    """A fixed aspect and pad mode show the pad amounts."""
    source = load_image(encode(astronaut, "PNG"), settings)
    target = describe(source, aspect=Aspect.LANDSCAPE, long_side=640, mode="pad")["target"]
    assert target["auto"] is False and target["aspect"] == "16:9"
    assert target["pad"] == [140, 0, 140, 0] and target["crop_box"] is None
