"""Local animator vs ffmpeg zoompan: wall time, CPU, peak memory and jitter of the same 5 s 720p zoom-in.

    python bench/local_vs_zoompan.py              # 5 interleaved runs each; prints the table and
                                                  # rewrites its block in bench/README.md
    python bench/local_vs_zoompan.py --runs 9 --no-readme

Both sides start from the same still (bot/assets/astronaut.png, centre-cropped to 16:9 and scaled to
1280×720 with Lanczos), make the same move (zoom 1.0→1.25 = motion 2, centred, smootherstep ease in log
space, 120 frames at 24 fps) and encode with the same options (``backends.video.encoder_args()``: libx264
veryfast CRF 20, High, yuv420p, BT.709 tags, +faststart).

Each run is a fresh worker process (``--worker``) that makes the clip twice: the 1st clip pays one-time
costs (OpenCV's first calls, page faults), the 2nd is what a long-lived bot worker pays per clip.

* wall: ``perf_counter`` around the work only, after imports (a bot process has imported already); ours
  includes decoding the PNG, as zoompan's does.
* CPU: user + system time of the worker and its ffmpeg children over both clips, halved. On a busy
  machine wall time follows CPU time, so this is the figure that predicts throughput under load.
* memory: ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` is the largest peak RSS of the worker's ffmpeg
  children; ``RUSAGE_SELF`` is the worker's own peak, and /proc/self/statm before the first clip is its
  baseline after imports. "total" adds the ffmpeg peak and the worker's growth above that baseline (the
  two peaks need not coincide, so it is an upper bound). For zoompan the Python worker only waits, so
  its total is ffmpeg's peak.
* jitter: ECC affine fit (``cv2.findTransformECC``, MOTION_AFFINE, Gaussian 5) of every pair of
  consecutive decoded gray frames at full size; the fitted warp maps frame k+1 to frame k, the ideal one
  is ``P_k⁻¹·P_{k+1}`` from ``animator.camera_path``. Centre drift is the distance between where the two
  put the image centre; corner error the same at the top-left corner (it adds the zoom-step error).
  Two extra rows separate the renderer from the encoder: our frames before x264, and our frames
  encoded with the same options plus ``-aq-mode 0`` (not our default).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backends import animator, video  # noqa: E402
from backends.base import CameraMove  # noqa: E402

OUT = ROOT / "bench" / "out"
README = ROOT / "bench" / "README.md"
SECTION = "## Local animator vs ffmpeg zoompan"
W, H, FPS, SECONDS, MOTION = 1280, 720, 24, 5.0, 2
ZOOM_END = animator._ZOOM[MOTION]  # 1.25 at motion 2


def make_still(path: Path) -> None:
    """The shared input: astronaut.png centre-cropped to 16:9 and scaled to 1280×720."""
    bgr = cv2.imread(str(ROOT / "bot" / "assets" / "astronaut.png"))
    h, w = bgr.shape[:2]
    ch = round(w * 9 / 16)
    top = (h - ch) // 2
    still = cv2.resize(bgr[top : top + ch], (W, H), interpolation=cv2.INTER_LANCZOS4)
    cv2.imwrite(str(path), still)


def zoompan_command(still: Path, out: Path) -> list[str]:
    """ffmpeg zoompan making our zoom-in: same zoom curve, centred, same encoder options."""
    n = animator.frame_count(SECONDS, FPS)
    t = f"on/{n - 1}"
    ease = f"pow({t},3)*({t}*(6*{t}-15)+10)"  # smootherstep, as animator uses for zooms
    vf = (
        f"zoompan=z='pow({ZOOM_END},{ease})':x='iw/2-(iw/zoom/2)':y='ih/2-(ih/zoom/2)'"
        f":d={n}:s={W}x{H}:fps={FPS}"
    )
    return [
        video.ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-i", str(still),
        "-vf", vf, "-frames:v", str(n), *video.encoder_args(), "-f", "mp4", "-y", str(out),
    ]  # fmt: skip


def _rss_now_kib() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


def worker(kind: str, still: Path, out: Path) -> dict[str, float]:
    """Two timed runs in this fresh process (first: cold; second: warm); figures as JSON-able numbers."""
    baseline = _rss_now_kib()
    before = _cpu_seconds()
    walls = []
    for _ in range(2):
        started = time.perf_counter()
        if kind == "local":
            rgb = cv2.cvtColor(cv2.imread(str(still)), cv2.COLOR_BGR2RGB)
            animator.render(
                rgb,
                out,
                camera=CameraMove.ZOOM_IN,
                motion=MOTION,
                duration=SECONDS,
                fps=FPS,
                width=W,
                height=H,
            )
        else:
            subprocess.run(zoompan_command(still, out), check=True)
        walls.append(time.perf_counter() - started)
    return {
        "cold": walls[0],
        "warm": walls[1],
        "cpu": (_cpu_seconds() - before) / 2,
        "child_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
        "self_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "baseline_kib": baseline,
    }


def _cpu_seconds() -> float:
    """User + system CPU of this process and its waited-for children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def jitter(frames: list[np.ndarray], path: list[np.ndarray]) -> dict[str, float]:
    """Centre drift and corner error (RMS, max; px) of consecutive-frame ECC fits vs the ideal path."""
    h, w = frames[0].shape
    centre = np.array([(w - 1) / 2, (h - 1) / 2, 1.0])
    corner = np.array([0.0, 0.0, 1.0])
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 100, 1e-6)
    drift, corner_err = [], []
    for k in range(len(frames) - 1):
        warp = np.eye(2, 3, dtype=np.float32)
        _, warp = cv2.findTransformECC(frames[k + 1], frames[k], warp, cv2.MOTION_AFFINE, criteria, None, 5)
        ideal = np.linalg.inv(path[k]) @ path[k + 1]
        for point, errs in ((centre, drift), (corner, corner_err)):
            errs.append(float(np.hypot(*(warp @ point - (ideal @ point)[:2]))))
    d, c = np.array(drift), np.array(corner_err)
    return {
        "drift_rms": float(np.sqrt(np.mean(d**2))),
        "drift_max": float(d.max()),
        "corner_rms": float(np.sqrt(np.mean(c**2))),
    }


