"""Video file I/O through the ffmpeg binary that imageio-ffmpeg ships.

Every stage that makes or checks a clip needs the same three things: encode frames into an MP4 Discord
plays inline, learn what a file holds, and decode it back to numpy. This module does them with the one
ffmpeg we can count on (``imageio_ffmpeg.get_ffmpeg_exe()``; there is no ffprobe)::

    with VideoWriter(path, width=1280, height=720, fps=24) as out:   # H.264 yuv420p, +faststart
        for frame in frames:                                          # RGB uint8 (H, W, 3)
            out.write(frame)

    info = probe(path)                        # VideoInfo(width=1280, height=720, fps=24.0, frames=120, ...)
    for gray in read_frames(path, size=(320, 180), gray=True):
        ...

Output files appear atomically: the writer encodes into a temporary file next to the target and renames
it only when ffmpeg succeeded, so a reader never sees half a clip. Every failure raises
:class:`VideoError` with the tail of ffmpeg's log.

Colour: clips are BT.709 limited range and tagged so (players assume BT.709 for HD anyway). RGB input
is converted by ffmpeg; callers that feed ``yuv420p`` themselves can use :func:`rgb_to_ycbcr`, which
uses the same matrix. 4:2:0 chroma is sited "left" (co-sited with even luma columns, centred between
rows), the H.264 default, and tagged explicitly.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import cv2
import imageio_ffmpeg
import numpy as np

__all__ = [
    "CHROMA_SITING",
    "VideoError",
    "VideoInfo",
    "VideoWriter",
    "encoder_args",
    "ffmpeg_exe",
    "probe",
    "read_frames",
    "rgb_to_ycbcr",
    "vbv_cap",
]

#: Where a 4:2:0 chroma sample sits, in luma pixel units from its 2×2 block's top-left corner
#: (H.264 "left" / type 0: horizontally on the even luma column's centre, vertically between the rows).
CHROMA_SITING = (0.5, 1.0)

_PIX_FMTS = {"rgb24": (3, 1), "bgr24": (3, 1), "gray": (1, 1), "yuv420p": (3, 2)}  # bytes = w*h*a/b
_COLOUR_TAGS = ("-colorspace", "bt709", "-color_primaries", "bt709", "-color_trc", "bt709")
_STDERR_TAIL = 2000
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class VideoError(RuntimeError):
    """ffmpeg could not encode or decode a file; the message ends with ffmpeg's own words."""


@dataclass(frozen=True)
class VideoInfo:
    """What a video file holds, as decoded by ffmpeg."""

    width: int
    height: int
    fps: float
    frames: int
    duration: float
    codec: str
    pix_fmt: str
    bytes: int


def ffmpeg_exe() -> str:
    """Path of the bundled ffmpeg binary."""
    return imageio_ffmpeg.get_ffmpeg_exe()


def vbv_cap(limit_bytes: int, duration: float, *, margin: float = 0.95) -> tuple[int, int]:
    """``(maxrate, bufsize)`` in bit/s and bits that guarantee a clip of ``duration`` fits ``limit_bytes``.

    VBV bounds any window of T seconds by ``maxrate·T + bufsize`` bits; with ``bufsize = maxrate`` and
    ``maxrate·(D + 1) ≤ margin·8·limit`` the whole clip fits (see reference/video.md §2.5)::

        vbv_cap(10 * 2**20, 5.0)   # (13421772, 13421772): about 13.4 Mb/s for 5 s under 10 MiB
    """
    if limit_bytes <= 0 or duration <= 0:
        raise ValueError("limit_bytes and duration must be positive")
    rate = int(margin * 8 * limit_bytes / (duration + 1))
    return rate, rate


def encoder_args(
    *,
    crf: int = 20,
    preset: str = "veryfast",
    maxrate: int | None = None,
    bufsize: int | None = None,
) -> list[str]:
    """The ffmpeg output options of every clip we make: H.264 High, yuv420p, BT.709, +faststart.

    Exposed so that anything else that encodes (or a benchmark comparing against an ffmpeg filter)
    uses exactly the same settings as :class:`VideoWriter`.
    """
    if (maxrate is None) != (bufsize is None):
        raise ValueError("maxrate and bufsize go together (VBV needs both)")
    args = ["-an", "-c:v", "libx264", "-preset", preset, "-crf", str(crf)]
    if maxrate is not None:
        args += ["-maxrate", str(int(maxrate)), "-bufsize", str(int(bufsize or 0))]
    args += ["-profile:v", "high", "-pix_fmt", "yuv420p", *_COLOUR_TAGS, "-color_range", "tv"]
    args += ["-chroma_sample_location", "left", "-movflags", "+faststart"]
    return args


