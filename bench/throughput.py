"""Throughput and overhead: jobs per second from submit to a delivered result, and what the job system adds.

    python bench/throughput.py                      # about 4 min
    python bench/throughput.py --periodic-queue     # about 5 min: also the experiment below
    python bench/throughput.py --profile-only       # about 1.5 min: only runs 4 and 5 (no Celery)

Scale-out path on this machine: a throwaway PostgreSQL database, Redis, animabot's Celery worker (prefork
``-c 2``) and beat as subprocesses; this process is the front end. It submits jobs with
``worker.submit.submit`` (fake backend with latency 0, 1 s clips, output long side 256: the smallest legal
settings; free jobs; a 256×256 JPEG) and consumes the event stream with ``worker.events.consume``, which
confirms (acks) each event; a job is delivered when its ``succeeded`` event is acked.

An "instant" provider does not make a job free: every job still decodes and classifies the picture, fits
it, has the fake provider render a real 1 s H.264 clip, runs the quality gate on it, encodes it for
delivery and probes the result. So four runs:

1. *one at a time*: latency of an unloaded system, split into the pipeline stages (``job_stages.seconds``)
   and the rest, which is the job system (submit, queues, polls, bookkeeping, delivery);
2. *saturated, full pipeline*: many jobs submitted back to back, jobs/s and CPU per job by process;
3. *saturated, hollow pipeline*: the same with the media work replaced by stand-ins (a fixed classifier
   answer, a pre-made clip for the provider's output, an accepting gate, a copy for the encode, a fixed
   probe), in a worker started by this script: what the job system alone can do on 2 cores;
4. *profile*: the hollow pipeline in this process under cProfile (embedded-style loop on PostgreSQL):
   SQL statements, transactions and pool checkouts per job, and where the job system's time goes;
5. *backlog* (``--backlog N``, default 5,000; 0 skips it): ``submit()`` timed for 200 calls on a short queue,
   then again once N jobs are queued (no worker running, so they stay queued).

``--periodic-queue`` adds an experiment: the hollow run again with beat's poll and reap tasks routed to a
queue of their own that the worker also consumes (``task_routes`` set by this script in the worker and
beat it starts, nothing changed in ``worker/``), so that polls no longer wait behind every queued work
message.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
import os
import pstats
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jobsys

PARAMS = {"prompt": "gentle waves", "duration": 1, "backend": "fake"}
PERIODIC_QUEUE = "animabot.periodic"
PREP = ("validate", "classify", "enhance", "route", "prompt")
FINISH = ("check", "post-process", "encode", "store")


# -- the hollow pipeline -----------------------------------------------------------------------------


def make_clip(path: Path) -> None:
    """The stand-in provider output: a real 1 s 256×256 24 fps H.264 clip of the test picture."""
    import io

    import numpy as np
    from PIL import Image

    from backends import animator
    from backends.base import CameraMove

    pixels = np.asarray(Image.open(io.BytesIO(jobsys.picture())).convert("RGB"))
    animator.render(pixels, path, camera=CameraMove.ZOOM_IN, motion=2, duration=1.0, fps=24, width=256, height=256)


def hollow(clip: Path) -> None:
    """Replace the media work by stand-ins; what is left is the job system (and a 256 px JPEG decode and fit)."""
    from backends import fake, video
    from worker import encode, quality, subject

    info = video.probe(clip, count=False)

    def classify(image: object) -> subject.Subject:
        return subject.Subject(kind="other", confidence=1.0)

    def render(req: dict[str, Any], out: Path, outcome: str) -> None:
        shutil.copyfile(clip, out)

    def judge(*args: object, **kwargs: object) -> quality.Verdict:
        return quality.Verdict(accepted=True, score=0.9)

    def fit_to_limit(src: Path, dst: Path, *, limit_bytes: int, **_: object) -> encode.EncodeReport:
        shutil.copyfile(src, dst)
        return encode.EncodeReport(path=Path(dst), bytes=Path(dst).stat().st_size, limit=limit_bytes, method="remux")

    def probe(path: str | os.PathLike[str], *, count: bool = True) -> video.VideoInfo:
        return dataclasses.replace(info, bytes=Path(path).stat().st_size)

    subject.classify = classify
    fake.FakeBackend._render = staticmethod(render)  # type: ignore[method-assign]
    quality.judge = judge
    encode.fit_to_limit = fit_to_limit
    video.probe = probe


def route_periodic(app: Any) -> None:
    """The experiment ``--periodic-queue``: polls and the reaper on a queue of their own, not behind work."""
    from worker import celery

    app.conf.task_routes = {name: {"queue": PERIODIC_QUEUE} for name in (celery.POLL, celery.REAP, celery.DAILY)}


def hollow_worker(argv: list[str]) -> None:
    """``python bench/throughput.py --hollow-worker worker -l info …``: a Celery worker on the hollow pipeline."""
    hollow(Path(os.environ["BENCH_HOLLOW_CLIP"]))
    from worker.celery import app

    if os.environ.get("BENCH_PERIODIC_QUEUE"):
        route_periodic(app)
    app.worker_main(argv)


def celery_main(argv: list[str]) -> None:
    """``python bench/throughput.py --celery beat …``: animabot's Celery app (routed as the experiment asks)."""
    from worker.celery import app

    if os.environ.get("BENCH_PERIODIC_QUEUE"):
        route_periodic(app)
    app.start(argv)