def decoded_gray(path: Path) -> list[np.ndarray]:
    """Every frame of a clip as float32 luma."""
    return [f.astype(np.float32) for f in video.read_frames(path, gray=True)]


def render_only_gray(still: Path) -> list[np.ndarray]:
    """Our frames before encoding (the Y plane the encoder receives), as float32 BT.709 luma."""
    rgb = cv2.cvtColor(cv2.imread(str(still)), cv2.COLOR_BGR2RGB)
    frames = animator.yuv_frames(
        rgb, camera=CameraMove.ZOOM_IN, motion=MOTION, duration=SECONDS, fps=FPS, width=W, height=H
    )
    return [f[:H].astype(np.float32) for f in frames]


def reencoded_gray(still: Path, extra: list[str]) -> list[np.ndarray]:
    """Our frames encoded with ``extra`` encoder options, decoded back to float32 luma."""
    rgb = cv2.cvtColor(cv2.imread(str(still)), cv2.COLOR_BGR2RGB)
    out = OUT / "local-variant.mp4"
    frames = animator.yuv_frames(
        rgb, camera=CameraMove.ZOOM_IN, motion=MOTION, duration=SECONDS, fps=FPS, width=W, height=H
    )
    with video.VideoWriter(out, width=W, height=H, fps=FPS, pix_fmt="yuv420p", extra_args=extra) as writer:
        for frame in frames:
            writer.write(frame)
    return decoded_gray(out)


