"""Frame interpolation 8→24 fps (and 12/16→24), plus stitching: time, CPU and held-out PSNR.

    python bench/interpolation.py                  # about 4 min on 2 cores; prints markdown tables
    python bench/interpolation.py --runs 1 --no-mci --no-stitch

The test: a real 24 fps clip (``truth``, 5 s, 1280×720, 120 frames, x264 CRF 12) is thinned to 8 fps by
keeping frames 0, 3, 6, … 117 (40 frames, CRF 12: what a model hands us), brought back to 24 fps by each
method, and every output frame is compared with the truth frame of the same time. Held-out frames are
the 78 in-between ones (k mod 3 ≠ 0, k < 118); the last two outputs (118, 119) lie after the last kept
frame and are padding (a copy of frame 117), scored separately; the 40 kept frames show the ceiling that
re-encoding alone allows. PSNR is on RGB, 8 bits.

Clips (all made from skimage / bot/assets photographs):

* ``scene``: a 2600×1400 mosaic of detailed photographs under a camera that pans 800 px and zooms
  1.0→1.3, with two feathered cut-outs (the cat, 300×260 px, crossing left to right with a vertical bob;
  the astronaut, 220×240 px, crossing the other way and turning 35°) that pass over each other. Hard:
  the cat moves ≈27 px per 8 fps step against a background moving ≈20 px the other way.
* ``zoom``: the local animator's zoom-in (motion 3) on astronaut.png: the camera-only case.
* ``pan``: the animator's pan-right (motion 4) over the mosaic: fast camera-only motion on fine detail.

12→24 keeps frames 0, 2, 4, …; 16→24 renders ``scene`` at 16 fps from the same scene description (the
animator's paths depend on the frame count, so its clips are only thinned).

Time is wall time of ``worker.postprocess.interpolate`` (decode, interpolate, encode with x264 veryfast
CRF 18) in this process, median of ``--runs`` interleaved runs; CPU is user+system of this process and
its ffmpeg children. ``mci`` is ffmpeg's full-resolution minterpolate (one run). ffmpeg references:
``framerate`` (blend) and half-resolution mci (``scale=640:360,minterpolate,scale=1280:720``).

Stitching: two 5 s 720p clips joined with a 0.5 s fade, by ``worker.postprocess.stitch`` (one ffmpeg
pass: the normalising chain of reference/video.md §2.4, ``xfade``, x264) and by our own numpy fade of
I420 frames piped to one x264 encode (``numpy_stitch`` below); same encoder options.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
from skimage import data

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import mosaic, timed  # noqa: E402

from backends import video  # noqa: E402
from backends.animator import render  # noqa: E402
from backends.base import CameraMove  # noqa: E402
from worker import postprocess  # noqa: E402

OUT = ROOT / "bench" / "out" / "interpolation"
W, H, SECONDS = 1280, 720, 5.0


def _sprite(img: np.ndarray, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    s = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32)
    m = np.zeros((h, w), np.float32)
    cv2.ellipse(m, (w // 2, h // 2), (w // 2 - 4, h // 2 - 4), 0, 0, 360, 1.0, -1)
    return s, cv2.GaussianBlur(m, (0, 0), 2.0)


def scene_frames(fps: float, seconds: float = SECONDS) -> Iterator[np.ndarray]:
    """The ``scene`` clip as a function of time: frame k shows u = k / (fps·seconds) of the move."""
    bg = mosaic()
    cat = _sprite(data.chelsea()[20:280, 80:380], 300, 260)
    astro = _sprite(data.astronaut()[0:300, 120:400], 220, 240)
    n = round(fps * seconds)
    for k in range(n):
        u = k / (fps * seconds)  # the same u at the same time, whatever the frame rate
        z = 1.3**u
        cx, cy, s = 700 + 800 * u, 650 - 120 * u, 1 / z
        m = np.array([[s, 0, cx - s * W / 2], [0, s, cy - s * H / 2]], np.float32)
        frame = cv2.warpAffine(bg, m, (W, H), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                               borderMode=cv2.BORDER_REFLECT).astype(np.float32)  # fmt: skip
        for (spr, mask), x0, y0, vx, vy, turn in ((cat, 100, 200, 900, 0, 0), (astro, 1000, 400, -700, -200, 35)):
            px, py = x0 + vx * u, y0 + vy * u + 60 * np.sin(2 * np.pi * u * 1.5)
            h, w = mask.shape
            r = cv2.getRotationMatrix2D((w / 2, h / 2), turn * u, 1.0)
            r[0, 2] += px
            r[1, 2] += py
            sw = cv2.warpAffine(spr, r, (W, H), flags=cv2.INTER_LINEAR)
            mw = cv2.warpAffine(mask, r, (W, H), flags=cv2.INTER_LINEAR)[..., None]
            frame = frame * (1 - mw) + sw * mw
        yield np.clip(frame + 0.5, 0, 255).astype(np.uint8)


def write(path: Path, frames, fps: float) -> Path:
    with video.VideoWriter(path, width=W, height=H, fps=fps, crf=12) as out:
        for f in frames:
            out.write(f)
    return path


def make_clips() -> dict[str, dict[str, Path]]:
    """Per clip: the 24 fps truth and its 8, 12 (and for ``scene`` 16) fps inputs."""
    OUT.mkdir(parents=True, exist_ok=True)
    clips: dict[str, dict[str, Path]] = {}
    astronaut = cv2.cvtColor(cv2.imread(str(ROOT / "bot" / "assets" / "astronaut.png")), cv2.COLOR_BGR2RGB)
    sources = {
        "scene": None,
        "zoom": (astronaut, CameraMove.ZOOM_IN, 3),
        "pan": (mosaic(), CameraMove.PAN_RIGHT, 4),
    }
    for name, spec in sources.items():
        truth = OUT / f"{name}-24.mp4"
        if spec is None:
            write(truth, scene_frames(24), 24)
        else:
            img, camera, motion = spec
            tmp = OUT / f"{name}-render.mp4"
            render(img, tmp, camera=camera, motion=motion, duration=SECONDS, fps=24, width=W, height=H)
            write(truth, video.read_frames(tmp), 24)  # CRF 12 like the others
        frames = list(video.read_frames(truth))
        clips[name] = {"truth": truth}
        clips[name]["8"] = write(OUT / f"{name}-8.mp4", frames[::3], 8)
        clips[name]["12"] = write(OUT / f"{name}-12.mp4", frames[::2], 12)
        if spec is None:
            clips[name]["16"] = write(OUT / f"{name}-16.mp4", scene_frames(16), 16)
    return clips


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float32) - b.astype(np.float32)) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255**2 / mse)


def ffmpeg_ref(src: Path, dst: Path, vf: str, frames: int) -> None:
    cmd = [video.ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", "-i", str(src),
           "-vf", vf, "-frames:v", str(frames), *video.encoder_args(crf=18), str(dst)]  # fmt: skip
    subprocess.run(cmd, check=True)


def score(out_path: Path, truth: list[np.ndarray], src_fps: int) -> dict[str, object]:
    out = list(video.read_frames(out_path))
    step = 24 / src_fps
    last_kept = (len(truth) * src_fps // 24 - 1) * step  # output index of the last source frame
    kept = [k for k in range(len(truth)) if (k / step).is_integer()]
    held = [k for k in range(len(truth)) if not (k / step).is_integer() and k < last_kept]
    tail = [k for k in range(len(truth)) if k > last_kept]
    p = {k: psnr(out[k], truth[k]) for k in range(min(len(out), len(truth)))}
    return {
        "frames": len(out),
        "held": [p[k] for k in held if k in p],
        "tail": [p[k] for k in tail if k in p],
        "kept": [p[k] for k in kept if k in p],
    }


def fmt_row(name: str, wall: list[float], cpu_s: list[float], s: dict[str, object]) -> str:
    held, tail, kept = s["held"], s["tail"], s["kept"]
    t = f"{statistics.median(wall):.2f} s" + (f" ({min(wall):.2f}–{max(wall):.2f})" if len(wall) > 1 else "")
    tail_s = " / ".join(f"{x:.1f}" for x in tail) or "–"
    return (f"| {name} | {t} | {statistics.median(cpu_s):.2f} s | {s['frames']} | "
            f"**{np.mean(held):.2f}** / {np.min(held):.2f} | {tail_s} | {np.mean(kept):.2f} |")  # fmt: skip


def bench_interpolation(clips, runs: int, mci: bool) -> None:
    print("| clip / method | wall (min–max) | CPU | frames | held-out PSNR mean / min dB | padded tail dB |"
          " kept frames dB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name, c in clips.items():
        truth = list(video.read_frames(c["truth"]))
        times: dict[str, tuple[list[float], list[float]]] = {"motion": ([], []), "blend": ([], [])}
        for _ in range(runs):
            for mode in ("motion", "blend"):
                w, u = timed(postprocess.interpolate, c["8"], OUT / f"{name}-{mode}.mp4", mode=mode)
                times[mode][0].append(w)
                times[mode][1].append(u)
        for mode in ("motion", "blend"):
            print(fmt_row(f"{name}: **{mode}**", *times[mode], score(OUT / f"{name}-{mode}.mp4", truth, 8)))
        if mci:
            w, u = timed(postprocess.interpolate, c["8"], OUT / f"{name}-mci.mp4", mode="mci")
            print(fmt_row(f"{name}: mci (ffmpeg, padded)", [w], [u], score(OUT / f"{name}-mci.mp4", truth, 8)))
            half = "tpad=stop_mode=clone:stop=2,scale=640:360,minterpolate=fps=24:mi_mode=mci,scale=1280:720"
            w, u = timed(ffmpeg_ref, c["8"], OUT / f"{name}-mci-half.mp4", half, 120)
            print(fmt_row(f"{name}: ffmpeg half-res mci", [w], [u], score(OUT / f"{name}-mci-half.mp4", truth, 8)))
        blend = "tpad=stop_mode=clone:stop=2,framerate=fps=24"
        w, u = timed(ffmpeg_ref, c["8"], OUT / f"{name}-fr.mp4", blend, 120)
        print(fmt_row(f"{name}: ffmpeg framerate", [w], [u], score(OUT / f"{name}-fr.mp4", truth, 8)))
        for rate in ("12", "16"):
            if rate not in c:
                continue
            w, u = timed(postprocess.interpolate, c[rate], OUT / f"{name}-{rate}-m.mp4")
            print(fmt_row(f"{name}: motion {rate}→24", [w], [u], score(OUT / f"{name}-{rate}-m.mp4", truth, int(rate))))
        del truth


def numpy_stitch(a: Path, b: Path, dst: Path, overlap: float) -> None:
    """The alternative measured against ``stitch``: decode both as I420, fade in numpy, pipe to one x264."""
    m = round(overlap * 24)

    def frames() -> Iterator[np.ndarray]:
        held: list[np.ndarray] = []
        for n, path in enumerate((a, b)):
            for j, frame in enumerate(postprocess.read_i420(path)):
                if n and j < m:
                    yield cv2.addWeighted(held.pop(0), 1 - (j + 0.5) / m, frame, (j + 0.5) / m, 0.0)
                    continue
                held.append(frame)
                if len(held) > m:
                    yield held.pop(0)
        yield from held

    with video.VideoWriter(dst, width=W, height=H, fps=24, pix_fmt="yuv420p", crf=18) as out:
        postprocess._write_all(out, frames())


def bench_stitch(clips, runs: int) -> None:
    a, b = clips["scene"]["truth"], clips["pan"]["truth"]
    res: dict[str, tuple[list[float], list[float]]] = {"xfade": ([], []), "numpy": ([], [])}
    for _ in range(runs):
        w, u = timed(postprocess.stitch, [a, b], OUT / "stitch-xfade.mp4", overlap=0.5)
        res["xfade"][0].append(w)
        res["xfade"][1].append(u)
        w, u = timed(numpy_stitch, a, b, OUT / "stitch-numpy.mp4", 0.5)
        res["numpy"][0].append(w)
        res["numpy"][1].append(u)
    print("\n| stitch 2 × 5 s 720p, 0.5 s fade | wall (min–max) | CPU | frames | seam score |")
    print("|---|---|---|---|---|")
    for label, key in (("`stitch`: one ffmpeg pass, xfade", "xfade"), ("numpy fade of I420 frames → x264", "numpy")):
        path = OUT / f"stitch-{key}.mp4"
        (check,) = postprocess.seam_checks(path, [(4.5, 5.0)])
        w, u = res[key]
        print(f"| {label} | {statistics.median(w):.2f} s ({min(w):.2f}–{max(w):.2f}) | {statistics.median(u):.2f} s "
              f"| {video.probe(path).frames} | {check.score:.2f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-mci", action="store_true", help="skip the slow ffmpeg mci rows")
    parser.add_argument("--no-stitch", action="store_true")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()}", flush=True)
    clips = make_clips()
    bench_interpolation(clips, args.runs, not args.no_mci)
    if not args.no_stitch:
        bench_stitch(clips, args.runs)
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