# -- the front end -----------------------------------------------------------------------------------


class FrontEnd:
    """Submits jobs and consumes the event stream in a thread of its own, as ``animabot run`` does."""

    def __init__(self, db: Any, settings: Any, picture: bytes) -> None:
        self.db, self.settings, self.picture = db, settings, picture
        self.final: dict[int, tuple[str, float]] = {}
        self.submitted: dict[int, tuple[float, float]] = {}  # job id → (start, seconds the call took)
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._consume(),), daemon=True)
        self._thread.start()

    async def _consume(self) -> None:
        from worker import events

        self._stop = asyncio.Event()

        async def handle(event: events.JobEvent) -> None:
            if event.final:
                self.final[event.job_id] = (event.kind, time.time())

        await events.consume(self.db, handle, stop=self._stop)

    def submit(self, kick: Any) -> int:
        """Submit one job; its id."""
        from worker.jobs import JobParams
        from worker.submit import submit

        t0 = time.time()
        c0 = time.perf_counter()
        receipt = submit(self.db, self.settings, image=self.picture, params=JobParams(**PARAMS), kick=kick)
        self.submitted[receipt.job_id] = (t0, time.perf_counter() - c0)
        return receipt.job_id

    def wait(self, ids: list[int], timeout: float) -> None:
        """Until every job in ``ids`` has had its final event handled (the ack follows at once)."""
        jobsys.wait_for(lambda: all(i in self.final for i in ids), timeout=timeout, every=0.02,
                        what=f"{len(ids)} jobs delivered")

    def close(self) -> None:
        """Stop consuming."""
        while self._stop is None:
            time.sleep(0.01)
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join()


