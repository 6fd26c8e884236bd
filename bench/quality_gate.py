"""Quality gate: its cost on one core for a 5 s 720p clip, and its verdicts on our own defect set.

    python bench/quality_gate.py                 # about 1 min; prints the tables and rewrites its block
                                                 # in bench/README.md
    python bench/quality_gate.py --runs 9 --no-readme

Cost. The clip is the animator's 5-second 1280×720 24 fps zoom-in (motion 2) of bot/assets/astronaut.png
(centre-cropped to 16:9, 120 frames, libx264 veryfast CRF 20), judged against that picture fitted to
1280×720 (what the pipeline passes). The process and its ffmpeg children are pinned to one core
(``os.sched_setaffinity(0, {0})``, ``OMP_NUM_THREADS=1``, ``cv2.setNumThreads(1)``). Each run times

* decode: ``worker.quality._decode``, the one ffmpeg run that reads the header and decodes every frame
  to 320×180 planar Y'CbCr (ffmpeg's own CPU is in the CPU column, from ``RUSAGE_CHILDREN``);
* metrics: ``worker.quality._analyse`` on those planes, with its per-step split;
* judge: ``worker.quality.judge`` end to end (both of the above plus metadata checks).

Wall time is ``perf_counter``; CPU is user+system of this process and its children. Figures are medians
of ``--runs`` runs (min–max in brackets), after one warm-up.

Defect set. Every clip of ``DEFECTS`` in tests/worker/test_quality.py (320×180, 2 s, 24 fps, real H.264
from the astronaut and scikit-image's coffee photograph), the same clean moves the tests render (every
camera move at motion 2 and 4, at CRF 20 and CRF 35), gentle local motion (water, hair, clouds at CRF 20
and 35) and four 5 s 720p clips (the render, a pan capped at 300 kb/s, a noise storm, block garbage).
For defects the table gives the verdict and the metric that decided it; for clean groups, how many
passed and the worst value of each metric in the group (the margin to each threshold).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy / OpenCV start their thread pools

import argparse
import functools
import importlib.util
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backends import animator  # noqa: E402
from backends.base import CameraMove  # noqa: E402
from worker import quality  # noqa: E402

OUT = ROOT / "bench" / "out" / "quality"
README = ROOT / "bench" / "README.md"
SECTION = "## Quality gate cost"
START, END = "<!-- quality_gate:start -->", "<!-- quality_gate:end -->"
GOAL = 0.5  # seconds per 5 s 720p clip on one core


@functools.cache
def _tests() -> Any:
    """tests/worker/test_quality.py as a module: the defect set and its builders live there."""
    spec = importlib.util.spec_from_file_location("test_quality", ROOT / "tests" / "worker" / "test_quality.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def _cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    cpu, wall = _cpu(), time.perf_counter()
    result = fn()
    return result, time.perf_counter() - wall, _cpu() - cpu


def _spread(values: list[float]) -> str:
    return f"**{statistics.median(values):.3f} s** ({min(values):.3f}–{max(values):.3f})"


# --- cost --------------------------------------------------------------------------------------------


def cost(runs: int, photo: np.ndarray) -> tuple[list[str], float]:
    """Time decode, metrics and judge on the 5 s 720p render; returns table lines and the median judge."""
    clip = OUT / "zoom-in-720p.mp4"
    if not clip.exists():
        animator.render(photo, clip, camera=CameraMove.ZOOM_IN, motion=2, duration=5.0, fps=24, width=1280,
                        height=720)  # fmt: skip
    source = cv2.resize(photo, (1280, 720), interpolation=cv2.INTER_LANCZOS4)
    limit = 240
    rows: dict[str, list[float]] = {"decode": [], "metrics": [], "judge": []}
    cpus: dict[str, list[float]] = {k: [] for k in rows}
    steps: dict[str, list[float]] = {}
    verdict = None
    for i in range(runs + 1):
        decoded, wall, cpu = _timed(lambda: quality._decode(clip, limit))
        timings: dict[str, float] = {}
        _, wall_m, cpu_m = _timed(
            lambda d=decoded, tm=timings: quality._analyse(d.y, d.cb, d.cr, fps=24, source=source,
                                                           t=quality.Thresholds(), timings=tm)
        )  # fmt: skip
        verdict, wall_j, cpu_j = _timed(
            lambda: quality.judge(clip, width=1280, height=720, fps=24, duration=5.0, source=source)
        )
        if i == 0:
            continue  # warm-up: first OpenCV calls, page cache
        for key, w, c in (("decode", wall, cpu), ("metrics", wall_m, cpu_m), ("judge", wall_j, cpu_j)):
            rows[key].append(w)
            cpus[key].append(c)
        for step, seconds in timings.items():
            steps.setdefault(step, []).append(seconds)
    assert verdict is not None and verdict.accepted, verdict
    lines = [
        "| step | wall, one core | CPU |",
        "|---|---|---|",
        f"| decode (one ffmpeg run: header + 120 frames → 320×180 yuv420p) | {_spread(rows['decode'])} | "
        f"{statistics.median(cpus['decode']):.3f} s |",
        f"| metrics (numpy/OpenCV on the decoded planes) | {_spread(rows['metrics'])} | "
        f"{statistics.median(cpus['metrics']):.3f} s |",
    ]
    for step, values in steps.items():
        lines.append(f"| &nbsp;&nbsp;↳ {step} | {statistics.median(values) * 1000:.0f} ms | |")
    lines.append(f"| **judge, end to end** | {_spread(rows['judge'])} | {statistics.median(cpus['judge']):.3f} s |")
    return lines, statistics.median(rows["judge"])


# --- the defect set ----------------------------------------------------------------------------------

COLUMNS = [  # (metric, header, worst is the highest?)
    ("motion_px", "motion px", False),
    ("frozen_run_s", "frozen run s", True),
    ("black_run", "black run", True),
    ("cut_spike", "cut spike", True),
    ("cut_unexplained", "cut unexplained", True),
    ("flicker_luma", "flicker", True),
    ("noise_peak", "noise peak", True),
    ("garbage_blocks", "garbage", True),
    ("start_ssim", "start SSIM", False),
    ("start_coverage", "start cover", False),
    ("start_area", "start area", False),
    ("drift_ssim", "drift SSIM", False),
    ("drift_drop", "drift drop", True),
    ("drift_colour", "drift colour", True),
]
LIMITS = {  # the threshold each column is compared with, for the header row
    "motion_px": "frozen_motion", "frozen_run_s": "frozen_run_s", "black_run": "black_run",
    "cut_spike": "cut_spike", "cut_unexplained": "cut_mad", "flicker_luma": "flicker_luma", "noise_peak": "noise_ratio",
    "garbage_blocks": "garbage_blocks", "start_ssim": "start_ssim", "start_coverage": "start_coverage",
    "start_area": "start_area", "drift_ssim": "drift_ssim", "drift_drop": "drift_drop",
    "drift_colour": "drift_colour",
}  # fmt: skip
DECIDES = {  # the metrics behind each reason, set in bold in the table
    "frozen": ("motion_px", "frozen_run_s"), "black_frames": ("black_run",),
    "hard_cut": ("cut_spike", "cut_unexplained"), "flicker": ("flicker_luma",),
    "corruption": ("noise_peak", "garbage_blocks"),
    "wrong_start": ("start_ssim", "start_coverage", "start_area"),
    "drift": ("drift_ssim", "drift_drop", "drift_colour"),
}  # fmt: skip


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def _past(key: str, value: float, t: quality.Thresholds) -> bool:
    """Whether a metric is on the wrong side of its threshold."""
    highest = next(h for k, _, h in COLUMNS if k == key)
    limit = getattr(t, LIMITS[key])
    return value >= limit if key in ("frozen_run_s", "black_run") else (value > limit if highest else value < limit)


def _row(name: str, expected: str, verdict: quality.Verdict, extra: str = "") -> str:
    t = quality.Thresholds()
    decisive = {m for r in verdict.reasons for m in DECIDES.get(r, ())}
    cells = []
    for key, _, _ in COLUMNS:
        value = verdict.metrics.get(key)
        text = _fmt(value)
        cells.append(f"**{text}**" if key in decisive and value is not None and _past(key, value, t) else text)
    got = ", ".join(verdict.reasons) or "accepted"
    ok = "✅" if (expected in verdict.reasons if expected != "accepted" else verdict.accepted) else "❌"
    return f"| {name}{extra} | {expected} | {ok} {got} | {' | '.join(cells)} | {verdict.score:.2f} |"


def _group(name: str, verdicts: list[quality.Verdict]) -> str:
    cells = []
    for key, _, highest in COLUMNS:
        values = [v.metrics[key] for v in verdicts if key in v.metrics]
        cells.append(_fmt((max if highest else min)(values)) if values else "–")
    passed = sum(v.accepted for v in verdicts)
    ok = "✅" if passed == len(verdicts) else "❌"
    scores = min(v.score for v in verdicts)
    return f"| {name} | accepted | {ok} {passed}/{len(verdicts)} accepted | {' | '.join(cells)} | ≥ {scores:.2f} |"


def defect_set(photo: np.ndarray) -> list[str]:
    """Judge every defect and clean clip of the test suite; returns the markdown table."""
    tq = _tests()
    other = tq.load_other()
    t = quality.Thresholds()
    head = "| clip | expected | verdict | " + " | ".join(h for _, h, _ in COLUMNS) + " | score |"
    limits = " | ".join(("≥ " if not highest else "≤ ") + _fmt(getattr(t, LIMITS[key])) for key, _, highest in COLUMNS)
    lines = [head, "|" + "---|" * (len(COLUMNS) + 4), f"| *passes if* | | | {limits} | |"]
    OUT.mkdir(parents=True, exist_ok=True)
    for defect in tq.DEFECTS:
        path = tq.encode(defect.frames(photo, other), OUT / "defect.mp4")
        verdict = quality.judge(path, width=defect.size[0], height=defect.size[1], fps=tq.FPS,
                                duration=defect.duration, source=photo)  # fmt: skip
        extra = ""
        if defect.reason in ("wrong_duration", "wrong_resolution"):
            m = verdict.metrics
            extra = f" ({m['duration']:.1f} s of {defect.duration:.0f}; {m['width']:.0f}×{m['height']:.0f})"
        lines.append(_row(defect.name, defect.reason, verdict, extra))
        print(lines[-1], flush=True)

    groups: dict[str, list[quality.Verdict]] = {}

    def add(name: str, path: Path) -> None:
        verdict = quality.judge(path, width=tq.W, height=tq.H, fps=tq.FPS, duration=tq.SECONDS, source=photo)
        groups.setdefault(name, []).append(verdict)

    path = OUT / "clean.mp4"
    for motion in (2, 4):
        for camera in CameraMove:
            animator.render(photo, path, camera=camera, motion=motion, duration=tq.SECONDS, fps=tq.FPS,
                            width=tq.W, height=tq.H)  # fmt: skip
            add(f"every camera move, motion {motion}, CRF 20 (render)", path)
            add(f"every camera move, motion {motion}, CRF 35", tq.encode_move(photo, path, camera, motion, crf=35))
    for crf in (20, 35):
        for kind in tq.LOCAL_MOTION:
            add(f"water, hair, clouds, CRF {crf}", tq.encode(tq.local_motion(photo, kind), path, crf=crf))
    for name, verdicts in groups.items():
        lines.append(_group(name, verdicts))
        print(lines[-1], flush=True)

    pan = tq.camera_frames(photo, n=120, w=1280, h=720)
    big = {
        "720p 5 s: render, zoom-in": (OUT / "zoom-in-720p.mp4", "accepted"),
        "720p 5 s: pan at 300 kb/s (VBV)": (tq.encode_move(photo, OUT / "vbv.mp4", CameraMove.PAN_RIGHT, 2, w=1280,
                                            h=720, seconds=5.0, maxrate=300_000, bufsize=300_000), "accepted"),
        "720p 5 s: noise storm (sigma 30, 6 frames)": (
            tq.encode(tq._noise_storm(pan, at=range(50, 56)), OUT / "noise720.mp4"), "corruption"),
        "720p 5 s: block garbage (100 × 16 px, 3 frames)": (
            tq.encode(tq._block_garbage(pan, count=100, at=(40, 41, 80)), OUT / "garbage720.mp4"), "corruption"),
    }  # fmt: skip
    for name, (path, expected) in big.items():
        verdict = quality.judge(path, width=1280, height=720, fps=24, duration=5.0, source=photo)
        lines.append(_row(name, expected, verdict))
        print(lines[-1], flush=True)
    return lines


# --- main --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="timed runs (median; default 7)")
    parser.add_argument("--no-readme", action="store_true", help=f"do not rewrite '{SECTION}' in README")
    args = parser.parse_args()
    os.sched_setaffinity(0, {0})  # ffmpeg children inherit it
    cv2.setNumThreads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    photo = _tests().load_photo()
    load = os.getloadavg()[0]

    cost_lines, judged = cost(args.runs, photo)
    print("\n".join(cost_lines), flush=True)
    verdict = "met" if judged < GOAL else "**not met**"
    cost_lines += [
        "",
        f"Median of {args.runs} runs on CPU 0 only (1-min load average before: {load:.2f}); goal < {GOAL} s: "
        f"{verdict}. Clip: {(OUT / 'zoom-in-720p.mp4').stat().st_size / 2**20:.2f} MiB.",
    ]
    table = defect_set(photo)
    if not args.no_readme:
        _write_readme(cost_lines, table)


def _write_readme(cost_lines: list[str], table: list[str]) -> None:
    """Replace the results block inside this benchmark's README section."""
    legend = "**The defect set** (bold: a metric past its threshold that gave a reason):"
    block = "\n".join([START, "**Cost** (5 s 1280×720 clip, one core):", "", *cost_lines, "", legend, "", *table, END])
    text = README.read_text()
    if START not in text:
        raise SystemExit(f"{README} has no {START} marker")
    text = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    README.write_text(text)


if __name__ == "__main__":
    main()
