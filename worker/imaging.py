"""Turn whatever a user uploaded into a clean RGB picture, or refuse it in one line.

This is the first step of every generation. Uploads are untrusted bytes: they may be a web page, a
PDF, an iPhone HEIC, a truncated JPEG, a 40 000 × 40 000 decompression bomb or a sideways phone photo.
Everything after this module may assume an upright, fully loaded 8-bit RGB :class:`PIL.Image.Image`
of a sane size, and nothing before it has decoded a single pixel.

    source = load_image(upload_bytes, settings, target=(1280, 720))   # or raises ImageRejected
    aspect = resolve_aspect(*source.size)                             # "auto"
    frame, report = fit(source.image, aspect, width=1280, height=720, mode=settings.fit_mode)
    describe(source, settings)                                        # what `animabot inspect` prints

Checks run cheapest first, and every refusal happens before decoding: byte count, then what the
bytes look like (PDF, SVG, HTML, video…), then the header's pixel count, short side and aspect ratio.
Only then is the picture decoded, once, at reduced scale when a JPEG is much larger than the target.

Refusal codes (``ImageRejected.code``):

=====================  ==============================================================
``empty_file``         zero bytes
``file_too_large``     more than ``settings.max_upload_bytes``
``vector_image``       SVG, PDF, EPS/PostScript, WMF/EMF: vector or document formats
``not_an_image``       HTML, ZIP/Office, video, audio, text, anything unrecognised
``unsupported_format`` a picture format we do not decode (HEIC, PSD, …) or colour mode
``corrupt_image``      recognised but truncated or corrupt
``too_many_pixels``    more than ``settings.max_image_pixels`` (decompression-bomb guard)
``too_small``          short side under ``settings.min_image_side``
``extreme_aspect``     long:short ratio over ``settings.max_aspect_ratio``
=====================  ==============================================================
"""

# The messages and notes speak in "512×288 → 1280×720" on purpose; multi-line docstrings open with their
# summary like the rest of the tree (pyproject ignores D212 where D213 was meant).

from __future__ import annotations

import io
import math
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageCms, ImageFile, ImageFilter

from backends.base import Aspect
from worker.errors import ImageRejected
from worker.settings import MiB, Settings

__all__ = [
    "FitMode",
    "FitReport",
    "SourceImage",
    "describe",
    "fit",
    "load_image",
    "plan_fit",
    "resolve_aspect",
]

FitMode = Literal["crop", "pad"]

# Formats people actually send, decoded by well-exercised plugins. Pillow knows ~40 more (PSD, SPIDER,
# FITS, EPS via Ghostscript…); those are named in the refusal instead of being decoded.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "DIB", "TIFF", "AVIF", "QOI", "TGA", "PPM")

# What to export instead, said in refusals.
_WORKS = "send a PNG, JPEG or WebP picture"

# EXIF orientation → the transpose that makes the picture upright (as ImageOps.exif_transpose does).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION_TAG = 0x0112
# Formats whose decoder applies the orientation itself and reports the upright size from the header
# (Pillow ≥ 11 does this for single-page TIFF and then drops the tag).
_TURNED_BY_PILLOW = ("TIFF",)

# The pad backdrop: the picture shrunk to 1/16, blurred, stretched back and darkened to this brightness.
_BACKDROP_SHRINK = 16
_BACKDROP_BLUR = 2.0
_BACKDROP_BRIGHTNESS = 0.55


@dataclass(frozen=True)
class SourceImage:
    """A validated upload: an upright, fully loaded RGB picture and what was done to get it.

    ``original_size`` is the pixel size as stored in the file; ``size`` is the picture's size once
    upright (width and height swap for a rotated phone photo). ``image`` has exactly ``size`` unless
    :func:`load_image` was given a ``target`` and decoded a large JPEG at 1/2, 1/4 or 1/8 scale
    (``scale`` then says by how much, and ``conversions`` notes it).
    """

    image: Image.Image
    format: str
    original_size: tuple[int, int]
    size: tuple[int, int]
    orientation_fixed: bool = False
    conversions: list[str] = field(default_factory=list)
    bytes: int = 0

    @property
    def scale(self) -> float:
        """Pixels of ``image`` per pixel of the picture: 1.0 unless decoded at reduced scale."""
        return self.image.width / self.size[0]