def breakdown(db: Any, front: FrontEnd, ids: list[int]) -> list[dict[str, float]]:
    """Per job: end to end, submit call, stage times and the gaps between them, from the database."""
    import sqlalchemy as sa

    out = []
    with db.connect() as conn:
        for job_id in ids:
            stages = conn.execute(sa.text(
                "SELECT stage, seconds, extract(epoch FROM started_at) FROM job_stages WHERE job_id = :j ORDER BY id"
            ), {"j": job_id}).all()
            job = conn.execute(sa.text(
                "SELECT state, extract(epoch FROM started_at), extract(epoch FROM finished_at) FROM jobs WHERE id = :j"
            ), {"j": job_id}).one()
            acked = conn.scalar(sa.text(
                "SELECT extract(epoch FROM delivered_at) FROM events WHERE job_id = :j AND kind = 'succeeded'"
            ), {"j": job_id})
            if job[0] != "succeeded" or acked is None:
                raise RuntimeError(f"job {job_id} ended {job[0]}")
            by = {stage: (float(sec), float(at)) for stage, sec, at in stages}
            start, call = front.submitted[job_id]
            gen_sec, gen_at = by["generate"]
            row = {
                "e2e": float(acked) - start,
                "submit": call,
                "queue": float(job[1]) - (start + call),
                "prep": sum(by[s][0] for s in PREP),
                "poll_wait": gen_sec,
                "collect": by["check"][1] - (gen_at + gen_sec),
                "finish": sum(by[s][0] for s in FINISH),
                "deliver": float(acked) - float(job[2]),
                "stages": sum(sec for stage, (sec, _) in by.items() if stage != "generate"),
                **{stage: sec for stage, (sec, _) in by.items()},
            }
            row["other"] = row["e2e"] - row["stages"] - row["collect"]
            row["rest"] = row["other"] - row["submit"] - row["queue"] - row["poll_wait"] - row["deliver"]
            row["started"] = float(job[1])
            out.append(row)
    return out


# -- the runs ----------------------------------------------------------------------------------------


def saturated(front: FrontEnd, kick: Any, n: int, meter_groups: dict[str, Any]) -> dict[str, Any]:
    """Submit ``n`` jobs back to back and wait for all; rate, CPU per job by process group."""
    with jobsys.CpuMeter(meter_groups) as meter:
        t0 = time.time()
        ids = [front.submit(kick) for _ in range(n)]
        submitted = time.time() - t0
        front.wait(ids, timeout=60 + 10 * n)
    done = sorted(front.final[i][1] for i in ids)
    return {
        "n": n, "ids": ids, "submitted_in": submitted, "span": done[-1] - t0, "t0": t0, "first_done": done[0] - t0,
        "rate": n / (done[-1] - t0),
        "cpu": meter.seconds(), "wall": meter.wall, "submit": [front.submitted[i][1] for i in ids],
    }


def one_at_a_time(front: FrontEnd, kick: Any, n: int) -> list[int]:
    """``n`` jobs, each submitted once the previous one is delivered."""
    ids = []
    for _ in range(n):
        job_id = front.submit(kick)
        front.wait([job_id], timeout=120)
        ids.append(job_id)
    return ids


def with_worker(run: Any, name: str, fn: Any, *, hollow_pipeline: bool = False, periodic_queue: bool = False,
                ) -> tuple[Any, Path]:
    """Run ``fn(worker_pid, beat_pid)`` with a fresh worker and beat; its result and the worker's log."""
    log = run.data_dir / f"{name}.log"
    env = {**run.env, **({"BENCH_PERIODIC_QUEUE": "1"} if periodic_queue else {})}
    here = [sys.executable, __file__]
    beat = jobsys.start_beat(env, run.data_dir / f"{name}-beat.log", run.data_dir / f"{name}-beat-schedule",
                             argv=[*here, "--celery"] if periodic_queue else None)
    worker = jobsys.start_worker(env, log, argv=[*here, "--hollow-worker"] if hollow_pipeline else None,
                                 queues=f"animabot,{PERIODIC_QUEUE}")
    try:
        jobsys.wait_for(lambda: "ready." in log.read_text(), timeout=60, what="the worker")
        time.sleep(2.0)
        return fn(worker.pid, beat.pid), log
    finally:
        jobsys.stop(beat)
        jobsys.stop(worker)