def rgb_to_ycbcr(rgb: np.ndarray) -> np.ndarray:
    """Full-resolution BT.709 limited-range Y'CbCr (uint8, channels Y, Cb, Cr) of an RGB uint8 image.

    The matrix is the one ffmpeg uses for the tags :func:`encoder_args` writes, so planes made from it
    and fed as ``yuv420p`` decode to the same colours as RGB fed directly.
    """
    kr, kb = 0.2126, 0.0722
    kg = 1 - kr - kb
    luma = np.array([kr, kg, kb])
    y = 219 / 255 * luma
    cb = 224 / 255 * (np.array([0, 0, 1]) - luma) / (2 * (1 - kb))
    cr = 224 / 255 * (np.array([1, 0, 0]) - luma) / (2 * (1 - kr))
    matrix = np.array([[*y, 16.0], [*cb, 128.0], [*cr, 128.0]], dtype=np.float32)
    return cv2.transform(np.ascontiguousarray(rgb), matrix)


def _frame_bytes(pix_fmt: str, width: int, height: int) -> int:
    num, den = _PIX_FMTS[pix_fmt]
    return width * height * num // den


def _tail(stream: IO[bytes] | None) -> str:
    if stream is None:
        return ""
    try:
        stream.seek(0)
        text = stream.read().decode(errors="replace").strip()
    except (OSError, ValueError):
        return ""
    return text[-_STDERR_TAIL:]