@dataclass(frozen=True)
class FitReport:
    """How :func:`fit` turned a picture into a frame of the target aspect and size.

    ``crop_box`` is ``(left, top, right, bottom)`` in source pixels (crop mode; the whole picture when
    nothing needed cutting). ``pad`` is ``(left, top, right, bottom)`` in output pixels filled with the
    blurred backdrop (pad mode). ``scale`` is output pixels per source pixel; above 1 means upscaled.
    """

    aspect: Aspect
    mode: FitMode
    source_size: tuple[int, int]
    output_size: tuple[int, int]
    content_size: tuple[int, int]
    scale: float
    crop_box: tuple[int, int, int, int] | None = None
    pad: tuple[int, int, int, int] | None = None
    notes: tuple[str, ...] = ()

    @property
    def upscaled(self) -> bool:
        """Whether the picture had to be enlarged (so the frame is softer than the output size)."""
        return self.scale > 1.0

    @property
    def changed(self) -> bool:
        """Whether the output differs from the input at all."""
        return self.source_size != self.output_size or self.crop_box not in (None, self._full_box)

    @property
    def _full_box(self) -> tuple[int, int, int, int]:
        return (0, 0, *self.source_size)

    def to_json(self) -> dict[str, Any]:
        """Plain data for ``animabot inspect --json`` and job records."""
        return {
            "aspect": self.aspect.value,
            "mode": self.mode,
            "width": self.output_size[0],
            "height": self.output_size[1],
            "crop_box": list(self.crop_box) if self.crop_box else None,
            "pad": list(self.pad) if self.pad else None,
            "scale": round(self.scale, 4),
            "upscaled": self.upscaled,
            "notes": list(self.notes),
        }


# --------------------------------------------------------------------------------------------------
# Loading and validation


def load_image(
    source: bytes | Path, settings: Settings, *, target: tuple[int, int] | None = None
) -> SourceImage:
    """Decode an upload into an upright RGB picture, or raise :class:`ImageRejected` saying why not.

    ``source`` is the uploaded bytes or a path to them. ``target`` is the ``(width, height)`` the
    picture will be fitted to: when given, a JPEG at least twice as large in both directions is decoded
    at reduced scale (libjpeg's cheap DCT scaling), never below what a crop to ``target`` needs.

    Converted to RGB: CMYK (through its ICC profile when it has one), 16- and 32-bit (scaled to 8-bit,
    not clipped), palette, grayscale and 1-bit; transparency is flattened on white. Animated GIF/WebP/PNG
    and multi-page TIFF give their first frame. Each conversion is noted in ``conversions``.
    """
    nbytes = source.stat().st_size if isinstance(source, Path) else len(source)
    # catch_warnings keeps DecompressionBombWarning (a limit we enforce ourselves) out of logs and
    # away from `-W error` runs; it is not thread-safe, but only ever silences that one warning.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im, fmt, before, upright = _header(source, settings)
        opened = im.size

        notes: list[str] = []
        if fmt != "MPO" and getattr(im, "is_animated", False):  # MPO's extra frames are previews
            notes.append(_first_frame_note(im, fmt))
        if target is not None and fmt in ("JPEG", "MPO"):
            _draft(im, upright, target, before or 1, notes)
        if _is_16_bit_source(im):
            notes.append("16-bit → 8-bit")
        try:
            im.load()
        except Exception as exc:  # decoders of untrusted bytes raise anything; it is always the file
            raise _corrupt(fmt) from exc
        after = _orientation(im) or 1  # safe now for PNG too

    rgb = _to_rgb(im, notes)
    if fmt in _TURNED_BY_PILLOW and (before or 1) != 1 and after == 1:
        applied, size, stored = before or 1, opened, _turn(opened, before or 1)  # the decoder did it
    else:
        applied, size, stored = after, _turn(opened, after), opened
        if applied in _ORIENTATION:
            rgb = rgb.transpose(_ORIENTATION[applied])
    if rgb is not im:
        rgb.info.clear()  # the orientation tag must not be applied a second time downstream
    return SourceImage(
        image=rgb,
        format=fmt,
        original_size=stored,
        size=size,
        orientation_fixed=applied != 1,
        conversions=notes,
        bytes=nbytes,
    )