def run_worker(kind: str, still: Path, out: Path) -> dict[str, float]:
    """Start a fresh worker process and read its figures."""
    cmd = [sys.executable, __file__, "--worker", kind, "--still", str(still), "--out", str(out)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def mib(kib: float) -> str:
    """KiB as a MiB string."""
    return f"{kib / 1024:.0f}"


def main() -> None:
    """Run the benchmark and print (and optionally store) the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-readme", action="store_true", help=f"do not rewrite '{SECTION}' in README")
    parser.add_argument("--worker", choices=("local", "zoompan"), help=argparse.SUPPRESS)
    parser.add_argument("--still", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.still, args.out)))
        return

    OUT.mkdir(parents=True, exist_ok=True)
    still = OUT / "still.png"
    make_still(still)
    outs = {"local": OUT / "local.mp4", "zoompan": OUT / "zoompan.mp4"}
    runs: dict[str, list[dict[str, float]]] = {"local": [], "zoompan": []}
    load = os.getloadavg()[0]
    for i in range(args.runs):  # interleaved, alternating who goes first: fair under background load
        order = ("local", "zoompan") if i % 2 == 0 else ("zoompan", "local")
        for kind in order:
            runs[kind].append(run_worker(kind, still, outs[kind]))
    path = animator.camera_path(
        (W, H), camera=CameraMove.ZOOM_IN, motion=MOTION, duration=SECONDS, fps=FPS, width=W, height=H
    )
    jit = {kind: jitter(decoded_gray(out), path) for kind, out in outs.items()}
    raw = jitter(render_only_gray(still), path)
    no_aq = jitter(reencoded_gray(still, ["-aq-mode", "0"]), path)
    info = {kind: video.probe(out) for kind, out in outs.items()}

    rows = [
        "| method | wall, 1st clip in a process | wall, 2nd clip | CPU per clip | ffmpeg peak RSS | "
        "Python peak RSS (imports) | total RSS | centre drift RMS / max | corner error RMS | file |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def spread(values: list[float]) -> str:
        return f"**{statistics.median(values):.3f} s** ({min(values):.2f}–{max(values):.2f})"

    for kind, label in (("local", "animator (ours)"), ("zoompan", "ffmpeg zoompan")):
        r = runs[kind]
        child = max(x["child_kib"] for x in r)
        if kind == "local":
            py = max(x["self_kib"] for x in r)
            base = statistics.median(x["baseline_kib"] for x in r)
            pycell = f"{mib(py)} MiB ({mib(base)})"
            total = max(x["child_kib"] + x["self_kib"] - x["baseline_kib"] for x in r)
        else:
            pycell, total = "–", child
        j = jit[kind]
        rows.append(
            f"| {label} | {spread([x['cold'] for x in r])} | {spread([x['warm'] for x in r])} | "
            f"{statistics.median(x['cpu'] for x in r):.2f} s | {mib(child)} MiB | {pycell} | "
            f"{mib(total)} MiB | "
            f"**{j['drift_rms']:.4f}** / {j['drift_max']:.4f} px | {j['corner_rms']:.4f} px | "
            f"{info[kind].frames} frames, {info[kind].bytes / 2**20:.2f} MiB |"
        )
    for label, j in (("ours, frames before x264", raw), ("ours, x264 with `-aq-mode 0`", no_aq)):
        rows.append(
            f"| {label} | | | | | | | {j['drift_rms']:.4f} / {j['drift_max']:.4f} px | "
            f"{j['corner_rms']:.4f} px | |"
        )
    cold = statistics.median(x["cold"] for x in runs["local"]) / statistics.median(
        x["cold"] for x in runs["zoompan"]
    )
    warm = statistics.median(x["warm"] for x in runs["local"]) / statistics.median(
        x["warm"] for x in runs["zoompan"]
    )
    table = "\n".join(rows)
    summary = (
        f"{args.runs} interleaved worker processes per method on {os.cpu_count()} CPUs "
        f"(1-min load average before: {load:.2f}); ours/zoompan median wall-time ratio "
        f"{cold:.2f} (1st clip), {warm:.2f} (2nd clip). Encoder: `{' '.join(video.encoder_args())}`."
    )
    print(table)
    print()
    print(summary)
    if not args.no_readme:
        write_readme(table, summary)


def write_readme(table: str, summary: str) -> None:
    """Replace the results block inside this benchmark's README section."""
    text = README.read_text()
    start, end = "<!-- local_vs_zoompan:start -->", "<!-- local_vs_zoompan:end -->"
    block = f"{start}\n{table}\n\n{summary}\n{end}"
    if start not in text:
        raise SystemExit(f"{README} has no {start} marker")
    text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    README.write_text(text)


if __name__ == "__main__":
    main()