def profile_hollow(db: Any, settings: Any, picture: bytes, n: int) -> dict[str, Any]:
    """The hollow pipeline in this process, embedded-style, under cProfile; statements and transactions."""
    import sqlalchemy as sa

    from worker.jobs import JobParams
    from worker.runner import Worker
    from worker.submit import submit

    counts = {"statements": 0, "commits": 0, "checkouts": 0}

    def on_execute(*_: object) -> None:
        counts["statements"] += 1

    def on_commit(*_: object) -> None:
        counts["commits"] += 1

    def on_checkout(*_: object) -> None:
        counts["checkouts"] += 1

    sa.event.listen(db, "before_cursor_execute", on_execute)
    sa.event.listen(db, "commit", on_commit)
    sa.event.listen(db.pool, "checkout", on_checkout)
    submit_counts = dict(counts)
    ids = [submit(db, settings, image=picture, params=JobParams(**PARAMS)).job_id for _ in range(n)]
    submit_counts = {k: (counts[k] - submit_counts[k]) / n for k in counts}
    before = dict(counts)
    worker = Worker(db, settings)

    async def drive() -> None:
        with db.connect() as conn:
            left = lambda: conn.scalar(sa.text("SELECT count(*) FROM jobs WHERE state <> 'succeeded'"))  # noqa: E731
            while True:
                while await worker.work_once() is not None:
                    pass
                await worker.poll_due()
                conn.commit()
                if not left():
                    break
                await asyncio.sleep(0.01)

    profiler = cProfile.Profile()
    t0, c0 = time.perf_counter(), time.process_time()
    profiler.enable()
    asyncio.run(drive())
    profiler.disable()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    work_counts = {k: (counts[k] - before[k]) / n for k in counts}
    sa.event.remove(db, "before_cursor_execute", on_execute)
    sa.event.remove(db, "commit", on_commit)
    sa.event.remove(db.pool, "checkout", on_checkout)
    ids += [submit(db, settings, image=picture, params=JobParams(**PARAMS)).job_id for _ in range(n)]
    t0, c0 = time.perf_counter(), time.process_time()
    asyncio.run(drive())  # the same again without the profiler
    plain_wall, plain_cpu = time.perf_counter() - t0, time.process_time() - c0
    stats = pstats.Stats(profiler)
    return {"n": n, "ids": ids, "wall": wall, "cpu": cpu, "plain_wall": plain_wall, "plain_cpu": plain_cpu,
            "stats": stats, "submit_counts": submit_counts,
            "work_counts": work_counts, "worker_stats": worker.stats}


def statement_sources(db: Any, settings: Any, picture: bytes, n: int) -> dict[str, float]:
    """SQL statements per job by the ``worker/`` function that issued them (hollow pipeline, in this process)."""
    import collections
    import traceback

    import sqlalchemy as sa

    from worker.jobs import JobParams
    from worker.runner import Worker
    from worker.submit import submit

    by: collections.Counter[str] = collections.Counter()

    def on_execute(*_: object) -> None:
        for frame in reversed(traceback.extract_stack()):
            if "/worker/" in frame.filename and "/site-packages/" not in frame.filename:
                by[f"{Path(frame.filename).stem}.{frame.name}"] += 1
                return
        by["(other)"] += 1

    ids = {submit(db, settings, image=picture, params=JobParams(**PARAMS)).job_id for _ in range(n)}
    worker = Worker(db, settings)

    async def drive() -> None:
        while True:
            while await worker.work_once() is not None:
                pass
            await worker.poll_due()
            with db.connect() as conn:
                if not conn.scalar(sa.text("SELECT count(*) FROM jobs WHERE state <> 'succeeded'")):
                    return
            await asyncio.sleep(0.01)

    sa.event.listen(db, "before_cursor_execute", on_execute)
    try:
        asyncio.run(drive())
    finally:
        sa.event.remove(db, "before_cursor_execute", on_execute)
    by.pop("(other)", None)  # the loop's own "anything left?" query
    assert ids
    return {name: count / n for name, count in by.most_common()}


def _cum(stats: pstats.Stats, match: Any) -> float:
    """Largest cumulative time of the functions ``match(file, name)`` accepts (callers include callees)."""
    total = 0.0
    for (file, _, name), (_, _, _, ct, _) in stats.stats.items():  # type: ignore[attr-defined]
        if match(file, name):
            total = max(total, ct)
    return total


def _own(stats: pstats.Stats, match: Any) -> float:
    """Summed own (exclusive) time of the functions ``match(file, name)`` accepts."""
    return sum(tt for (file, _, name), (_, _, tt, _, _) in stats.stats.items()  # type: ignore[attr-defined]
               if match(file, name))


