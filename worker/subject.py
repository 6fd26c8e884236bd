"""Tells what a picture shows, so the route stage can pick a backend that animates it well.

    subject = classify(image)          # PIL image or numpy array, RGB
    subject.kind                       # "portrait" | "landscape" | "product" | "text" | "other"
    subject.confidence                 # 0..1, how clear the decision was
    subject.faces                      # face boxes in the coordinates of the image passed in
    subject.evidence                   # the measurements below, rounded (what `animabot inspect` prints)

Everything runs on the CPU with what ships inside opencv-python-headless 4.x: no network, no downloaded
weights, no scikit-image at run time. The picture is resized to a working copy whose long side is
512 px (small pictures are enlarged, so every threshold below is in the same units), then measured.

Measurements (the keys of ``evidence``)
---------------------------------------
Faces: OpenCV's Haar frontal-face cascade (``alt2``) on the equalised grey copy sweeps for faces of at
least 8 % of the short side (smaller faces cannot make a portrait; skipping them keeps this fast) at a
coarse scale step, then looks again around each candidate at a fine one. A candidate is kept only if
that second look collects at least 12 raw detections (``face_votes``: faces collect 20-45, a face
struck on a coin 7) *and* the other frontal cascade (``default``) finds it too. ``face_candidates``
counts candidates, ``faces`` the kept ones; ``face_size`` is the largest kept face's side and
``face_total`` the side of a square as large as all kept faces together, both over the short side.

Text: dark-on-light and light-on-dark marks are isolated with a morphological black-hat / top-hat and
Otsu's threshold (at least 40 grey levels). A *glyph* is a mark of letter shape: 4 px tall up to 15 %
of the long side, not much wider than tall, with thin strokes (its mean distance to its own edge is at
most a tenth of its height plus 0.75 px, so filled blobs such as coins, cells or bricks fail). Glyphs
of similar height are joined sideways into *lines*; a line holds at least 6 glyphs, is at least 2.5
times as wide as tall and at most twice a glyph's height, its glyphs share a top line or a baseline
and fill half its width (rows of 3-5 look-alike blobs happen by chance in star fields and gravel).
``text_glyphs`` counts glyphs in lines, ``text_lines`` the lines, ``text_cover`` the fraction of the
picture under line boxes (photos: 0; pages, documents and captions: 0.1-0.7), ``text_polarity``
which of dark or light marks covered more.

Landscape: ``sky_top`` is the fraction of the top quarter that is smooth and sky-coloured (blue at
any brightness, or bright and nearly grey for overcast skies); ``ground_bottom`` the fraction of the
bottom quarter that is *not* (a white studio backdrop is sky-coloured top and bottom);
``texture_ratio`` the mean gradient of the bottom half over that of the top quarter (+0.5 grey levels,
so a flat sky does not divide by zero); ``vegetation`` the fraction of foliage-green pixels;
``texture`` the mean gradient overall (flat green graphics are not foliage); ``aspect`` width / height.

Product: ``border_plain`` is the fraction of the outer band (8 % of the short side) within ΔE 12 of
the band's median colour; ``centre_contrast`` is the fraction of the central window (middle half
each way) more than ΔE 20 from that colour: an object standing out from a plain background.

Scores and decision
-------------------
Each kind gets a score in 0..1 (``score_*`` in the evidence) from ramps over those measurements
(``ramp(x, a, b)`` is 0 at ``a``, 1 at ``b``, linear between); 0.5 is the threshold:

=============  ==========================================================================================
``portrait``   ramp(face_total, 0.05, 0.15): one face a tenth of the short side reaches 0.5
``text``       ramp(text_cover, 0.02, 0.10) × ramp(text_glyphs, 4, 8)
``landscape``  max(ramp(sky_top, 0.35, 0.75) × ramp(texture_ratio, 1.3, 3.0) × ramp(ground_bottom,
               0.25, 0.5), ramp(vegetation, 0.30, 0.55) × ramp(texture, 3, 6)), + 0.1 if aspect ≥ 1.3
``product``    ramp(border_plain, 0.50, 0.85) × ramp(centre_contrast, 0.25, 0.50)
=============  ==========================================================================================

The first rule that holds wins: **portrait** (a face we would disfigure is the worst failure), then
**text** (letters would melt), then the higher of **landscape** and **product**, else **other**. A crowd
of small faces in a landscape is therefore not a portrait: faces under 8 % of the short side are not
looked for, and a single face under 10 % scores below the threshold (a group whose faces together
reach it is a portrait). The confidence is the winner's score less how far the strongest rival rises
above 0.5 (at least 0.05); for ``other`` it is 1 minus the highest score, so it is never under 0.5.

Known limits: only upright frontal faces are found (profiles, tilted or upside-down faces are missed;
:func:`worker.imaging.load_image` already applies EXIF orientation); animals are not faces; a close-up
of an object on a textured table (scikit-image's ``coffee``) is ``other`` because its surroundings are
not plain; sparse handwriting crossed by ruled lines, and headline letters with strokes wider than
~14 px in the working copy, are not read as text; a mosaic of one photo repeated in rows can be.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Literal

import cv2
import numpy as np
from PIL import Image

from backends.base import Box

__all__ = ["KINDS", "Kind", "Subject", "classify"]

log = logging.getLogger(__name__)

Kind = Literal["portrait", "landscape", "product", "text", "other"]
KINDS: tuple[Kind, ...] = ("portrait", "landscape", "product", "text", "other")

WORK_SIDE = 512  # long side of the working copy, in pixels
THRESHOLD = 0.5  # a kind's score must reach this to be chosen

# Faces.
FACE_MIN_FRACTION = 0.08  # smallest face looked for, over the short side
FACE_MIN_VOTES = 12  # raw detections a face must collect
FACE_SWEEP_STEP = 1.2  # scale step of the sweep for candidates
FACE_SCALE_STEP = 1.1  # scale step around a candidate, where votes are counted
FACE_NEIGHBOURS = 5

# Text.
GLYPH_MIN_HEIGHT = 4
GLYPH_MAX_HEIGHT = 0.15  # over the picture's long side: headline size; bigger marks are shapes, not letters
TEXT_MARK_KERNEL = 15  # black-hat / top-hat size: strokes up to ~14 px wide at 512 px
TEXT_MIN_CONTRAST = 40  # grey levels a mark must stand out by, whatever Otsu says
LINE_MIN_GLYPHS = 6  # rows of 3-5 similar blobs happen by chance in star fields, coins and grass

# Colour distances (CIE ΔE76).
BORDER_SAME = 12.0
OBJECT_DIFFERENT = 20.0


@dataclass(frozen=True)
class Subject:
    """What a picture shows: the kind, how sure we are, the faces and the measurements behind it."""

    kind: Kind
    confidence: float
    faces: tuple[Box, ...] = ()
    evidence: dict[str, float | int | str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """``{"kind": ..., "confidence": ..., "faces": [{"x", "y", "width", "height"}...], "evidence": {...}}``."""
        return {
            "kind": self.kind,
            "confidence": self.confidence,
            "faces": [{"x": f.x, "y": f.y, "width": f.width, "height": f.height} for f in self.faces],
            "evidence": dict(self.evidence),
        }


def classify(image: Image.Image | np.ndarray) -> Subject:
    """Classify an RGB picture (PIL or ``H×W×3`` array; grey, alpha and float arrays are accepted).

    Face boxes come back in the coordinates of ``image``. Costs about the same whatever the picture's
    size (50-100 ms on two idle cores, the face cascade being most of it): everything is measured on a
    copy whose long side is 512 px.

    Raises:
        ValueError: the picture is empty or its array shape is not a picture.
    """
    rgb, (src_w, src_h) = _working_copy(image)
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    scale = (rgb.shape[1] / src_w, rgb.shape[0] / src_h)  # x and y differ by rounding only

    face_rects, face_ev = _faces(gray)
    ev: dict[str, float | int | str] = {"source": f"{src_w}x{src_h}", "work": f"{rgb.shape[1]}x{rgb.shape[0]}"}
    ev |= face_ev
    ev |= _text(gray)
    ev |= _scene(rgb, gray)
    ev |= _object(rgb)

    scores = {
        "portrait": _ramp(float(ev["face_total"]), 0.05, 0.15),
        "text": _ramp(float(ev["text_cover"]), 0.02, 0.10) * _ramp(float(ev["text_glyphs"]), 4, 8),
        "landscape": _landscape_score(ev),
        "product": _ramp(float(ev["border_plain"]), 0.50, 0.85) * _ramp(float(ev["centre_contrast"]), 0.25, 0.50),
    }
    kind, confidence = _decide(scores)
    for name, value in scores.items():
        ev[f"score_{name}"] = value

    faces = tuple(_to_source(r, scale, src_w, src_h) for r in face_rects)
    return Subject(kind=kind, confidence=round(confidence, 3), faces=faces, evidence=_rounded(ev))


# -- decision ------------------------------------------------------------------------------------


def _ramp(x: float, lo: float, hi: float) -> float:
    """0 at ``lo``, 1 at ``hi``, linear between."""
    return min(1.0, max(0.0, (x - lo) / (hi - lo)))


def _landscape_score(ev: dict[str, float | int | str]) -> float:
    sky = (
        _ramp(float(ev["sky_top"]), 0.35, 0.75)
        * _ramp(float(ev["texture_ratio"]), 1.3, 3.0)
        * _ramp(float(ev["ground_bottom"]), 0.25, 0.5)
    )
    greenery = _ramp(float(ev["vegetation"]), 0.30, 0.55) * _ramp(float(ev["texture"]), 3.0, 6.0)
    base = max(sky, greenery)
    return min(1.0, base + 0.1) if base > 0 and float(ev["aspect"]) >= 1.3 else base


def _decide(scores: dict[str, float]) -> tuple[Kind, float]:
    """Ordered rules: portrait, then text, then the better of landscape and product, else other."""
    winner: Kind | None = None
    if scores["portrait"] >= THRESHOLD:
        winner = "portrait"
    elif scores["text"] >= THRESHOLD:
        winner = "text"
    else:
        best = max(("landscape", "product"), key=lambda k: scores[k])
        if scores[best] >= THRESHOLD:
            winner = "landscape" if best == "landscape" else "product"
    if winner is None:
        return "other", 1.0 - max(scores.values())
    rival = max((v for k, v in scores.items() if k != winner), default=0.0)
    return winner, max(0.05, scores[winner] - max(0.0, rival - THRESHOLD))


def _rounded(ev: dict[str, float | int | str]) -> dict[str, float | int | str]:
    out: dict[str, float | int | str] = {}
    for key, value in ev.items():
        if isinstance(value, int | np.integer | np.bool_):
            out[key] = int(value)
        elif isinstance(value, float | np.floating):
            out[key] = round(float(value), 3)
        else:
            out[key] = str(value)
    return out


# -- the working copy ----------------------------------------------------------------------------


def _working_copy(image: Image.Image | np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """An 8-bit RGB array with a long side of ``WORK_SIDE``, and the source ``(width, height)``."""
    if isinstance(image, Image.Image):
        src_w, src_h = image.size
        if src_w < 1 or src_h < 1:
            raise ValueError(f"empty picture ({src_w}x{src_h})")
        im = image
        if im.mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        elif im.mode not in ("RGB", "RGBA", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"):
            im = im.convert("RGBA" if "A" in im.mode else "RGB")
        w, h = _work_size(src_w, src_h)
        if max(src_w, src_h) > 2 * WORK_SIDE and im.mode in ("RGB", "RGBA", "L", "LA"):
            # Pillow's reducing resize is ~4x cheaper than copying 12 MP into numpy first.
            im = im.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=2.0)
        return _from_array(np.asarray(im)), (src_w, src_h)
    arr = np.asarray(image)
    if arr.ndim not in (2, 3) or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"not a picture: array of shape {arr.shape}")
    return _from_array(arr), (arr.shape[1], arr.shape[0])


def _work_size(width: int, height: int) -> tuple[int, int]:
    s = WORK_SIDE / max(width, height)
    return max(1, round(width * s)), max(1, round(height * s))


def _from_array(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 3 and arr.shape[2] not in (2, 3, 4):
        raise ValueError(f"not a picture: {arr.shape[2]} channels")
    arr = _to_uint8(arr)
    h, w = arr.shape[:2]
    tw, th = _work_size(w, h)
    if (tw, th) != (w, h):
        if w > 2 * tw:
            # Subsample to twice the target, then average: 1-2 ms for 12 MP instead of 35 ms.
            arr = cv2.resize(arr, (2 * tw, 2 * th), interpolation=cv2.INTER_NEAREST)
        shrinking = tw < arr.shape[1]
        arr = cv2.resize(arr, (tw, th), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
        if arr.ndim == 3 and arr.shape[2] == 1:  # cv2 drops a singleton channel axis only sometimes
            arr = arr[:, :, 0]
    if arr.ndim == 2:
        return np.ascontiguousarray(np.repeat(arr[:, :, None], 3, axis=2))
    if arr.shape[2] in (2, 4):  # grey+alpha or RGBA: composite over white, as a viewer shows it
        colour = arr[:, :, :-1] if arr.shape[2] == 4 else np.repeat(arr[:, :, :1], 3, axis=2)
        alpha = arr[:, :, -1:].astype(np.float32) / 255.0
        arr = (colour.astype(np.float32) * alpha + 255.0 * (1.0 - alpha) + 0.5).astype(np.uint8)
    return np.ascontiguousarray(arr)


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 2:  # 16-bit, either byte order
        return (arr // 257).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        arr = np.nan_to_num(arr.astype(np.float32))
        if arr.size and float(arr.max()) <= 1.0:  # skimage-style floats in [0, 1]
            arr = arr * 255.0
        return np.clip(arr + 0.5, 0, 255).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        top = int(arr.max()) if arr.size else 0
        if top > 255:  # 16-bit data in a wider integer (Pillow's "I" mode): keep the top 8 bits
            arr = arr // 257 if top <= 65535 else arr * (255.0 / top)
        return np.clip(arr, 0, 255).astype(np.uint8)
    raise ValueError(f"not a picture: array of dtype {arr.dtype}")


def _to_source(rect: tuple[int, int, int, int], scale: tuple[float, float], src_w: int, src_h: int) -> Box:
    x, w = rect[0] / scale[0], rect[2] / scale[0]
    y, h = rect[1] / scale[1], rect[3] / scale[1]
    x, y = max(0.0, x), max(0.0, y)
    w, h = min(w, src_w - x), min(h, src_h - y)
    return Box(x=round(x, 1), y=round(y, 1), width=round(w, 1), height=round(h, 1))


# -- faces ---------------------------------------------------------------------------------------

_cascades = threading.local()  # CascadeClassifier is not safe to share between threads


def _cascade(name: str) -> Any | None:
    """The shipped Haar cascade ``haarcascade_frontalface_<name>.xml``, or None without one."""
    cache: dict[str, Any] = _cascades.__dict__.setdefault("by_name", {})
    if name not in cache:
        try:
            clf = cv2.CascadeClassifier(f"{cv2.data.haarcascades}haarcascade_frontalface_{name}.xml")
            cache[name] = None if clf.empty() else clf
        except (AttributeError, cv2.error):  # opencv 5 dropped CascadeClassifier and the XMLs
            cache[name] = None
        if cache[name] is None:
            log.warning("no Haar face cascade %r in this OpenCV (need opencv-python-headless 4.x)", name)
    return cache[name]


def _faces(gray: np.ndarray) -> tuple[list[tuple[int, int, int, int]], dict[str, float | int | str]]:
    """Confirmed face rectangles in working-copy pixels, and the face evidence."""
    ev: dict[str, float | int | str] = {
        "face_candidates": 0,
        "faces": 0,
        "face_votes": 0,
        "face_size": 0.0,
        "face_total": 0.0,
    }
    first, second = _cascade("alt2"), _cascade("default")
    if first is None or second is None:
        ev["face_detector"] = "unavailable"
        return [], ev
    short = min(gray.shape)
    side = max(20, round(FACE_MIN_FRACTION * short))
    if side > short:
        return [], ev
    eq = cv2.equalizeHist(gray)
    # A coarse sweep finds candidates; votes are then counted on a finer scale around each one only,
    # which costs a third less than sweeping the whole picture finely.
    rects, _ = first.detectMultiScale2(eq, scaleFactor=FACE_SWEEP_STEP, minNeighbors=3, minSize=(side, side))
    kept: list[tuple[int, int, int, int]] = []
    for rect in rects:
        votes, (x, y, w, h) = _votes(first, eq, tuple(int(v) for v in rect))
        ev["face_votes"] = max(int(ev["face_votes"]), votes)
        if votes >= FACE_MIN_VOTES and _second_opinion(second, eq, (x, y, w, h)):
            kept.append((x, y, w, h))
    ev["face_candidates"] = len(rects)
    ev["faces"] = len(kept)
    ev["face_size"] = max((w / short for _, _, w, _ in kept), default=0.0)
    ev["face_total"] = math.sqrt(sum(w * h for _, _, w, h in kept)) / short
    kept.sort(key=lambda r: (r[0], r[1]))
    return kept, ev


def _votes(clf: Any, eq: np.ndarray, rect: tuple[int, ...]) -> tuple[int, tuple[int, int, int, int]]:
    """Raw detections around ``rect`` at the fine scale step, and the box they agree on."""
    x, y, w, _ = rect
    m = w // 2
    x0, y0 = max(0, x - m), max(0, y - m)
    roi = eq[y0 : y + w + m, x0 : x + w + m]
    found, votes = clf.detectMultiScale2(
        roi,
        scaleFactor=FACE_SCALE_STEP,
        minNeighbors=FACE_NEIGHBOURS,
        minSize=(int(0.6 * w),) * 2,
        maxSize=(int(1.6 * w) + 1,) * 2,
    )
    if len(found) == 0:
        return 0, (x, y, w, w)
    best = int(np.argmax(votes))
    bx, by, bw, bh = (int(v) for v in found[best])
    return int(votes[best]), (x0 + bx, y0 + by, bw, bh)


def _second_opinion(clf: Any, eq: np.ndarray, rect: tuple[int, int, int, int]) -> bool:
    """Whether another cascade, run around ``rect`` only, finds a face of about the same size."""
    x, y, w, h = rect
    m = w // 3
    roi = eq[max(0, y - m) : y + h + m, max(0, x - m) : x + w + m]
    found = clf.detectMultiScale(
        roi, scaleFactor=1.1, minNeighbors=3, minSize=(int(0.7 * w),) * 2, maxSize=(int(1.4 * w) + 1,) * 2
    )
    return len(found) > 0


# -- text ----------------------------------------------------------------------------------------


def _text(gray: np.ndarray) -> dict[str, float | int | str]:
    """Glyph-shaped marks aligned in rows, for dark-on-light and light-on-dark text; the better one."""
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (TEXT_MARK_KERNEL, TEXT_MARK_KERNEL))
    best: dict[str, float | int | str] = {"text_glyphs": 0, "text_lines": 0, "text_cover": 0.0, "text_polarity": "none"}
    for polarity, op in (("dark", cv2.MORPH_BLACKHAT), ("light", cv2.MORPH_TOPHAT)):
        response = cv2.morphologyEx(gray, op, kernel)
        otsu, _ = cv2.threshold(response, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
        marks = (response >= max(otsu, TEXT_MIN_CONTRAST)).astype(np.uint8)
        glyphs, lines, cover = _text_lines(marks)
        if cover > float(best["text_cover"]):
            best = {"text_glyphs": glyphs, "text_lines": lines, "text_cover": cover, "text_polarity": polarity}
    return best


def _text_lines(marks: np.ndarray) -> tuple[int, int, float]:
    """``(glyphs in lines, lines, fraction of the picture covered by line boxes)`` for a 0/1 mark mask."""
    height, width = marks.shape
    n, labels, stats, _ = cv2.connectedComponentsWithStats(marks, connectivity=8)
    if n <= 1:
        return 0, 0, 0.0
    # Mean distance to the mark's own edge: ~stroke/4 for letters, ~diameter/6 for filled blobs.
    depth = cv2.distanceTransform(marks, cv2.DIST_L2, 3)
    area = stats[1:, cv2.CC_STAT_AREA]
    mean_depth = np.bincount(labels.ravel(), weights=depth.ravel(), minlength=n)[1:] / np.maximum(area, 1)
    w, h = stats[1:, cv2.CC_STAT_WIDTH], stats[1:, cv2.CC_STAT_HEIGHT]
    glyph = (
        (h >= GLYPH_MIN_HEIGHT)
        & (h <= GLYPH_MAX_HEIGHT * max(height, width))
        & (w <= 2.5 * h + 4)
        & (mean_depth <= 0.1 * h + 0.75)
        & (area >= 8)
        & (area >= 0.1 * w * h)
    )
    idx = np.flatnonzero(glyph)
    in_line = np.zeros(n, bool)
    cover = np.zeros((height, width), np.uint8)
    lines = 0
    # Lines are looked for among glyphs of similar height, one band of heights at a time (bands
    # overlap so that a line of mixed-case letters falls wholly in one of them).
    low = GLYPH_MIN_HEIGHT
    while low <= height:
        band = idx[(h[idx] >= low) & (h[idx] < 2.5 * low)]
        if len(band) >= 3:
            lines += _lines_in_band(labels, band, stats[1:], low, in_line, cover)
        low *= 2
    return int(in_line.sum()), lines, float(cover.mean())


def _lines_in_band(
    labels: np.ndarray, band: np.ndarray, stats: np.ndarray, low: int, in_line: np.ndarray, cover: np.ndarray
) -> int:
    """Join one band's glyphs sideways into lines; mark the glyphs and line boxes found. Returns the count."""
    height, width = labels.shape
    keep = np.zeros(len(in_line) + 1, np.uint8)
    keep[band + 1] = 1
    joined = cv2.morphologyEx(keep[labels], cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_RECT, (low + 2, 1)))
    _, line_labels, line_stats, _ = cv2.connectedComponentsWithStats(joined, connectivity=8)
    x, y, w, h = (stats[band, i] for i in (cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP, cv2.CC_STAT_WIDTH, cv2.CC_STAT_HEIGHT))
    line_of = line_labels[np.clip(y + h // 2, 0, height - 1), np.clip(x + w // 2, 0, width - 1)]
    found = 0
    for line in np.unique(line_of):
        members = line_of == line
        lx, ly, lw, lh = (int(v) for v in line_stats[line, :4])
        if line == 0 or members.sum() < LINE_MIN_GLYPHS or lw < 2.5 * lh:
            continue
        heights, tops = h[members], y[members]
        median = float(np.median(heights))
        # A line of text is about one glyph tall, its glyphs alike in height, lined up along their tops
        # or their baseline, and filling most of its width.
        aligned = min(tops.std(), (tops + heights).std()) <= 0.25 * median
        if lh > 2 * median or heights.std() > 0.35 * median or not aligned or w[members].sum() < 0.5 * lw:
            continue
        found += 1
        in_line[band[members]] = True
        cover[ly : ly + lh, lx : lx + lw] = 1
    return found


# -- scene and object ----------------------------------------------------------------------------


def _gradient(gray: np.ndarray) -> np.ndarray:
    """Per-pixel intensity step (grey levels per pixel) after a light blur."""
    g = cv2.GaussianBlur(gray, (0, 0), 1.0).astype(np.float32)
    return cv2.magnitude(cv2.Sobel(g, cv2.CV_32F, 1, 0), cv2.Sobel(g, cv2.CV_32F, 0, 1)) / 8.0


def _scene(rgb: np.ndarray, gray: np.ndarray) -> dict[str, float | int | str]:
    """Sky at the top, textured ground below, foliage, shape."""
    height, width = gray.shape
    grad = _gradient(gray)
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)  # H in 0..180
    hue = hsv[:, :, 0].astype(np.int16)
    sat = hsv[:, :, 1].astype(np.float32) / 255.0
    val = hsv[:, :, 2].astype(np.float32) / 255.0
    blue = (hue >= 90) & (hue <= 130) & (sat >= 0.15) & (val >= 0.15)
    overcast = (sat < 0.15) & (val >= 0.55)
    sky = (blue | overcast) & (grad < 4.0)
    green = (hue >= 30) & (hue <= 90) & (sat >= 0.2) & (val >= 0.12)
    top = max(1, height // 4)
    return {
        "sky_top": float(sky[:top].mean()),
        "ground_bottom": float(1.0 - sky[height - top :].mean()),
        "texture_ratio": float(grad[height // 2 :].mean() / (grad[:top].mean() + 0.5)),
        "vegetation": float(green.mean()),
        "texture": float(grad.mean()),
        "aspect": width / height,
    }


def _object(rgb: np.ndarray) -> dict[str, float | int | str]:
    """A plain border and a centre that stands out from it."""
    height, width = rgb.shape[:2]
    lab = cv2.cvtColor(rgb.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)
    band = max(1, int(0.08 * min(height, width)))
    border = np.zeros((height, width), bool)
    border[:band] = border[-band:] = True
    border[:, :band] = border[:, -band:] = True
    background = np.median(lab[border], axis=0)
    distance = np.linalg.norm(lab - background, axis=2)
    rows = slice(height // 4, max(height // 4 + 1, 3 * height // 4))
    centre = distance[rows, width // 4 : max(width // 4 + 1, 3 * width // 4)]
    return {
        "border_plain": float((distance[border] < BORDER_SAME).mean()),
        "centre_contrast": float((centre > OBJECT_DIFFERENT).mean()),
    }
