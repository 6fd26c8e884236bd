"""Fitting a clip for delivery: one capped-CRF pass (``fit_to_limit``) vs a two-pass encode, and the size rule.

    python bench/delivery_fit.py                 # about 6 min on 2 cores; prints markdown tables
    python bench/delivery_fit.py --runs 3 --ladder

The clip: 10 s of 1920×1080 at 24 fps (240 frames) that plain CRF cannot fit into 10 MiB. A 2600×1400
mosaic of detailed skimage photographs under the animator's zoom-in path (motion 3, float warps), with
fresh Gaussian grain of sigma 6 on every frame, encoded once at x264 veryfast CRF 16 as the source (what
post-processing hands the delivery encode, a little better than its CRF 18).

Side by side, interleaved, ``--runs`` times each (medians; min–max in brackets):

* one pass: ``worker.encode.fit_to_limit(src, dst, limit_bytes=10 MiB)``: x264 medium CRF 20 under the
  VBV cap ``maxrate = bufsize = 0.95·8·limit/(D+1)`` at the size ``plan_encode`` chose, then the size check;
* two pass: x264 medium, ``-b:v 0.95·8·limit/D`` (reference/video.md §2.5), ``-pass 1`` to null then
  ``-pass 2``, same output options. Not guaranteed to fit: it targets an average.
* plain CRF 20 (once): what happens without a cap.

Wall time covers the whole call (decode of the source included, twice for two-pass); CPU is user+system of
this process and its ffmpeg children. Quality is SSIM and PSNR (ffmpeg's ``ssim``/``psnr`` filters, Y'
and all planes) of the output against the source, a smaller output scaled back to 1920×1080 with
bicubic first, as a player would.

``--ladder`` encodes the same clip with capped CRF at 1080p, 720p and 540p under 10, 5 and 2.5 MiB to show
where a smaller picture starts to beat a starved large one (the 0.11 bit-per-pixel rule of
``worker.encode``).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import mosaic, timed  # noqa: E402

from backends import video  # noqa: E402
from backends.animator import camera_path  # noqa: E402
from backends.base import CameraMove  # noqa: E402
from worker import encode  # noqa: E402

OUT = ROOT / "bench" / "out" / "delivery"
MiB = 1024 * 1024
W, H, FPS, SECONDS, LIMIT = 1920, 1080, 24, 10.0, 10 * MiB


def make_source(path: Path, *, grain: float = 6.0) -> Path:
    """The 10 s 1080p zoom over the mosaic, with fresh Gaussian grain of sigma ``grain`` on every frame."""
    if path.exists():
        return path
    picture = mosaic()
    mats = camera_path((picture.shape[1], picture.shape[0]), camera=CameraMove.ZOOM_IN, motion=3,
                       duration=SECONDS, fps=FPS, width=W, height=H)  # fmt: skip
    rng = np.random.default_rng(6)
    with video.VideoWriter(path, width=W, height=H, fps=FPS, crf=16) as out:
        for m in mats:
            frame = cv2.warpAffine(picture, m[:2], (W, H), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
            if grain:
                frame = cv2.add(frame, rng.normal(0, grain, frame.shape).astype(np.float32), dtype=cv2.CV_8U)
            out.write(frame)
    return path


def ffmpeg(*args: str) -> str:
    cmd = [video.ffmpeg_exe(), "-hide_banner", "-nostdin", "-y", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return proc.stderr


def output_args(*, preset: str = "medium", crf: int = 20, bitrate: int | None = None, **vbv: int) -> list[str]:
    """``backends.video.encoder_args`` with ``-b:v`` in place of ``-crf`` when a bitrate is given."""
    args = video.encoder_args(crf=crf, preset=preset, **vbv)
    if bitrate is not None:
        i = args.index("-crf")
        args[i : i + 2] = ["-b:v", str(bitrate)]
    return args


def two_pass(src: Path, dst: Path, bitrate: int) -> None:
    log = str(OUT / "x264-2pass")
    args = output_args(bitrate=bitrate)
    ffmpeg("-loglevel", "error", "-i", str(src), *args, "-pass", "1", "-passlogfile", log, "-f", "null", os.devnull)
    ffmpeg("-loglevel", "error", "-i", str(src), *args, "-pass", "2", "-passlogfile", log, "-f", "mp4", str(dst))


def quality(out: Path, src: Path) -> tuple[float, float, float]:
    """(SSIM Y', SSIM all, PSNR all) of ``out`` against ``src``, ``out`` scaled up to the source size first."""
    graph = f"[0:v]scale={W}:{H}:flags=bicubic,split[a][b];[1:v]split[c][d];[a][c]ssim;[b][d]psnr"
    log = ffmpeg("-i", str(out), "-i", str(src), "-lavfi", graph, "-f", "null", "-")
    ssim = re.search(r"SSIM Y:([\d.]+).*All:([\d.]+)", log)
    psnr = re.search(r"PSNR .*average:([\d.]+)", log)
    assert ssim and psnr, log[-500:]
    return float(ssim.group(1)), float(ssim.group(2)), float(psnr.group(1))


def span(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} s" + (f" ({min(xs):.2f}–{max(xs):.2f})" if len(xs) > 1 else "")


def bench_fit(src: Path, runs: int) -> None:
    info = video.probe(src)
    bitrate = int(0.95 * 8 * LIMIT / info.duration)
    jobs: dict[str, tuple[Path, Callable[[], object]]] = {
        "fit": (OUT / "one-pass.mp4", lambda: encode.fit_to_limit(src, OUT / "one-pass.mp4", limit_bytes=LIMIT)),
        "fit-medium": (OUT / "one-pass-medium.mp4", lambda: encode.fit_to_limit(
            src, OUT / "one-pass-medium.mp4", limit_bytes=LIMIT, crf=20, preset="medium")),
        "two-pass": (OUT / "two-pass.mp4", lambda: two_pass(src, OUT / "two-pass.mp4", bitrate)),
    }  # fmt: skip
    times: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in jobs}
    for _ in range(runs):
        for key, (_, job) in jobs.items():
            w, u = timed(job)
            times[key][0].append(w)
            times[key][1].append(u)
    crf = OUT / "crf20.mp4"
    wc, uc = timed(ffmpeg, "-loglevel", "error", "-i", str(src), *output_args(), "-f", "mp4", str(crf))
    plan = encode.plan_encode(info.width, info.height, fps=info.fps, duration=info.duration, limit_bytes=LIMIT)
    print(f"source: {info.width}×{info.height}, {info.frames} frames, {info.bytes / MiB:.1f} MiB; "
          f"limit {LIMIT / MiB:.0f} MiB; one pass: {plan.width}×{plan.height}, maxrate = bufsize = "
          f"{plan.maxrate / 1e6:.2f} Mb/s ({plan.bits_per_pixel:.3f} bit/px); "
          f"two-pass -b:v {bitrate / 1e6:.2f} Mb/s")  # fmt: skip
    print("\n| encode (10 s 1080p, grain, 10 MiB) | wall (min–max) | CPU | MiB | fits | SSIM Y / all | PSNR dB |")
    print("|---|---|---|---|---|---|---|")
    rows = (
        (f"**one pass: `fit_to_limit` defaults** (capped CRF {encode.DEFAULT_CRF}, {encode.DEFAULT_PRESET})", "fit"),
        ("one pass: `fit_to_limit(crf=20, preset=\"medium\")`", "fit-medium"),
        ("two-pass medium, `-b:v` 0.95·8·limit/D", "two-pass"),
    )  # fmt: skip
    for label, key in rows:
        path = jobs[key][0]
        w, u = times[key]
        print(row(label, path, src, span(w), statistics.median(u)))
    print(row("plain CRF 20 medium (no cap)", crf, src, span([wc]), uc))
    for key in ("fit", "fit-medium"):
        ratio = [a / b for a, b in zip(times[key][0], times["two-pass"][0], strict=True)]
        cpu_ratio = statistics.median(times[key][1]) / statistics.median(times["two-pass"][1])
        print(f"\n{key} / two-pass wall time, per interleaved round: {', '.join(f'{r:.2f}' for r in ratio)}; "
              f"median {statistics.median(ratio):.2f}; CPU {cpu_ratio:.2f}")  # fmt: skip