def main() -> None:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serial", type=int, default=20, help="jobs run one at a time")
    parser.add_argument("--full", type=int, default=80, help="jobs in the saturated full-pipeline run")
    parser.add_argument("--hollow", type=int, default=400, help="jobs in the saturated hollow run")
    parser.add_argument("--profile", type=int, default=100, help="jobs in the profiled in-process run")
    parser.add_argument("--periodic-queue", action="store_true",
                        help="also run the hollow pipeline with polls and the reaper on a queue of their own")
    parser.add_argument("--backlog", type=int, default=5000,
                        help="queued jobs under which submit() is timed last (0: skip that measurement)")
    parser.add_argument("--profile-only", action="store_true",
                        help="only the in-process profile and the backlog submits (no Celery runs; about 1.5 min)")
    args = parser.parse_args()
    if args.serial < 1:
        parser.error("--serial must be at least 1")

    settings_env = dict(fake_latency=0, output_long_side=256)
    with jobsys.scratch("throughput", redis_db=12, **settings_env) as run:
        from worker.celery import kick
        from worker.db import init_db
        from worker.settings import Settings

        settings = Settings()
        db = init_db(settings)
        picture = jobsys.picture()
        clip = run.data_dir / "hollow.mp4"
        make_clip(clip)
        run.env["BENCH_HOLLOW_CLIP"] = str(clip)
        load_before = jobsys.load_average()
        front = FrontEnd(db, settings, picture)

        def groups(worker_pid: int, beat_pid: int) -> dict[str, Any]:
            return {"worker": lambda: jobsys.pool(worker_pid), "beat": lambda: jobsys.tree(beat_pid),
                    "postgres": lambda: jobsys.pg_backends(run.database), "redis": jobsys.redis_server,
                    "front end": lambda: [jobsys.Proc(os.getpid())]}

        def full(worker_pid: int, beat_pid: int) -> dict[str, Any]:
            front.submit(kick)  # warm-up: both pool processes build their runtime
            front.submit(kick)
            front.wait(list(front.submitted), timeout=120)
            print("one at a time…", flush=True)
            serial = one_at_a_time(front, kick, args.serial)
            print(f"saturated, full pipeline: {args.full} jobs…", flush=True)
            return {"serial": serial, "sat": saturated(front, kick, args.full, groups(worker_pid, beat_pid))}

        def hollow_run(worker_pid: int, beat_pid: int) -> dict[str, Any]:
            print(f"saturated, hollow pipeline: {args.hollow} jobs…", flush=True)
            warm = [front.submit(kick), front.submit(kick)]
            front.wait(warm, timeout=120)
            serial = one_at_a_time(front, kick, max(1, args.serial // 2))
            return {"serial": serial, "sat": saturated(front, kick, args.hollow, groups(worker_pid, beat_pid))}

        runs: list[tuple[str, dict[str, Any]]] = []
        rows: Rows = {}
        try:
            if not args.profile_only:
                res_full, _ = with_worker(run, "full", full)
                res_hollow, _ = with_worker(run, "hollow", hollow_run, hollow_pipeline=True)
                runs = [("full (smallest legal settings)", res_full), ("hollow (media stand-ins)", res_hollow)]
                if args.periodic_queue:
                    print("experiment: polls on a queue of their own…", flush=True)
                    res_routed, _ = with_worker(run, "routed", hollow_run, hollow_pipeline=True, periodic_queue=True)
                    runs.append(("hollow, polls on their own queue", res_routed))
            front.close()
            rows = {label: (breakdown(db, front, res["serial"]), breakdown(db, front, res["sat"]["ids"]))
                    for label, res in runs}
            print(f"profile: hollow pipeline in this process, {args.profile} jobs…", flush=True)
            hollow(clip)
            prof = profile_hollow(db, settings, picture, args.profile)
            prof["sources"] = statement_sources(db, settings, picture, 20)
            if args.backlog:
                print(f"submit() with up to {args.backlog} jobs queued (no worker running)…", flush=True)
                prof["backlog"] = backlog_submits(db, settings, picture, args.backlog)
        finally:
            db.dispose()
        load_after = jobsys.load_average()
    report(runs, rows, prof, load_before, load_after)


def backlog_submits(db: Any, settings: Any, picture: bytes, n: int, *, timed: int = 200) -> dict[str, Any]:
    """submit() call times with an empty queue (the first ``timed`` calls) and with ``n`` jobs queued.

    No worker runs, so every job stays queued; they are free jobs (the operator's), each its own member in
    the fair order. The backlog is ``n`` jobs, then ``timed`` more calls are timed on top of it.
    """
    import sqlalchemy as sa

    from worker.jobs import JobParams
    from worker.submit import submit

    with db.connect() as conn:
        already = conn.scalar(sa.text("SELECT count(*) FROM jobs WHERE state = 'queued'"))
    took = []
    for i in range(n + timed):
        t0 = time.perf_counter()
        submit(db, settings, image=picture, params=JobParams(**PARAMS))
        took.append(time.perf_counter() - t0)
        if (i + 1) % 1000 == 0:
            print(f"  {i + 1} queued", flush=True)
    return {"already": already, "n": n, "quiet": took[:timed], "loaded": took[n:]}


Rows = dict[str, tuple[list[dict[str, float]], list[dict[str, float]]]]


def report(runs: list[tuple[str, dict[str, Any]]], rows: Rows, prof: dict[str, Any], load_before: float,
           load_after: float) -> None:
    """Print the figures as markdown."""
    print()
    print(f"1-min load average {load_before:.2f} before, {load_after:.2f} after")
    if runs:
        report_runs(runs, rows)
    report_profile(prof)


def report_runs(runs: list[tuple[str, dict[str, Any]]], rows: Rows) -> None:
    """The Celery runs: throughput, CPU per job, latency split, submit() times."""
    med, pct = jobsys.median, jobsys.pct

    def ms(x: float) -> str:
        return f"{1000 * x:.0f} ms"

    print()
    print("**Throughput** (saturated: all jobs submitted back to back, until the last is delivered; the ceiling is "
          "2 cores / total CPU per job):")
    print()
    print("| pipeline | jobs | span | jobs/s | cores used | CPU s per job: worker | PostgreSQL | beat | Redis "
          "| front end | total | ceiling on 2 free cores |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, res in runs:
        sat = res["sat"]
        cpu = {k: v / sat["n"] for k, v in sat["cpu"].items()}
        total = sum(cpu.values())
        print(f"| {label} | {sat['n']} | {sat['span']:.0f} s | **{sat['rate']:.2f}** "
              f"| {total * sat['n'] / sat['span']:.2f} | {cpu['worker']:.3f} | {cpu['postgres']:.3f} "
              f"| {cpu['beat']:.3f} | {cpu['redis']:.3f} | {cpu['front end']:.3f} | {total:.3f} "
              f"| **{2 / total:.1f} jobs/s** |")
    print()
    print("**Latency** (medians; `other` = end to end minus stage seconds and collect):")
    print()
    cols = ("e2e", "stages", "collect", "other", "submit", "queue", "poll_wait", "deliver", "rest")
    print("| pipeline | jobs | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for label, _ in runs:
        for mode, part in (("one at a time", rows[label][0]), ("saturated", rows[label][1])):
            print(f"| {label}, {mode} | {len(part)} | "
                  + " | ".join(ms(med([r[c] for r in part])) for c in cols) + " |")
    print()
    stage_names = (*PREP, "generate", *FINISH)
    serial_full = rows[runs[0][0]][0]
    print("Stage medians, full pipeline one at a time: " + ", ".join(
        f"{s} {ms(med([r.get(s, 0.0) for r in serial_full]))}" for s in stage_names))
    print()
    for label, res in runs:
        sat = rows[label][1]
        last_start = max(r["started"] for r in sat) - res["sat"]["t0"]
        print(f"- saturated {label}: first delivery after {res['sat']['first_done']:.1f} s, last job started "
              f"(first unit) after {last_start:.1f} s, last delivery after {res['sat']['span']:.1f} s")
    for label, res in runs:
        sub = res["sat"]["submit"]
        print(f"- submit() under load ({label}, {len(sub)} calls): p50 {ms(med(sub))}, p99 {ms(pct(sub, 0.99))}, "
              f"max {ms(max(sub))}; submitted in {res['sat']['submitted_in']:.1f} s")
    ser = [r["submit"] for label, _ in runs for r in rows[label][0]]
    print(f"- submit() one at a time ({len(ser)} calls): p50 {ms(med(ser))}, p99 {ms(pct(ser, 0.99))}")


def report_profile(prof: dict[str, Any]) -> None:
    """The in-process profile of the hollow pipeline, and submit() under a backlog."""
    med, pct = jobsys.median, jobsys.pct

    def ms(x: float) -> str:
        return f"{1000 * x:.0f} ms"

    if "backlog" in prof:
        b = prof["backlog"]
        print()
        print(f"- submit() with {b['already']}–{b['already'] + len(b['quiet']) - 1} queued ({len(b['quiet'])} calls): "
              f"p50 {ms(med(b['quiet']))}, p99 {ms(pct(b['quiet'], 0.99))}; with {b['already'] + b['n']}–"
              f"{b['already'] + b['n'] + len(b['loaded']) - 1} queued ({len(b['loaded'])} calls): "
              f"p50 {ms(med(b['loaded']))}, p99 {ms(pct(b['loaded'], 0.99))}, max {ms(max(b['loaded']))}")
    print()
    stats: pstats.Stats = prof["stats"]
    n = prof["n"]
    total = prof["wall"]
    sql = _cum(stats, lambda f, name: f.endswith("sqlalchemy/engine/base.py") and name == "_execute_context")
    wait = _own(stats, lambda f, name: "psycopg" in f and name in ("wait", "wait_conn", "wait_epoll", "wait_select"))
    wait += _own(stats, lambda f, name: name in ("<method 'poll' of 'select.epoll' objects>",
                                                 "<method 'select' of 'select.epoll' objects>"))
    print(f"**Profile** (hollow pipeline, {n} jobs in this process, embedded-style loop on PostgreSQL): "
          f"{prof['plain_wall'] / n * 1000:.1f} ms wall and {prof['plain_cpu'] / n * 1000:.1f} ms CPU per job "
          f"(under cProfile {total / n * 1000:.1f} and {prof['cpu'] / n * 1000:.1f}); "
          f"{prof['work_counts']['statements']:.1f} SQL statements, {prof['work_counts']['commits']:.1f} "
          f"commits and {prof['work_counts']['checkouts']:.1f} pool checkouts per job in the worker, "
          f"{prof['submit_counts']['statements']:.1f}, {prof['submit_counts']['commits']:.1f} and "
          f"{prof['submit_counts']['checkouts']:.1f} in submit(). Engine executes {sql / n * 1000:.1f} ms per job.")
    print()
    print("SQL statements per job by caller: " + ", ".join(f"{name} {k:.1f}" for name, k in prof["sources"].items()))
    print()
    print("Top job-system functions by cumulative time (per job):")
    print()
    funcs = []
    for (file, line, name), (_, nc, tt, ct, _) in stats.stats.items():  # type: ignore[attr-defined]
        if "/worker/" in file and "/site-packages/" not in file:
            funcs.append((ct, nc, tt, f"{Path(file).parent.name}/{Path(file).name}:{line}({name})"))
    print("| function | calls per job | cumulative ms per job | own ms per job |")
    print("|---|---|---|---|")
    for ct, nc, tt, label in sorted(funcs, reverse=True)[:25]:
        print(f"| `{label}` | {nc / n:.1f} | {ct / n * 1000:.2f} | {tt / n * 1000:.2f} |")
    print()
    print(f"(wait-for-server time in the profile: {wait / n * 1000:.1f} ms per job)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--hollow-worker":
        hollow_worker(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "--celery":
        celery_main(sys.argv[2:])
    else:
        main()