class VideoWriter:
    """Encode raw frames into an H.264 MP4 through an ffmpeg child process.

    ::

        with VideoWriter(path, width=1280, height=720, fps=24, pix_fmt="yuv420p") as out:
            out.write(planes)   # (H*3/2, W) uint8 I420 layout, or any buffer of W*H*3/2 bytes

    ``pix_fmt`` is the *input* layout: ``rgb24`` (default), ``bgr24``, ``gray`` or ``yuv420p`` (which
    skips ffmpeg's colour conversion and halves the bytes through the pipe; see :func:`rgb_to_ycbcr`).
    Width and height must be even. ``maxrate``/``bufsize`` (bit/s, bits) add a VBV cap; ``extra_args``
    go before the output file name. The file appears at ``path`` only after a successful :meth:`close`;
    leaving the ``with`` block by an exception kills ffmpeg and removes the temporary file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        width: int,
        height: int,
        fps: float,
        pix_fmt: str = "rgb24",
        crf: int = 20,
        preset: str = "veryfast",
        maxrate: int | None = None,
        bufsize: int | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        if pix_fmt not in _PIX_FMTS:
            raise ValueError(f"pix_fmt must be one of {', '.join(_PIX_FMTS)}, got {pix_fmt!r}")
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ValueError(f"width and height must be positive and even, got {width}x{height}")
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps!r}")
        self.path = Path(path)
        self.width = width
        self.height = height
        self.fps = fps
        self.pix_fmt = pix_fmt
        self.frames = 0
        self.frame_bytes = _frame_bytes(pix_fmt, width, height)
        self._encode = encoder_args(crf=crf, preset=preset, maxrate=maxrate, bufsize=bufsize)
        self._extra = list(extra_args)
        self._tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.part")
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._closed = False
        self._lock = threading.RLock()  # close/abort may race with a feeder thread's failing write

    def command(self) -> list[str]:
        """The ffmpeg command line this writer runs (output to the temporary file)."""
        src = ["-f", "rawvideo", "-pix_fmt", self.pix_fmt, "-s", f"{self.width}x{self.height}"]
        src += ["-r", f"{self.fps:g}"]
        if self.pix_fmt == "yuv420p":  # our planes are already BT.709 limited: say so, so nothing converts
            src += [*_COLOUR_TAGS, "-color_range", "tv", "-chroma_sample_location", "left"]
        return [
            ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error",
            *src, "-i", "pipe:0", *self._encode, *self._extra, "-f", "mp4", "-y", str(self._tmp),
        ]  # fmt: skip

    def open(self) -> VideoWriter:
        """Start ffmpeg; :meth:`__enter__` calls this."""
        if self._proc is not None or self._closed:
            raise VideoError("a VideoWriter can be opened only once")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the writer
        try:
            self._proc = subprocess.Popen(
                self.command(), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._stderr
            )
        except OSError as exc:
            self._stderr.close()
            raise VideoError(f"could not start ffmpeg: {exc}") from exc
        assert self._proc.stdin is not None
        with contextlib.suppress(OSError):  # a 1 MiB pipe: far fewer wake-ups per 1-3 MB frame
            fcntl.fcntl(self._proc.stdin.fileno(), _F_SETPIPE_SZ, 1 << 20)
        return self

    def __enter__(self) -> VideoWriter:
        return self.open()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, frame: np.ndarray | bytes | memoryview) -> None:
        """Send one frame: an array of the input layout, or a buffer of exactly one frame's bytes.

        Blocks while ffmpeg is busy (the pipe is the only buffer), so a producer thread overlaps well.
        """
        if self._proc is None or self._closed:
            raise VideoError("write() on a VideoWriter that is not open")
        if isinstance(frame, np.ndarray):
            if frame.dtype != np.uint8:
                raise ValueError(f"frames must be uint8, got {frame.dtype}")
            data: Any = memoryview(np.ascontiguousarray(frame)).cast("B")
        else:
            data = memoryview(frame).cast("B")
        if data.nbytes != self.frame_bytes:
            raise ValueError(
                f"a {self.pix_fmt} {self.width}x{self.height} frame is {self.frame_bytes} bytes, "
                f"got {data.nbytes}" + (f" (shape {frame.shape})" if isinstance(frame, np.ndarray) else "")
            )
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(data)
        except (BrokenPipeError, ValueError, OSError) as exc:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)  # let it finish its complaint on stderr
            tail = _tail(self._stderr)
            self.abort()
            raise VideoError(f"ffmpeg stopped while encoding {self.path.name}: {tail or exc}") from exc
        self.frames += 1

    def close(self) -> None:
        """Finish encoding and move the file into place; raises :class:`VideoError` if ffmpeg failed."""
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._closed:
            return
        if self._proc is None:
            raise VideoError("close() on a VideoWriter that was never opened")
        assert self._proc.stdin is not None
        with contextlib.suppress(OSError):  # ffmpeg already gone; its return code says why
            self._proc.stdin.close()
        code = self._proc.wait()
        if code != 0 or self.frames == 0:
            tail = _tail(self._stderr) or ("no frames were written" if self.frames == 0 else "")
            self.abort()
            raise VideoError(f"ffmpeg failed (exit {code}) writing {self.path.name}: {tail}")
        os.replace(self._tmp, self.path)
        self._finish()

    def abort(self) -> None:
        """Kill ffmpeg and delete the temporary file; nothing appears at ``path``. Idempotent."""
        with self._lock:
            self._abort()

    def _abort(self) -> None:
        if self._closed:
            return
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            if self._proc.stdin is not None:
                with contextlib.suppress(OSError):
                    self._proc.stdin.close()
            self._proc.wait()
        self._tmp.unlink(missing_ok=True)
        self._finish()

    def _finish(self) -> None:
        self._closed = True
        if self._stderr is not None:
            self._stderr.close()


def _meta(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise VideoError(f"{path} does not exist")
    gen = imageio_ffmpeg.read_frames(str(path))
    try:
        return next(gen)
    except (OSError, RuntimeError, StopIteration, IndexError, AttributeError, ValueError) as exc:
        raise VideoError(f"cannot decode {path.name}: {str(exc)[-_STDERR_TAIL:]}") from exc
    finally:
        gen.close()


def probe(path: str | os.PathLike[str], *, count: bool = True) -> VideoInfo:
    """Size, frame rate, frame count, duration, codec and pixel format of a video file.

    With ``count`` (the default) the whole file is decoded once, which proves every frame decodes and
    gives the exact frame count (about 0.1-0.5 s for a 5 s 720p clip). With ``count=False`` only the
    header is read (a few ms) and the frame count is derived from the container's duration: for files
    we made ourselves. Raises :class:`VideoError` if ffmpeg cannot decode it.
    """
    path = Path(path)
    meta = _meta(path)
    fps = float(meta.get("fps") or 0.0)
    if count:
        try:
            frames, secs = imageio_ffmpeg.count_frames_and_secs(str(path))
        except RuntimeError as exc:
            raise VideoError(f"cannot decode {path.name}: {str(exc)[-_STDERR_TAIL:]}") from exc
    else:
        secs = float(meta.get("duration") or 0.0)
        frames = round(secs * fps)
    if not frames:
        raise VideoError(f"{path.name} holds no decodable video frames")
    width, height = meta["size"]
    pix_fmt = re.split(r"[(,\s]", str(meta.get("pix_fmt", "")), maxsplit=1)[0]
    return VideoInfo(
        width=int(width),
        height=int(height),
        fps=fps,
        frames=int(frames),
        duration=frames / fps if fps else float(secs or 0.0),
        codec=str(meta.get("codec", "")),
        pix_fmt=pix_fmt,
        bytes=path.stat().st_size,
    )


def read_frames(
    path: str | os.PathLike[str], *, size: tuple[int, int] | None = None, gray: bool = False
) -> Iterator[np.ndarray]:
    """Decode a video to uint8 arrays: ``(H, W, 3)`` RGB, or ``(H, W)`` luma with ``gray=True``.

    ``size=(width, height)`` scales while decoding with ffmpeg's ``area`` filter (cheap and
    alias-free for metrics at 320×180). Raises :class:`VideoError` if decoding fails part way.
    """
    path = Path(path)
    if size is None:
        width, height = _meta(path)["size"]
        scale: list[str] = []
    else:
        width, height = size
        scale = ["-vf", f"scale={width}:{height}:flags=area"]
    pix_fmt = "gray" if gray else "rgb24"
    shape = (height, width) if gray else (height, width, 3)
    nbytes = int(np.prod(shape))
    cmd = [
        ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-i", str(path),
        "-map", "0:v:0", *scale, "-pix_fmt", pix_fmt, "-f", "rawvideo", "pipe:1",
    ]  # fmt: skip
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL)
        assert proc.stdout is not None
        try:
            while True:
                buf = proc.stdout.read(nbytes)
                if not buf:
                    break
                if len(buf) != nbytes:
                    raise VideoError(f"{path.name}: truncated frame from ffmpeg: {_tail(err)}")
                yield np.frombuffer(buf, np.uint8).reshape(shape)
            if proc.wait() != 0:
                raise VideoError(f"cannot decode {path.name}: {_tail(err)}")
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.stdout.close()
            proc.wait()