def check_upload(data: bytes, settings: Settings) -> tuple[str, tuple[int, int]]:
    """The format and upright size of an upload, from its header alone, or :class:`ImageRejected`.

    The quick check a front end's submit runs (well under a millisecond, no pixels decoded): byte
    size, file type, pixel count, short side and aspect ratio. The worker's :func:`load_image` decodes
    the pixels later and may still refuse a file whose body is corrupt.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        _, fmt, _, upright = _header(data, settings)
    return fmt, upright


def _header(
    source: bytes | Path, settings: Settings
) -> tuple[ImageFile.ImageFile, str, int | None, tuple[int, int]]:
    """Open the upload's header and check what it alone can tell.

    Returns the opened image (no pixels decoded yet), its format, its EXIF orientation and its upright
    size. Call with DecompressionBombWarning silenced.
    """
    data, _ = _read(source, settings)
    kind = _sniff(data)
    if kind is not None and kind.before_decoding:
        raise ImageRejected(kind.message, code=kind.code)
    # Pillow's own bomb guard runs inside open(); ours runs right after with the configured limit.
    im = _open(data, kind, settings)
    fmt = im.format or "image"
    # Orientation never changes the pixel count, short side or ratio; it only names them upright.
    before = _orientation(im)
    upright = im.size if fmt in _TURNED_BY_PILLOW else _turn(im.size, before or 1)
    _check_geometry(upright, settings)
    return im, fmt, before, upright


def _read(source: bytes | Path, settings: Settings) -> tuple[bytes, int]:
    """The bytes of the upload, refusing empty or oversized ones before reading them all."""
    if isinstance(source, Path):
        nbytes = source.stat().st_size
        _check_bytes(nbytes, settings)
        data = source.read_bytes()
    elif isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
    else:
        raise TypeError(f"source must be bytes or a Path, not {type(source).__name__}")
    _check_bytes(len(data), settings)
    return data, len(data)


def _check_bytes(nbytes: int, settings: Settings) -> None:
    if nbytes == 0:
        raise ImageRejected(f"the file is empty (0 bytes); {_WORKS}", code="empty_file")
    if nbytes > settings.max_upload_bytes:
        raise ImageRejected(
            "the file is {} and the limit is {}; send a smaller export "
            "(a JPEG at quality 90 is usually a few MiB)".format(*_mib(nbytes, settings.max_upload_bytes)),
            code="file_too_large",
        )


def _mib(size: int, limit: int) -> tuple[str, str]:
    """Both byte counts in MiB, with just enough decimals to tell them apart ("20.3 MiB", "20 MiB")."""
    for places in range(1, 7):
        a, b = (f"{n / MiB:.{places}f}".rstrip("0").rstrip(".") for n in (size, limit))
        if a != b and a != "0" and b != "0":
            break
    return f"{a} MiB", f"{b} MiB"


def _open(data: bytes, kind: _Kind | None, settings: Settings) -> ImageFile.ImageFile:
    """Parse the header only (no pixels decoded), mapping every failure to a refusal."""
    try:
        return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        # Only past 2 × Image.MAX_IMAGE_PIXELS; the message carries the pixel count, not the size.
        found = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = int(found.group(1)) if found else 0
        raise _too_many_pixels(None, pixels, settings) from None
    except Exception as exc:  # UnidentifiedImageError, or a plugin choking on a mangled header
        raise _unreadable(data, kind) from exc


def _unreadable(data: bytes, kind: _Kind | None) -> ImageRejected:
    """The refusal for bytes no allowed plugin could open."""
    if kind is not None:
        return ImageRejected(kind.message, code=kind.code)
    # A format Pillow knows but we do not decode (PSD, XBM, EPS…): name it. Header parse only.
    try:
        other = Image.open(io.BytesIO(data)).format
    except Exception:
        other = None
    if other:
        return ImageRejected(
            f"{other} images are not supported; export it as PNG or JPEG", code="unsupported_format"
        )
    if _looks_like_text(data):
        return ImageRejected(f"this is a text file, not a picture; {_WORKS}", code="not_an_image")
    return ImageRejected(
        "this file is not a picture that can be read; send a PNG, JPEG, WebP, GIF, BMP or TIFF image",
        code="not_an_image",
    )


def _corrupt(fmt: str) -> ImageRejected:
    return ImageRejected(
        f"the file is truncated or corrupt ({fmt}); re-export it or send the original again",
        code="corrupt_image",
    )


def _orientation(im: Image.Image) -> int | None:
    """The EXIF orientation (1..8); 1 when absent or unreadable, None when only decoding can tell.

    PNG may store its eXIf chunk after the pixels, and Pillow's ``getexif`` then decodes the whole
    picture to find it: never before the size checks.
    """
    if im.format == "PNG" and "exif" not in im.info and im.tile:
        return None
    try:
        value = im.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # a mangled EXIF block must not cost the picture
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _turn(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """``size`` once the EXIF ``orientation`` is applied (5..8 swap width and height)."""
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else size


def _check_geometry(size: tuple[int, int], settings: Settings) -> None:
    """Pixel count, short side and aspect ratio, from the header alone."""
    w, h = size
    if w * h > settings.max_image_pixels:
        raise _too_many_pixels(size, w * h, settings)
    short, long = min(w, h), max(w, h)
    if short < settings.min_image_side:
        raise ImageRejected(
            f"the picture is {w}×{h}; its short side must be at least {settings.min_image_side} px, "
            f"so send a larger original",
            code="too_small",
        )
    ratio = long / short
    if ratio > settings.max_aspect_ratio:
        shape, closer = ("wide", "16:9, 4:3 or 1:1") if w > h else ("tall", "9:16, 3:4 or 1:1")
        raise ImageRejected(
            f"the picture is {w}×{h}, {ratio:.2f}:1, too {shape}; at most {settings.max_aspect_ratio:g}:1 "
            f"is accepted, so crop it closer to {closer}",
            code="extreme_aspect",
        )


def _too_many_pixels(size: tuple[int, int] | None, pixels: int, settings: Settings) -> ImageRejected:
    limit = settings.max_image_pixels
    what = (
        f"{size[0]}×{size[1]} ({pixels / 1e6:.1f} megapixels)" if size else f"{pixels / 1e6:.1f} megapixels"
    )
    advice = "downscale it"
    if size:
        k = math.sqrt(limit / pixels)
        advice = f"downscale it to {max(1, int(size[0] * k))}×{max(1, int(size[1] * k))} or smaller"
    return ImageRejected(
        f"the picture is {what} and the limit is {limit / 1e6:g} megapixels; {advice}",
        code="too_many_pixels",
    )


def _first_frame_note(im: Image.Image, fmt: str) -> str:
    """The note for a multi-frame file: first frame of 12-frame GIF, first page of 3-page TIFF."""
    unit = "page" if fmt == "TIFF" else "frame"
    try:
        return f"first {unit} of {int(getattr(im, 'n_frames', 2))}-{unit} {fmt}"
    except Exception:  # a damaged later frame does not spoil the first one
        return f"first {unit} of a multi-{unit} {fmt}"


def _draft(
    im: Image.Image,
    upright: tuple[int, int],
    target: tuple[int, int],
    orientation: int,
    notes: list[str],
) -> None:
    """Ask libjpeg for the smallest 1/2, 1/4, 1/8 scale that still covers a crop to ``target``.

    A crop of aspect ``tw:th`` inside ``W×H`` is at least ``tw`` wide when the scale is at most
    ``min(W/tw, H/th)``, which is exactly what ``draft`` guarantees for a requested size of
    ``(tw, th)``; padding needs less. The request is turned like the stored pixels.
    """
    tw, th = target
    if tw <= 0 or th <= 0 or upright[0] < 2 * tw or upright[1] < 2 * th:
        return
    request = _turn((tw, th), orientation)
    before = im.size
    im.draft(None, request)
    if im.size != before:
        factor = round(before[0] / im.size[0])
        notes.append(f"decoded at 1/{factor} scale for a {tw}×{th} target")


def _is_16_bit_source(im: Image.Image) -> bool:
    """Whether the decoder will narrow 16-bit samples into an 8-bit mode (e.g. PNG ``RGB;16B``)."""
    if im.mode.startswith("I;16"):
        return False  # scaled (and noted) by _to_rgb
    for tile in getattr(im, "tile", ()):
        args = tile.args
        rawmode = args if isinstance(args, str) else (args[0] if args else "")
        if isinstance(rawmode, str) and ";16" in rawmode:
            return im.mode in ("RGB", "RGBA", "L", "LA", "CMYK")
    return False


# --------------------------------------------------------------------------------------------------
# Colour conversion


def _to_rgb(im: Image.Image, notes: list[str]) -> Image.Image:
    """The picture as 8-bit RGB; returns ``im`` itself when it already is."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _deep_to_rgb(im, notes)
    if mode == "1":
        notes.append("1-bit → RGB")
        return im.convert("RGB")
    if mode == "L":
        notes.append("grayscale → RGB")
        return im.convert("RGB")
    if mode == "P":
        notes.append("palette → RGB")
        if "transparency" in im.info or (im.palette is not None and im.palette.mode == "RGBA"):
            return _flatten(im.convert("RGBA"), notes)
        return im.convert("RGB")
    if mode in ("LA", "La", "PA"):
        notes.append("grayscale → RGB" if mode != "PA" else "palette → RGB")
        return _flatten(im.convert("RGBA"), notes)
    if mode in ("RGBA", "RGBa"):
        return _flatten(im if mode == "RGBA" else im.convert("RGBA"), notes)
    if mode == "CMYK":
        return _cmyk_to_rgb(im, notes)
    try:
        rgb = im.convert("RGB")
    except ValueError:
        raise ImageRejected(
            f"the picture uses the {mode} colour mode, which cannot be converted; "
            f"export it as an RGB PNG or JPEG",
            code="unsupported_format",
        ) from None
    notes.append(f"{mode} → RGB")
    return rgb


