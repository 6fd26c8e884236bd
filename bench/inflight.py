"""In-flight capacity: how many generations one Celery worker holds while providers work, and at what cost.

    python bench/inflight.py                 # N = 1,000 (about 6 min)
    python bench/inflight.py --jobs 5000     # about 25 min

Scale-out path on this machine: a throwaway PostgreSQL database, Redis, animabot's own Celery worker
(prefork ``-c 2``: one parent and two pool processes) and beat, started as subprocesses. With the worker
running, N free jobs are submitted with ``worker.submit.submit`` (fake backend, 1 s clip, output long side
256, a 256×256 JPEG), each kicking the queue as a front end does. The worker does every job's first unit
(validate, classify, fit, route, then submit to the fake provider) and the job then waits as an
``attempts`` row that beat's poll task checks every ``poll_tick`` (interval growing with age up to
``poll_interval``, 5 s). Once all N attempts run and the youngest is past the 5 s cap, the worker tree's
memory (RSS from ``/proc/PID/status``, PSS from ``smaps_rollup``) and the CPU of every process involved
are sampled over a waiting window in which nothing is due to finish.

Every generation is made to outlast the run (fake latency 1 h by default, generation timeout and job
deadline raised to match): the first unit costs ~0.4 s of a pool process, so at 60 s per generation the
first ones would finish (and start post-processing) long before the N-th was submitted. What a waiting
generation costs does not depend on how long it lasts once it is past the 20 s after which its checks are
5 s apart.

For contrast, ``--blocking-demo`` (on by default, 25 s) runs a plain Celery worker whose task waits for its
generation in a poll loop (sleep, ask, sleep): 8 generations of 5 s on ``-c 2``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from celery import Celery

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jobsys

#: The contrast: a Celery app whose one task blocks its pool process until its generation is done.
blocking_app = Celery("blocking-demo")
blocking_app.conf.update(
    broker_url=os.environ.get("BENCH_BLOCKING_BROKER", "redis://127.0.0.1:6379/13"),
    task_default_queue="blocking", task_ignore_result=True, worker_prefetch_multiplier=1, task_acks_late=True,
    worker_hijack_root_logger=False,
)


@blocking_app.task(name="demo.generate")
def blocking_generate(latency: float) -> None:
    """Submit a generation, then sleep and ask until it is done: the pool process is held all along."""
    import redis

    start = time.time()
    due = start + latency  # what the fake provider's handle says
    while time.time() < due:  # "status?" → running
        time.sleep(0.25)
    redis.Redis.from_url(blocking_app.conf.broker_url).rpush("demo:spans", json.dumps([start, time.time()]))


MiB = 1024


def _submit_all(db: object, settings: object, n: int, picture: bytes) -> list[float]:
    from worker.celery import kick
    from worker.jobs import JobParams
    from worker.submit import submit

    took = []
    for i in range(n):
        t0 = time.perf_counter()
        submit(db, settings, image=picture, params=JobParams(prompt="gentle waves", duration=1, backend="fake"),
               kick=kick)
        took.append(time.perf_counter() - t0)
        if (i + 1) % 500 == 0:
            print(f"  submitted {i + 1}", flush=True)
    return took


def _count(db: object, sql: str) -> int:
    import sqlalchemy as sa

    with db.connect() as conn:  # type: ignore[attr-defined]
        return int(conn.scalar(sa.text(sql)) or 0)


def _lag(db: object) -> tuple[int, float]:
    """Running attempts whose check is overdue, and by how much the oldest is (seconds)."""
    import sqlalchemy as sa

    with db.connect() as conn:  # type: ignore[attr-defined]
        row = conn.execute(sa.text(
            "SELECT count(*), coalesce(extract(epoch FROM max(now() - next_poll_at)), 0) FROM attempts "
            "WHERE state = 'running' AND next_poll_at <= now()")).one()
    return int(row[0]), float(row[1])


def _memory(pid: int) -> dict[str, object]:
    procs = jobsys.tree(pid)
    return {
        "rss": sum(p.rss_kib() for p in procs), "pss": sum(p.pss_kib() for p in procs),
        "peak": sum(p.peak_rss_kib() for p in procs), "each": [p.rss_kib() for p in procs],
        "each_pss": [p.pss_kib() for p in procs],
    }


def _window(db: object, worker_pid: int, beat_pid: int, database: str, seconds: float) -> dict[str, object]:
    """Sample memory and the poll lag every second, and the CPU of everything involved, for ``seconds``."""
    groups = {"worker": lambda: jobsys.pool(worker_pid), "beat": lambda: jobsys.tree(beat_pid),
              "postgres": lambda: jobsys.pg_backends(database), "redis": jobsys.redis_server}
    samples, lags = [], []
    t_start = time.time()
    with jobsys.CpuMeter(groups) as meter:
        while time.time() - t_start < seconds:
            samples.append(_memory(worker_pid))
            lags.append(_lag(db))
            time.sleep(1.0)
    return {
        "cpu": meter.shares(), "wall": meter.wall, "t0": t_start, "t1": time.time(),
        "rss": max(s["rss"] for s in samples), "pss": max(s["pss"] for s in samples),  # type: ignore[type-var]
        "peak": samples[-1]["peak"], "each": samples[-1]["each"], "each_pss": samples[-1]["each_pss"],
        "overdue_max": max(n for n, _ in lags), "lag_max": max(s for _, s in lags),
    }


def _ready_pool(log: Path, concurrency: int) -> None:
    """Wait until every pool process has run a task, so each has built its runtime (imports, engine)."""
    from worker.celery import kick

    jobsys.wait_for(lambda: "ready." in log.read_text(), timeout=60, what="the worker")
    kick(2 * concurrency)  # "work" messages with nothing ready: a no-op unit in whichever process takes it
    jobsys.wait_for(lambda: len({ln.split("/")[1].split("]")[0] for ln in log.read_text().splitlines()
                                 if "ForkPoolWorker" in ln and "succeeded" in ln}) >= concurrency,
                    timeout=60, what="a task in every pool process")
    time.sleep(3)


def _polls(log: Path, window: dict[str, object]) -> dict[str, float]:
    runs = [r for r in jobsys.task_runs(log) if window["t0"] <= r[0] <= window["t1"]]  # type: ignore[operator]
    polls = [s for _, name, s in runs if name == "animabot.poll"]
    return {"polls": len(polls), "poll_seconds": sum(polls), "poll_max": max(polls, default=0.0),
            "other_tasks": len(runs) - len(polls)}


def capacity(n: int, *, window: float, latency: float, concurrency: int) -> dict[str, object]:
    """Run the in-flight measurement for ``n`` jobs; the figures.

    Worker A does the first units and is measured idle before, and waiting after; then it is stopped
    and a fresh worker B takes the N waiting generations over and is measured waiting: B's memory is
    what holding them costs, without what doing the media work left in A's heaps.
    """
    settings_env = dict(fake_latency=latency, output_long_side=256, generation_timeout=2 * latency,
                        job_deadline=3 * latency, worker_concurrency=concurrency)
    running_sql = "SELECT count(*) FROM attempts WHERE state = 'running'"
    with jobsys.scratch("inflight", redis_db=11, **settings_env) as run:
        from worker.db import init_db
        from worker.settings import Settings

        settings = Settings()
        db = init_db(settings)
        log_a, log_b = run.data_dir / "worker-a.log", run.data_dir / "worker-b.log"
        load_before = jobsys.load_average()
        beat = jobsys.start_beat(run.env, run.data_dir / "beat.log", run.data_dir / "beat-schedule")
        worker = jobsys.start_worker(run.env, log_a, concurrency=concurrency)
        try:
            _ready_pool(log_a, concurrency)
            idle = _window(db, worker.pid, beat.pid, run.database, 10.0)
            print(f"idle worker: RSS {idle['rss'] / MiB:.0f} MiB, PSS {idle['pss'] / MiB:.0f} MiB", flush=True)

            picture = jobsys.picture()
            t0 = time.monotonic()
            submit_s = _submit_all(db, settings, n, picture)
            submitted = time.monotonic() - t0
            print(f"submitted {n} in {submitted:.0f} s; waiting for all in flight", flush=True)
            ramp_lag, last = 0.0, 0.0
            while (running := _count(db, running_sql)) < n:
                failed = _count(db, "SELECT count(*) FROM jobs WHERE state IN ('failed', 'canceled')")
                if failed:
                    raise RuntimeError(f"{failed} jobs failed while going in flight; see {log_a}")
                if time.monotonic() - t0 > 10 + 2.0 * n:
                    raise TimeoutError(f"only {running} of {n} in flight after {time.monotonic() - t0:.0f} s")
                ramp_lag = max(ramp_lag, _lag(db)[1])
                if time.monotonic() - last > 30:
                    print(f"  {time.monotonic() - t0:5.0f} s: {running} in flight", flush=True)
                    last = time.monotonic()
                time.sleep(1.0)
            in_flight_after = time.monotonic() - t0
            print(f"all {n} in flight after {in_flight_after:.0f} s; settling 25 s", flush=True)
            time.sleep(25.0)  # the youngest attempt's checks reach the 5 s cap after 20 s
            worked = _window(db, worker.pid, beat.pid, run.database, window)
            worked |= _polls(log_a, worked)
            jobsys.stop(worker)
            print("worker A stopped; a fresh worker B takes over", flush=True)
            worker = jobsys.start_worker(run.env, log_b, concurrency=concurrency)
            _ready_pool(log_b, concurrency)
            time.sleep(10.0)
            fresh = _window(db, worker.pid, beat.pid, run.database, window)
            fresh |= _polls(log_b, fresh)
            still = _count(db, running_sql)
            stages = _stage_medians(db)
        finally:
            jobsys.stop(beat)
            jobsys.stop(worker)
            db.dispose()
        works = sorted(s for _, name, s in jobsys.task_runs(log_a) if name == "animabot.work")
    return {
        "n": n, "latency": latency, "concurrency": concurrency, "load_before": load_before,
        "idle": idle, "worked": worked, "fresh": fresh, "still_running": still, "submit": submit_s,
        "submitted_after": submitted, "in_flight_after": in_flight_after, "ramp_lag_max": ramp_lag,
        "work_units": len(works), "unit_median": jobsys.median(works), "stages": stages,
        "load_after": jobsys.load_average(),
    }


def _stage_medians(db: object) -> dict[str, float]:
    import sqlalchemy as sa

    with db.connect() as conn:  # type: ignore[attr-defined]
        rows = conn.execute(sa.text(
            "SELECT stage, percentile_cont(0.5) WITHIN GROUP (ORDER BY seconds) FROM job_stages GROUP BY stage"
        )).all()
    return {stage: float(s) for stage, s in rows}


def blocking_demo(*, generations: int = 8, latency: float = 5.0, concurrency: int = 2) -> dict[str, object]:
    """A plain Celery worker whose task blocks while it polls: how many generations it holds at once."""
    import redis

    broker = "redis://127.0.0.1:6379/13"
    client = redis.Redis.from_url(broker)
    client.flushdb()
    log = jobsys.OUT / "inflight-blocking.log"
    log.unlink(missing_ok=True)
    env = {**os.environ, "BENCH_BLOCKING_BROKER": broker, "PYTHONPATH": str(Path(__file__).resolve().parent)}
    worker = jobsys._spawn([sys.executable, "-m", "celery", "-A", "inflight:blocking_app", "worker", "-l", "info",
                            "-Q", "blocking", "-c", str(concurrency)], env, log)
    try:
        jobsys.wait_for(lambda: "ready." in log.read_text(), timeout=60, what="the blocking worker")
        blocking_app.conf.broker_url = broker
        t0 = time.time()
        for _ in range(generations):
            blocking_generate.delay(latency)
        jobsys.wait_for(lambda: client.llen("demo:spans") >= generations, timeout=generations * latency * 2,
                        what="the blocking generations")
        elapsed = time.time() - t0
        spans = [json.loads(s) for s in client.lrange("demo:spans", 0, -1)]
        procs = jobsys.tree(worker.pid)
        memory = [(p.rss_kib(), p.pss_kib()) for p in procs]
    finally:
        jobsys.stop(worker)
        client.flushdb()
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    level = most = 0
    for _, step in edges:
        level += step
        most = max(most, level)
    return {"generations": generations, "latency": latency, "concurrency": concurrency, "elapsed": elapsed,
            "max_in_flight": most, "memory": memory}


def report(r: dict[str, object], demo: dict[str, object] | None) -> None:
    """Print the figures as markdown."""
    idle, worked, fresh = r["idle"], r["worked"], r["fresh"]
    n = r["n"]
    sub = r["submit"]
    print()
    print(f"**N = {n:,}** (fake latency {r['latency']:g} s, Celery prefork -c {r['concurrency']} + beat, "
          f"1-min load average {r['load_before']:.2f} before, {r['load_after']:.2f} after)")
    print()
    print("| worker | in flight | RSS now, sum (parent, pool…) | PSS, sum (parent, pool…) | peak RSS (VmHWM) | "
          "CPU: worker | beat | PostgreSQL | Redis | poll tasks: n, busy | oldest overdue check |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = (("A, idle", idle, 0), ("A, after the first units", worked, n), ("B, fresh, took them over", fresh, n))
    for label, w, count in rows:
        c = w["cpu"]
        polls = f"{w['polls']}, {w['poll_seconds']:.1f} s" if "polls" in w else "–"
        each = ", ".join(f"{x / MiB:.0f}" for x in w["each"])
        print(f"| {label} | {count:,} | **{w['rss'] / MiB:.0f} MiB** ({each}) "
              f"| {w['pss'] / MiB:.0f} MiB ({', '.join(f'{x / MiB:.0f}' for x in w['each_pss'])}) "
              f"| {w['peak'] / MiB:.0f} MiB | **{100 * c['worker']:.1f} %** | {100 * c['beat']:.1f} % "
              f"| {100 * c['postgres']:.1f} % | {100 * c['redis']:.1f} % | {polls} | {w['lag_max']:.2f} s |")
    print()
    print(f"- per waiting generation (B minus idle A): {(fresh['pss'] - idle['pss']) / max(1, n):.1f} KiB of PSS, "
          f"{1000 * (fresh['cpu']['worker'] - idle['cpu']['worker']) / max(1, n):.3f} ms of worker CPU and "
          f"{1000 * (fresh['cpu']['postgres'] - idle['cpu']['postgres']) / max(1, n):.3f} ms of PostgreSQL CPU "
          "per second")
    print(f"- getting them in flight: submitted in {r['submitted_after']:.0f} s "
          f"(submit() p50 {1000 * jobsys.median(sub):.0f} ms, p99 {1000 * jobsys.pct(sub, 0.99):.0f} ms, "
          f"while the worker ran), all {n:,} running after {r['in_flight_after']:.0f} s "
          f"({n / r['in_flight_after']:.1f} jobs/s); first unit median {r['unit_median']:.3f} s of a pool process")
    st = r["stages"]
    prep = ("validate", "classify", "enhance", "route", "prompt")
    print("- first-unit stages (median s): " + ", ".join(f"{k} {st[k]:.3f}" for k in prep if k in st))
    print(f"- while going in flight the oldest overdue check waited {r['ramp_lag_max']:.0f} s "
          f"(poll messages queue behind the work messages); {r['still_running']:,} of {n:,} still running at the end")
    if demo:
        mem = demo["memory"]
        print(f"- blocking worker (-c {demo['concurrency']}): {demo['generations']} generations of "
              f"{demo['latency']:g} s took {demo['elapsed']:.1f} s, at most {demo['max_in_flight']} in flight; "
              f"its processes RSS/PSS " + ", ".join(f"{a / MiB:.0f}/{b / MiB:.0f}" for a, b in mem) + " MiB; "
              f"an idle animabot pool process is {idle['each_pss'][1] / MiB:.0f} MiB PSS, so 1,000 blocking slots "
              f"≈ {1000 * idle['each_pss'][1] / MiB / 1024:.0f} GiB")


def main() -> None:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000, help="generations to hold in flight")
    parser.add_argument("--window", type=float, default=30.0, help="waiting window, s")
    parser.add_argument("--latency", type=float, default=3600.0, help="fake provider latency, s")
    parser.add_argument("--concurrency", type=int, default=2, help="Celery pool processes")
    parser.add_argument("--no-blocking-demo", action="store_true", help="skip the blocking-worker contrast")
    args = parser.parse_args()
    demo = None if args.no_blocking_demo else blocking_demo()
    result = capacity(args.jobs, window=args.window, latency=args.latency, concurrency=args.concurrency)
    report(result, demo)


if __name__ == "__main__":
    main()