def row(label: str, path: Path, src: Path, wall: str, cpu_s: float) -> str:
    size = path.stat().st_size
    y, a, p = quality(path, src)
    return (f"| {label} | {wall} | {cpu_s:.1f} s | {size / MiB:.2f} | {'yes' if size <= LIMIT else '**no**'} | "
            f"{y:.4f} / {a:.4f} | {p:.2f} |")  # fmt: skip


def bench_ladder(sources: dict[str, Path]) -> None:
    """Capped CRF at four sizes under four limits, each scored at 1080p against its source."""
    print("\n| clip | limit | bit/px at 1080p | 1920×1080 | 1280×720 | 960×540 | 640×360 | plan_encode picks |")
    print("|---|---|---|---|---|---|---|---|")
    sizes = ((1920, 1080), (1280, 720), (960, 540), (640, 360))
    for name, src in sources.items():
        for limit in (5 * MiB, int(2.5 * MiB), int(1.25 * MiB), int(0.625 * MiB)):
            plan = encode.plan_encode(W, H, fps=FPS, duration=SECONDS, limit_bytes=limit)
            cells = []
            for w, h in sizes:
                out = OUT / f"ladder-{name}-{limit // 1024}-{h}.mp4"
                scale = [] if (w, h) == (W, H) else ["-vf", f"scale={w}:{h}:flags=lanczos"]
                args = output_args(crf=encode.DEFAULT_CRF, preset=encode.DEFAULT_PRESET, maxrate=plan.maxrate,
                                   bufsize=plan.bufsize)  # fmt: skip
                ffmpeg("-loglevel", "error", "-i", str(src), *scale, *args, "-f", "mp4", str(out))
                cells.append(quality(out, src))
            best = max(range(len(sizes)), key=lambda i: cells[i][0])
            text = [f"{'**' if i == best else ''}{y:.4f}{'**' if i == best else ''} / {p:.2f} dB"
                    for i, (y, _, p) in enumerate(cells)]  # fmt: skip
            print(f"| {name} | {limit / MiB:g} MiB | {plan.maxrate / (W * H * FPS):.3f} | {' | '.join(text)} | "
                  f"{plan.width}×{plan.height} |", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--ladder", action="store_true", help="also measure four sizes under four limits")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"load average before: {os.getloadavg()}", flush=True)
    src = make_source(OUT / "hard-1080p.mp4")
    bench_fit(src, args.runs)
    if args.ladder:
        bench_ladder({"grain": src, "clean": make_source(OUT / "clean-1080p.mp4", grain=0)})
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