def _deep_to_rgb(im: Image.Image, notes: list[str]) -> Image.Image:
    """Scale 16-bit, 32-bit integer or float samples to 0..255 (Pillow's own convert would clip)."""
    arr = np.asarray(im)
    if im.mode.startswith("I;16") or (im.mode == "I" and arr.min() >= 0 and arr.max() <= 65535):
        notes.append("16-bit → 8-bit")
        out = (arr.astype(np.uint32) + 128) // 257
    elif im.mode == "F" and arr.min() >= 0.0 and arr.max() <= 1.0:
        notes.append("32-bit float → 8-bit")
        out = np.rint(arr * 255.0)
    else:
        lo, hi = float(arr.min()), float(arr.max())
        notes.append(f"{'32-bit' if im.mode == 'I' else '32-bit float'} → 8-bit (stretched {lo:g}..{hi:g})")
        span = hi - lo or 1.0
        out = np.rint((arr.astype(np.float64) - lo) * (255.0 / span))
    gray = Image.fromarray(out.astype(np.uint8))  # 2-D uint8: mode L
    return gray.convert("RGB")


def _flatten(rgba: Image.Image, notes: list[str]) -> Image.Image:
    """Composite on white; a fully opaque alpha channel is simply dropped."""
    alpha = rgba.getchannel("A")
    if alpha.getextrema() == (255, 255):
        notes.append("opaque alpha channel dropped")
        return rgba.convert("RGB")
    notes.append("alpha flattened on white")
    out = Image.new("RGB", rgba.size, (255, 255, 255))
    out.paste(rgba, (0, 0), alpha)
    return out


