"""Provider delivery latency, webhook vs polling, and how many remote generations one worker holds in flight.

    python bench/provider_latency.py                               # latency, Replicate and fal: about 4.5 min
    python bench/provider_latency.py --providers none --inflight 500    # in flight: about 2.5 min
    python bench/provider_latency.py --providers replicate --jobs 40 --side 720

**Latency.** Embedded mode as ``animabot run`` runs it (``bot.serve.run``: the embedded runtime's work, poll
and reap loops plus the web endpoint, SQLite, production timings: ``poll_tick`` 1 s, ``poll_interval`` 5 s,
``worker_concurrency`` 2) in this process; the provider is an emulator (``tests/emulators``) in a subprocess
of its own, so its CPU is not ours. Each provider runs twice: *webhook* (``public_url`` set: the provider
calls the web endpoint when it finishes; polls still run, as the backstop they are in production) and
*polling* (no public URL). One warm-up job (a 1 s generation), then ``--jobs`` jobs submitted
``--interval`` seconds apart; the i-th generation takes ``--latency`` + i × 5 s / (jobs + 1) at the
provider: long enough that its checks are ``poll_interval`` apart, as for a real generation of minutes,
finishing one at a time, and at moments spread evenly over the 5 s poll cycle, so that polling shows its
whole range of delays. Clips are 5 s of ``--side`` × ``--side`` px at 24 fps (Kling's length and rate),
``output_long_side`` the same. Per job:

- *finished*: the provider marks it done (Replicate emulator: ``created + start_delay + latency``; fal
  emulator: when a scheduler in the emulator process completes the request, which also sends its webhook);
- *noticed*: the attempt is marked ready (``Pipeline.mark_ready``, by the webhook or a poll), then *picked
  up* when a work loop starts the job's next unit (``Pipeline.advance``);
- *download + probe*: the backend's ``result()``; *quality gate*: the ``check`` stage;
- *post-processing event*: the job's ``post-processing`` event (``events.created_at``): the clip is
  downloaded, probed and accepted; what remains is post-processing, encoding and storing;
- *succeeded event*: the clip is stored and announced.

"excl. post-processing" is *finished → post-processing event*. Jobs are free (no member), Kling on each
provider, the astronaut picture (a portrait). Raw figures: ``bench/out/provider_latency.json``.

**In flight.** ``--inflight N`` free jobs to the Replicate emulator, whose generations take an hour, in one
embedded process with polling only (a 128 px picture without faces, output long side 256: the first unit of
each job is the real one, only cheap). Once all N run and the youngest is past 20 s (every check is then
``poll_interval`` apart), the process's RSS (``/proc/self/status``), its CPU (``getrusage``) and the status
checks it makes (``Pipeline.poll`` calls) are measured over ``--window`` seconds of waiting.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

OUT = REPO / "bench" / "out"
PICTURE = REPO / "bot" / "assets" / "astronaut.png"
MODELS = {"replicate": "kwaivgi/kling-v2.1", "fal": "fal-ai/kling-video/v2.1/standard/image-to-video"}
SECRET = "provider-latency-bench"


# -- the emulator process ----------------------------------------------------------------------------


async def serve_emulator(kind: str, latency: float, step: float, side: int, out: Path) -> None:
    """Run one provider emulator until stdin closes; then write when each generation finished to ``out``.

    The ``i``-th generation takes ``latency + i × step`` seconds: they finish in the order they started,
    ``step`` further apart than they were submitted, and at moments spread evenly across the poll cycle.
    The first one (the warm-up job's) takes 1 s.
    """
    sys.path.append(str(REPO / "tests"))  # appended: tests/migrations must not shadow the real package
    from emulators.fal_api import FalEmulator
    from emulators.replicate_api import ReplicateEmulator

    clip = {"clip_size": (side, side), "clip_seconds": 5.0, "clip_fps": 24}
    started = itertools.count()
    finished: dict[str, float] = {}
    gpu = None
    if kind == "replicate":
        emu: Any = ReplicateEmulator(start_delay=0.5, latency=latency, **clip)
        create = emu._create

        async def spread(*args: Any) -> Any:
            i = next(started)
            emu.latency = latency + i * step if i else 1.0  # the first is the warm-up job
            return await create(*args)

        emu._create = spread
        await emu.start()
        hello = {"token": emu.token, "url": emu.base_url}
    else:
        emu = FalEmulator(**clip)
        emu.queue_positions, emu.running_polls = (), 100_000  # polls never finish a request: the "GPU" below does
        await emu.start()
        hello = {"key": emu.key, "url": emu.base_url, "jwks": emu.jwks_url}

        async def run_gpu() -> None:
            due: dict[str, float] = {}
            while True:
                now = time.time()
                for job in list(emu.jobs.values()):
                    if job.id not in due:
                        i = next(started)
                        due[job.id] = now + (latency + i * step if i else 1.0)
                    if not job.completed and not job.canceled and now >= due[job.id]:
                        finished[job.id] = time.time()
                        await emu.finish(job.id)
                await asyncio.sleep(0.005)

        gpu = asyncio.create_task(run_gpu())
    print(json.dumps(hello), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    if gpu is not None:
        gpu.cancel()
    if kind == "replicate":
        finished = {p.id: p.created_wall + p.start_delay + p.latency for p in emu.predictions.values()}
        polls = sum(1 for c in emu.calls if c.method == "GET" and c.path.startswith("/v1/predictions/"))
    else:
        polls = emu.count("GET", r"/status$")
    await emu.stop()
    out.write_text(json.dumps({"finished": finished, "polls": polls}))


class Emulator:
    """A provider emulator in a subprocess of this script."""

    def __init__(self, kind: str, *, latency: float, step: float = 0.0, side: int, workdir: Path) -> None:
        self.kind = kind
        self.report = workdir / f"{kind}-emulator.json"
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--emulator", kind, "--latency", str(latency), "--step", str(step),
             "--side", str(side), "--report", str(self.report)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
        )
        assert self.proc.stdout is not None
        self.hello = json.loads(self.proc.stdout.readline())

    def settings(self) -> dict[str, Any]:
        """The animabot settings that point the backend at this emulator."""
        if self.kind == "replicate":
            return {"replicate_api_token": self.hello["token"], "replicate_base_url": self.hello["url"]}
        return {"fal_key": self.hello["key"], "fal_queue_url": self.hello["url"], "fal_jwks_url": self.hello["jwks"]}

    def close(self) -> dict[str, Any]:
        """Stop it; what it reports: ``finished`` (provider id → epoch seconds) and ``polls``."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        return json.loads(self.report.read_text())


# -- animabot in this process --------------------------------------------------------------------------


class Probe:
    """Instrumentation: when each attempt was marked ready, which ones a webhook ended, how many polls ran."""

    def __init__(self) -> None:
        from backends.fal import FalBackend
        from backends.replicate import ReplicateBackend
        from worker.pipeline import Pipeline
        from worker.runner import Worker

        self.reset()
        probe = self
        mark_ready, poll, webhook, advance = Pipeline.mark_ready, Pipeline.poll, Worker.webhook, Pipeline.advance

        async def noted_advance(pipeline: Pipeline, job_id: int, **kw: Any) -> Any:
            probe.units.setdefault(job_id, []).append(time.time())
            return await advance(pipeline, job_id, **kw)

        def timed_result(result: Any) -> Any:
            async def timed(backend: Any, handle: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return await result(backend, handle)
                finally:
                    probe.fetch[handle.id] = time.perf_counter() - t0
            return timed

        Pipeline.advance = noted_advance  # type: ignore[method-assign]
        for cls in (ReplicateBackend, FalBackend):
            cls.result = timed_result(cls.result)  # type: ignore[method-assign]

        def timed_mark_ready(pipeline: Pipeline, attempt_id: int, report: dict[str, Any]) -> int | None:
            job_id = mark_ready(pipeline, attempt_id, report)
            if job_id is not None:
                probe.ready.setdefault(attempt_id, time.time())
            return job_id

        async def counted_poll(pipeline: Pipeline, attempt: Any) -> Any:
            probe.polls += 1
            return await poll(pipeline, attempt)

        async def noted_webhook(worker: Worker, backend: str, headers: Any, body: bytes, **kw: Any) -> str:
            outcome = await webhook(worker, backend, headers, body, **kw)
            if outcome == "ended" and kw.get("attempt_id") is not None:
                probe.by_webhook.add(kw["attempt_id"])
            return outcome

        Pipeline.mark_ready = timed_mark_ready  # type: ignore[method-assign]
        Pipeline.poll = counted_poll  # type: ignore[method-assign]
        Worker.webhook = noted_webhook  # type: ignore[method-assign]

    def reset(self) -> None:
        """Forget what was recorded (one probe serves every run of the process)."""
        self.ready: dict[int, float] = {}
        self.by_webhook: set[int] = set()
        self.units: dict[int, list[float]] = {}
        self.fetch: dict[str, float] = {}
        self.polls = 0


def picture(side: int) -> bytes:
    """The astronaut (a portrait) at ``side`` × ``side`` px, as PNG."""
    from PIL import Image

    buf = io.BytesIO()
    with Image.open(PICTURE) as im:
        im.convert("RGB").resize((side, side), Image.Resampling.LANCZOS).save(buf, "PNG")
    return buf.getvalue()


def gradient(side: int = 128) -> bytes:
    """A smallest legal picture that classifies fast (no faces to look for), as PNG."""
    import numpy as np
    from PIL import Image

    ys, xs = np.mgrid[0:side, 0:side]
    buf = io.BytesIO()
    Image.fromarray(np.dstack([xs * 255 // side, ys * 255 // side, (xs + ys) % 256]).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@contextlib.asynccontextmanager
async def animabot(workdir: Path, *, webhooks: bool, **overrides: Any) -> Any:
    """``animabot run`` (embedded) in this process on a fresh SQLite database; yields (db, settings)."""
    from bot import serve
    from worker.db import init_db
    from worker.settings import Settings

    settings = Settings(data_dir=workdir, web_port=0, webhook_secret=SECRET, daily_free_credits=0,
                        provider_download_hosts=["127.0.0.1"], **overrides)
    db = init_db(settings)
    stop, ready = asyncio.Event(), asyncio.Event()

    def serving(port: int) -> None:
        if webhooks:
            settings.public_url = f"http://127.0.0.1:{port}"
        ready.set()

    async def quiet(event: Any) -> None:
        return None

    task = asyncio.create_task(serve.run(db, settings, front_end=quiet, stop=stop, ready=serving))
    await asyncio.wait_for(ready.wait(), 30)
    try:
        yield db, settings
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        db.dispose()


def submit_job(db: Any, settings: Any, image: bytes, provider: str) -> int:
    """A free 5 s Kling job on ``provider``."""
    from worker.jobs import JobParams
    from worker.submit import submit

    params = JobParams(prompt="a gentle smile", duration=5.0, backend=provider, model=MODELS[provider])
    return submit(db, settings, image=image, params=params).job_id


def states(db: Any, job_ids: list[int]) -> list[str]:
    """The jobs' states."""
    from sqlmodel import Session, select

    from worker.models import Job

    with Session(db) as session:
        return list(session.exec(select(Job.state).where(Job.id.in_(job_ids))))  # type: ignore[union-attr]


async def until(check: Any, *, timeout: float, what: str) -> None:
    """Wait for ``check()`` without blocking the event loop for long."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout:g} s")
        await asyncio.sleep(0.2)


def epoch(when: datetime) -> float:
    """A database timestamp (naive on SQLite, UTC) as epoch seconds."""
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


async def latency_run(provider: str, mode: str, args: argparse.Namespace, root: Path, probe: Probe) -> dict[str, Any]:
    """``args.jobs`` jobs on ``provider`` in ``mode`` (webhook or polling); per-job delays in seconds."""
    from sqlmodel import Session, select

    from worker.models import Attempt, Event, JobStage

    workdir = root / f"{provider}-{mode}"
    workdir.mkdir()
    image = picture(args.side)
    probe.reset()
    # Generations finish evenly across one poll_interval (5 s) of phase, one after the other.
    emulator = Emulator(provider, latency=args.latency, step=5.0 / (args.jobs + 1), side=args.side,
                        workdir=workdir)
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    try:
        async with animabot(workdir, webhooks=mode == "webhook", output_long_side=args.side,
                            **emulator.settings()) as (db, settings):
            warm = submit_job(db, settings, image, provider)
            await until(lambda: states(db, [warm]) == ["succeeded"], timeout=120, what="warm-up job")
            ids = []
            for _ in range(args.jobs):
                ids.append(submit_job(db, settings, image, provider))
                await asyncio.sleep(args.interval)
            await until(lambda: all(s in ("succeeded", "failed") for s in states(db, ids)),
                        timeout=args.latency + 300, what=f"{provider} {mode} jobs")
    finally:
        report = emulator.close()
    rows = []
    with Session(db) as session:
        for job_id in ids:
            [attempt] = session.exec(select(Attempt).where(Attempt.job_id == job_id)).all()
            events = {e.kind: epoch(e.created_at) for e in session.exec(select(Event).where(Event.job_id == job_id))}
            stages = {s.stage: s.seconds for s in session.exec(select(JobStage).where(JobStage.job_id == job_id))}
            finished, ready = report["finished"][attempt.provider_id], probe.ready[attempt.id]
            rows.append({
                "job": job_id, "notice": ready - finished,
                "pickup": min(t for t in probe.units[job_id] if t >= ready) - ready,
                "fetch": probe.fetch[attempt.provider_id],
                "to_post_processing": events["post-processing"] - finished,
                "delivered": events["succeeded"] - finished, "gate": stages["check"],
                "post_processing": sum(stages.get(s, 0.0) for s in ("post-process", "encode", "store")),
                "by_webhook": attempt.id in probe.by_webhook,
            })
    return {"provider": provider, "mode": mode, "jobs": rows, "seconds": time.monotonic() - started,
            "load_before": load_before, "load_after": os.getloadavg()[0], "emulator_polls": report["polls"]}


# -- in flight -----------------------------------------------------------------------------------------


def rss_mib() -> float:
    """This process's resident memory, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds() -> float:
    """CPU (user + system) of this process and its finished children."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


async def inflight_run(n: int, args: argparse.Namespace, root: Path, probe: Probe) -> dict[str, Any]:
    """``n`` generations of an hour each, held by one embedded process; its memory, CPU and polls."""
    from sqlmodel import Session, func, select

    from worker.models import Attempt

    workdir = root / "inflight"
    workdir.mkdir()
    image = gradient()
    probe.reset()
    emulator = Emulator("replicate", latency=3600, side=256, workdir=workdir)
    load_before = os.getloadavg()[0]
    try:
        async with animabot(workdir, webhooks=False, output_long_side=256, generation_timeout=7200,
                            job_deadline=7200, **emulator.settings()) as (db, settings):

            def running() -> int:
                with Session(db) as session:
                    return session.exec(select(func.count()).select_from(Attempt)
                                        .where(Attempt.state == "running")).one()

            # One job first, so that the baseline has every library its first unit loads.
            submit_job(db, settings, image, "replicate")
            await until(lambda: running() >= 1, timeout=60, what="the first generation running")
            await asyncio.sleep(2.0)
            rss_before = rss_mib()
            t0 = time.monotonic()
            for _ in range(n - 1):
                submit_job(db, settings, image, "replicate")
                await asyncio.sleep(0)
            submitted = time.monotonic() - t0
            await until(lambda: running() >= n, timeout=20 * 60, what="every generation running")
            all_running = time.monotonic() - t0
            await asyncio.sleep(20.0)  # the youngest is now past 20 s: every check is poll_interval apart
            rss, cpu0, polls0, w0 = [], cpu_seconds(), probe.polls, time.monotonic()
            while time.monotonic() - w0 < args.window:
                rss.append(rss_mib())
                await asyncio.sleep(1.0)
            window = time.monotonic() - w0
            cpu, polls = cpu_seconds() - cpu0, probe.polls - polls0
            still = running()
    finally:
        emulator.close()
    return {
        "n": n, "submitted_s": submitted, "all_running_s": all_running, "still_running": still,
        "rss_before_mib": rss_before, "rss_mib": max(rss), "window_s": window, "cpu_share": cpu / window,
        "polls_per_s": polls / window, "load_before": load_before, "load_after": os.getloadavg()[0],
    }


# -- report ----------------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    """The ``q``-th percentile (linear interpolation)."""
    import numpy as np

    return float(np.percentile(values, q))


def ms(seconds: float) -> str:
    """Seconds as milliseconds, or seconds above 10 s."""
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def latency_table(runs: list[dict[str, Any]]) -> str:
    """The latency figures as a Markdown table."""
    lines = [
        "| provider | mode | jobs | ended by webhook | finished → noticed p50 / p90 / max | then picked up p50 "
        "| download + probe p50 | quality gate p50 | finished → `post-processing` event (excl. post-processing) "
        "p50 / p90 / max | finished → `succeeded` event p50 / p90 / max | post-process + encode + store p50 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        jobs = run["jobs"]

        def three(key: str, jobs: list[dict[str, Any]] = jobs) -> str:
            values = [j[key] for j in jobs]
            return " / ".join(ms(pct(values, q)) for q in (50, 90, 100))

        def p50(key: str, jobs: list[dict[str, Any]] = jobs) -> str:
            return ms(pct([j[key] for j in jobs], 50))

        lines.append(
            f"| {run['provider']} | {run['mode']} | {len(jobs)} | {sum(j['by_webhook'] for j in jobs)} "
            f"| {three('notice')} | {p50('pickup')} | {p50('fetch')} | {p50('gate')} "
            f"| **{three('to_post_processing')}** | {three('delivered')} | {p50('post_processing')} |"
        )
    return "\n".join(lines)


def inflight_table(result: dict[str, Any]) -> str:
    """The in-flight figures as a Markdown table."""
    n = result["n"]
    per_job = (result["rss_mib"] - result["rss_before_mib"]) / (n - 1) * 1024
    per_check = result["cpu_share"] / max(result["polls_per_s"], 1e-9) * 1000
    return "\n".join([
        "| generations in flight | all running after | RSS with 1 → with N in flight | per generation "
        "| CPU while waiting | status checks | CPU per check |",
        "|---|---|---|---|---|---|---|",
        f"| {result['still_running']} of {n} | {result['all_running_s']:.0f} s (submits: "
        f"{result['submitted_s']:.1f} s) | {result['rss_before_mib']:.0f} → {result['rss_mib']:.0f} MiB "
        f"| {per_job:.0f} KiB | {result['cpu_share'] * 100:.1f} % of a core | {result['polls_per_s']:.1f}/s "
        f"(N / poll_interval = {n / 5:.0f}/s) | {per_check:.1f} ms |",
    ])


async def main(args: argparse.Namespace) -> None:
    """Run the parts asked for, print their tables and keep the raw figures in bench/out."""
    OUT.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"command": " ".join(sys.argv), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="provider-latency-") as tmp:
        root = Path(tmp)
        probe = Probe()
        runs = []
        for provider in [p for p in args.providers.split(",") if p and p != "none"]:
            for mode in ("webhook", "polling"):
                run = await latency_run(provider, mode, args, root, probe)
                runs.append(run)
                print(f"{provider} {mode}: {len(run['jobs'])} jobs in {run['seconds']:.0f} s, load "
                      f"{run['load_before']:.1f} → {run['load_after']:.1f}", flush=True)
        results["latency"] = runs
        if runs:
            print(latency_table(runs))
        if args.inflight:
            result = await inflight_run(args.inflight, args, root, probe)
            results["inflight"] = result
            print(inflight_table(result))
    (OUT / "provider_latency.json").write_text(json.dumps(results, indent=1))


def parse() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--providers", default="replicate,fal", help="comma-separated: replicate, fal; none")
    parser.add_argument("--jobs", type=int, default=20, help="measured jobs per provider and mode")
    parser.add_argument("--interval", type=float, default=1.5, help="seconds between two submits")
    parser.add_argument("--latency", type=float, default=20.0,
                        help="seconds the first generation takes (the i-th: + i × 5 s / (jobs + 1))")
    parser.add_argument("--step", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--side", type=int, default=256, help="clip size and output_long_side, px")
    parser.add_argument("--inflight", type=int, default=0, help="generations held in flight (0: skip)")
    parser.add_argument("--window", type=float, default=20.0, help="seconds of waiting measured")
    parser.add_argument("--emulator", help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    options = parse()
    if options.emulator:
        asyncio.run(serve_emulator(options.emulator, options.latency, options.step, options.side, options.report))
    else:
        asyncio.run(main(options))