def _cmyk_to_rgb(im: Image.Image, notes: list[str]) -> Image.Image:
    """CMYK through the embedded ICC profile when there is one; Pillow's naive formula otherwise."""
    icc = im.info.get("icc_profile")
    if icc:
        try:
            profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            srgb = ImageCms.createProfile("sRGB")
            out = ImageCms.profileToProfile(im, profile, srgb, outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass
        else:
            if out is not None:
                notes.append("CMYK → RGB (ICC profile)")
                return out
    notes.append("CMYK → RGB")
    return im.convert("RGB")


# --------------------------------------------------------------------------------------------------
# Recognising what is not a picture


@dataclass(frozen=True)
class _Kind:
    """What some bytes look like, and how to refuse them."""

    code: str
    message: str
    before_decoding: bool  # refuse without even asking Pillow (no picture format starts like this)


_VECTOR = "vector images are not supported; export it as PNG or JPEG"  # after "this is X, and "


def _kind(code: str, message: str, *, before: bool = True) -> _Kind:
    return _Kind(code, message, before)


def _sniff(data: bytes) -> _Kind | None:
    """Recognise common non-pictures (and damaged pictures) from their first bytes."""
    head = data[:64]
    if head.startswith(b"%PDF-"):
        return _kind(
            "vector_image",
            "this is a PDF document, and documents and vector images are not supported; "
            "export the page as PNG or JPEG",
        )
    if head.startswith((b"%!PS", b"\xc5\xd0\xd3\xc6")):
        return _kind("vector_image", f"this is a PostScript/EPS file, and {_VECTOR}")
    if head.startswith(b"\xd7\xcd\xc6\x9a") or (head[:4] == b"\x01\x00\x00\x00" and head[40:44] == b" EMF"):
        return _kind("vector_image", f"this is a Windows metafile (WMF/EMF), and {_VECTOR}")
    markup = _markup(data)
    if markup is not None:
        return markup
    if head.startswith(b"PK\x03\x04"):
        window = data[:4096]
        if b"[Content_Types].xml" in window or b"word/" in window or b"xl/" in window or b"ppt/" in window:
            what = "an Office document"
        elif b"mimetypeapplication/vnd.oasis" in window:
            what = "an OpenDocument file"
        else:
            what = "a ZIP archive"
        return _kind(
            "not_an_image", f"this is {what}, not a picture; open it and export the image as PNG or JPEG"
        )
    if head.startswith(b"\xd0\xcf\x11\xe0"):
        return _kind(
            "not_an_image", "this is an Office document, not a picture; export the image as PNG or JPEG"
        )
    if head.startswith((b"Rar!", b"7z\xbc\xaf", b"\x1f\x8b")):
        return _kind(
            "not_an_image", "this is a compressed archive, not a picture; extract the image and send that"
        )
    if head[4:8] == b"ftyp":
        return _ftyp(head[8:12])
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        what = "WebM" if b"webm" in data[:64] else "Matroska"
        return _video(what)
    if head.startswith(b"RIFF") and head[8:12] in (b"AVI ", b"WAVE"):
        return _video("AVI") if head[8:12] == b"AVI " else _audio("WAV")
    if head.startswith((b"ID3", b"OggS", b"fLaC")) or head[:2] in (b"\xff\xfb", b"\xff\xf3"):
        return _audio("audio")
    if head.startswith((b"MZ", b"\x7fELF")):
        return _kind("not_an_image", f"this is a program, not a picture; {_WORKS}")
    # Damaged pictures: only used once Pillow has failed to open them.
    fmt = _picture_magic(head)
    if fmt is not None:
        return _kind("corrupt_image", _corrupt(fmt).message, before=False)
    return None


def _picture_magic(head: bytes) -> str | None:
    """The format a picture's signature claims, to call a file that fails to open "corrupt"."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WEBP"
    if head.startswith(b"BM") and head[6:10] == b"\0\0\0\0":
        return "BMP"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF"
    return None


_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}


def _ftyp(brand: bytes) -> _Kind:
    """ISO media files: HEIC/AVIF stills (tried with Pillow first) or MP4/MOV/3GP video."""
    if brand in _HEIF_BRANDS:
        return _kind(
            "unsupported_format",
            "HEIC/HEIF photos cannot be read here; export it as JPEG "
            "(on an iPhone: Settings → Camera → Formats → Most Compatible)",
            before=False,
        )
    if brand in (b"avif", b"avis"):
        return _kind(
            "unsupported_format",
            "this AVIF picture cannot be decoded; export it as PNG or JPEG",
            before=False,
        )
    what = {b"qt  ": "QuickTime MOV", b"3gp4": "3GP", b"3gp5": "3GP", b"3g2a": "3GP"}.get(brand, "MP4")
    return _video(what)


def _video(what: str) -> _Kind:
    return _kind(
        "not_an_image", f"this is a video ({what}), not a still picture; send one frame as PNG or JPEG"
    )


def _audio(what: str) -> _Kind:
    return _kind("not_an_image", f"this is an audio file ({what}), not a picture; {_WORKS}")


def _markup(data: bytes) -> _Kind | None:
    """SVG, HTML and other XML, recognised from the first kilobyte of text."""
    text = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if not text.startswith(b"<"):
        return None
    if text.startswith(b"<svg") or b"<svg" in text:
        return _kind("vector_image", f"this is an SVG drawing, and {_VECTOR}")
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in text:
        return _kind(
            "not_an_image",
            "this is a web page (HTML), not a picture; save the image itself (right-click → Save image as) "
            "and send that",
        )
    if text.startswith(b"<?xml"):
        return _kind("not_an_image", f"this is an XML document, not a picture; {_WORKS}")
    return None


def _looks_like_text(data: bytes) -> bool:
    """UTF-8 (or ASCII) with no control characters other than whitespace, judged on the first 4 KiB."""
    sample = data[:4096]
    try:
        text = sample.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(sample) - 3:  # only a multibyte character cut at the end is forgiven
            return False
        text = sample[: exc.start].decode("utf-8")
    return bool(text) and all(ch.isprintable() or ch in "\t\n\r\f\v" for ch in text)


# --------------------------------------------------------------------------------------------------
# Aspect and fitting


def resolve_aspect(width: int, height: int, allowed: Iterable[Aspect] | None = None) -> Aspect:
    """The allowed aspect closest to ``width:height`` ("auto"), compared as log ratios.

    Log ratios make 2:1 exactly as far from 1:1 as 1:2 is. Ties go to the earlier member of
    :class:`Aspect` (16:9 before 9:16 before 1:1 …), so the answer never depends on set order.

        >>> resolve_aspect(4032, 3024)
        <Aspect.CLASSIC: '4:3'>
        >>> resolve_aspect(1000, 1000, {Aspect.LANDSCAPE, Aspect.PORTRAIT})
        <Aspect.LANDSCAPE: '16:9'>
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, got {width}×{height}")
    candidates = list(Aspect) if allowed is None else list(dict.fromkeys(allowed))
    if not candidates:
        raise ValueError("allowed must name at least one aspect")
    order = list(Aspect)
    want = math.log(width / height)
    return min(candidates, key=lambda a: (round(abs(math.log(a.ratio) - want), 9), order.index(a)))


def plan_fit(
    size: tuple[int, int],
    aspect: Aspect,
    *,
    width: int,
    height: int,
    mode: FitMode,
    focus: tuple[float, float] | None = None,
) -> FitReport:
    """What :func:`fit` would do to a picture of ``size``, without touching pixels.

    The geometry follows ``width:height`` exactly (so nothing is stretched); ``aspect`` must agree with
    it to within 2 %. ``focus`` is a point in source pixels that a crop keeps as central as it can.
    """
    src_w, src_h = size
    if src_w <= 0 or src_h <= 0 or width <= 0 or height <= 0:
        raise ValueError(f"sizes must be positive, got source {src_w}×{src_h} and target {width}×{height}")
    if mode not in ("crop", "pad"):
        raise ValueError(f"mode must be 'crop' or 'pad', got {mode!r}")
    ratio = width / height
    if abs(math.log(ratio / aspect.ratio)) > 0.02:
        raise ValueError(f"{width}×{height} is not {aspect.value}")

    notes: list[str] = []
    if mode == "crop":
        box = _crop_box((src_w, src_h), ratio, focus)
        cw, ch = box[2] - box[0], box[3] - box[1]
        if (cw, ch) != (src_w, src_h):
            where = "centre" if focus is None else f"around focus {focus[0]:.0f},{focus[1]:.0f}"
            notes.append(f"cropped {src_w}×{src_h} → {cw}×{ch} ({where})")
        notes.extend(_resize_note((cw, ch), (width, height)))
        return FitReport(
            aspect=aspect,
            mode=mode,
            source_size=(src_w, src_h),
            output_size=(width, height),
            content_size=(width, height),
            scale=width / cw,
            crop_box=box,
            notes=tuple(notes),
        )

    k = min(width / src_w, height / src_h)
    cw = min(width, max(1, round(src_w * k)))
    ch = min(height, max(1, round(src_h * k)))
    pad_l, pad_t = (width - cw) // 2, (height - ch) // 2
    pad = (pad_l, pad_t, width - cw - pad_l, height - ch - pad_t)
    notes.extend(_resize_note((src_w, src_h), (cw, ch)))
    if any(pad):
        sides = f"{pad[0]}+{pad[2]} px left/right" if pad[0] or pad[2] else f"{pad[1]}+{pad[3]} px top/bottom"
        notes.append(f"padded to {width}×{height} ({aspect.value}) with a blurred backdrop, {sides}")
    return FitReport(
        aspect=aspect,
        mode=mode,
        source_size=(src_w, src_h),
        output_size=(width, height),
        content_size=(cw, ch),
        scale=k,
        pad=pad,
        notes=tuple(notes),
    )


def _crop_box(
    size: tuple[int, int], ratio: float, focus: tuple[float, float] | None
) -> tuple[int, int, int, int]:
    """The largest ``ratio`` window inside ``size``, centred on ``focus`` (or the middle), kept inside."""
    src_w, src_h = size
    if src_w / src_h > ratio:
        cw, ch = min(src_w, max(1, round(src_h * ratio))), src_h
    else:
        cw, ch = src_w, min(src_h, max(1, round(src_w / ratio)))
    fx, fy = focus if focus is not None else (src_w / 2, src_h / 2)
    left = _clamp(round(fx - cw / 2), 0, src_w - cw)
    top = _clamp(round(fy - ch / 2), 0, src_h - ch)
    return left, top, left + cw, top + ch


def _resize_note(src: tuple[int, int], dst: tuple[int, int]) -> list[str]:
    if src == dst:
        return []
    verb = "upscaled" if dst[0] > src[0] or dst[1] > src[1] else "downscaled"
    return [f"{verb} {src[0]}×{src[1]} → {dst[0]}×{dst[1]} (Lanczos)"]


def _clamp(value: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, value))


def fit(
    image: Image.Image,
    aspect: Aspect,
    *,
    width: int,
    height: int,
    mode: FitMode,
    focus: tuple[float, float] | None = None,
) -> tuple[Image.Image, FitReport]:
    """Fit an RGB picture to ``aspect`` and resize it to exactly ``width × height``.

    ``crop`` cuts the largest window of the target aspect, centred (or centred on ``focus``, a point in
    ``image`` pixels, as far as the edges allow). ``pad`` keeps the whole picture and fills the rest with
    a blurred, darkened, enlarged copy of it. Resizing is Lanczos both ways; large reductions go through
    Pillow's ``reducing_gap`` first (much faster, no visible loss). Returns ``image`` itself when it
    already has the target size and nothing is cropped.
    """
    report = plan_fit(image.size, aspect, width=width, height=height, mode=mode, focus=focus)
    if not report.changed:
        return image, report
    size = (width, height)
    if report.crop_box is not None:
        box = report.crop_box
        if (box[2] - box[0], box[3] - box[1]) == size:
            return image.crop(box), report
        return image.resize(size, Image.Resampling.LANCZOS, box=box, reducing_gap=3.0), report

    assert report.pad is not None
    content = image
    if report.content_size != image.size:
        content = image.resize(report.content_size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    if not any(report.pad):
        return content, report
    canvas = _backdrop(image, size)
    canvas.paste(content, (report.pad[0], report.pad[1]))
    return canvas, report


def _backdrop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The picture cropped to cover ``size``, blurred and darkened: the "blurred letterbox".

    Blurring a 1/16-scale copy and stretching it back looks the same as a wide blur at full size and
    costs a few milliseconds.
    """
    width, height = size
    cover = _crop_box(image.size, width / height, None)
    small = (max(1, width // _BACKDROP_SHRINK), max(1, height // _BACKDROP_SHRINK))
    tiny = image.resize(small, Image.Resampling.BILINEAR, box=cover, reducing_gap=2.0)
    tiny = tiny.filter(ImageFilter.GaussianBlur(_BACKDROP_BLUR))
    lut = [round(v * _BACKDROP_BRIGHTNESS) for v in range(256)] * len(tiny.getbands())
    return tiny.point(lut).resize(size, Image.Resampling.BICUBIC)


# --------------------------------------------------------------------------------------------------
# Reporting


def describe(
    source: SourceImage,
    settings: Settings | None = None,
    *,
    aspect: Aspect | Literal["auto"] = "auto",
    long_side: int | None = None,
    mode: FitMode | None = None,
    allowed: Iterable[Aspect] | None = None,
    focus: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """What validation concluded and what fitting would do, as JSON-able data.

    ``long_side`` and ``mode`` default to ``settings.output_long_side`` and ``settings.fit_mode``
    (one of the two must be given). ``focus`` is in picture pixels (``source.size``).
    ``animabot inspect IMAGE --json`` prints this; a refusal prints ``{"ok": false, "error":
    err.to_json()}`` instead. The shape::

        {
          "ok": true,
          "format": "JPEG", "bytes": 2481733,
          "width": 3024, "height": 4032,          # upright
          "stored_width": 4032, "stored_height": 3024,
          "megapixels": 12.19,
          "orientation_fixed": true,
          "conversions": ["CMYK → RGB"],
          "target": {                             # FitReport.to_json() plus "auto"
            "aspect": "3:4", "auto": true, "mode": "crop", "width": 960, "height": 1280,
            "crop_box": [0, 0, 3024, 4032], "pad": null,
            "scale": 0.3175, "upscaled": false, "notes": ["downscaled 3024×4032 → 960×1280 (Lanczos)"]
          }
        }
    """
    if long_side is None or mode is None:
        if settings is None:
            raise TypeError("describe() needs settings, or both long_side and mode")
        long_side = settings.output_long_side if long_side is None else long_side
        mode = settings.fit_mode if mode is None else mode
    w, h = source.size
    chosen = resolve_aspect(w, h, allowed) if aspect == "auto" else Aspect(aspect)
    tw, th = chosen.size(long_side)
    report = plan_fit(source.size, chosen, width=tw, height=th, mode=mode, focus=focus)
    return {
        "ok": True,
        "format": source.format,
        "bytes": source.bytes,
        "width": w,
        "height": h,
        "stored_width": source.original_size[0],
        "stored_height": source.original_size[1],
        "megapixels": round(w * h / 1e6, 2),
        "orientation_fixed": source.orientation_fixed,
        "conversions": list(source.conversions),
        "target": {"auto": aspect == "auto", **report.to_json()},
    }
