"""The ``animabot`` command: run the whole pipeline in-process on any picture, or inspect one.

    animabot demo                                   animate the bundled NASA astronaut portrait
    animabot animate photo.jpg --prompt "gentle waves" --camera pan-left -o waves.mp4 [--end-frame END] [--json]
    animabot inspect photo.jpg [--json]             validation, subject, faces and route, without generating
    animabot qc clip.mp4 [--source photo.jpg] [--json]   the quality gate's verdict on any clip
    animabot backends [--json]                      installed backends, usable or not, and why

The job system (see the README's "Running it"):

    animabot run                                    the long-running process (embedded, or front end)
    animabot worker [-c N]                          a Celery worker (scale-out), like `celery -A worker worker`
    animabot beat                                   Celery beat: polls, reaper, daily credits (scale-out)
    animabot submit [photo.jpg] --prompt "…" [--end-frame END] [--member GUILD:USER] [--wait] [--json]
                                                    (no picture: one is painted from the prompt first, when a
                                                    text-to-image model is configured)
    animabot jobs [--json]                          unfinished jobs with queue position and estimate
    animabot cancel JOB_ID                          cancel a job, its provider request and its charge

Exit codes: 0 success, 2 invalid input (one line on stderr, never a traceback), 1 generation failed
after its retries. Unexpected errors print one line and leave the traceback in the data folder's log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

import click

from backends.base import CameraMove
from worker.errors import UserError
from worker.jobs import ASPECTS, JobParams
from worker.settings import Settings, get_settings

SAMPLE = Path(__file__).parent / "assets" / "astronaut.png"
log = logging.getLogger("animabot")


def _fail(message: str, code: int = 2) -> NoReturn:
    click.echo(f"animabot: {message}", err=True)
    sys.exit(code)


def _human_bytes(n: int) -> str:
    return f"{n / (1024 * 1024):.2f} MiB" if n >= 1024 * 1024 else f"{n / 1024:.0f} KiB"


class StageProgress:
    """One line per pipeline stage on a terminal: a bar while it runs, its time when done."""

    WIDTH = 24

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.stage: str | None = None
        self.started = 0.0

    def __call__(self, stage: str, fraction: float) -> None:
        """Show ``stage`` at ``fraction`` done (1.0 ends its line)."""
        if not self.enabled:
            return
        if stage != self.stage:
            self.stage, self.started = stage, time.perf_counter()
        filled = int(self.WIDTH * max(0.0, min(1.0, fraction)))
        bar = "█" * filled + "·" * (self.WIDTH - filled)
        line = f"\r  {stage:<13}{bar} {fraction * 100:3.0f}%"
        if fraction >= 1.0:
            line += f"  {time.perf_counter() - self.started:6.2f}s\n"
            self.stage = None
        click.echo(line, nl=False, err=True)


def _configure_logging(settings: Settings) -> Path:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    path = settings.data_dir / "animabot.log"
    logging.basicConfig(
        filename=path, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return path


def _run_pipeline(
    settings: Settings, image: Path, params: JobParams, out: Path, *, show: bool, end_frame: Path | None = None
) -> Any:
    from worker import events
    from worker.db import init_db
    from worker.jobs import create_job
    from worker.pipeline import Pipeline

    engine = init_db(settings)
    detail = {"end_frame": {"path": str(end_frame)}} if end_frame is not None else None
    job = create_job(engine, params, source_path=image, detail=detail)
    pipeline = Pipeline(engine, settings, progress=StageProgress(show))

    async def go() -> Any:
        try:
            return await pipeline.run(job.id or 0, deliver_to=out)
        finally:
            await pipeline.aclose()

    outcome = asyncio.run(go())
    # This command is the job's front end and has just delivered it: nothing is left for `animabot run`.
    events.ack(engine, [e.id for e in events.pending(engine, job_id=job.id, limit=10_000)])
    return outcome


def _animate(image: Path, params: JobParams, out: Path, *, as_json: bool, end_frame: Path | None = None) -> None:
    settings = get_settings()
    log_path = _configure_logging(settings)
    if not image.exists():
        _fail(f"{image} does not exist; give the path of a JPEG, PNG or WebP picture")
    if image.is_dir():
        _fail(f"{image} is a folder; give the path of a JPEG, PNG or WebP picture")
    if end_frame is not None and not end_frame.is_file():
        _fail(f"--end-frame {end_frame} is not a file; give the path of a JPEG, PNG or WebP picture")
    try:
        params = params.checked()
        outcome = _run_pipeline(settings, image, params, out, show=not as_json and sys.stderr.isatty(),
                                end_frame=end_frame)
    except UserError as exc:
        if as_json:
            click.echo(json.dumps({"status": "rejected", "output": None, "subject": None, "backend": None,
                                   "attempts": [], "cost": None, "error": exc.to_json()}))
        _fail(exc.message)
    except Exception as exc:  # unexpected: one line here, the traceback in the log
        log.error("animate failed\n%s", traceback.format_exc())
        _fail(f"internal error ({type(exc).__name__}: {exc}); details in {log_path}", code=1)
    if as_json:
        click.echo(json.dumps(outcome.to_json()))
    if outcome.status == "succeeded":
        if not as_json:
            clip = outcome.clip
            click.echo(
                f"{outcome.output}  {clip.get('duration', 0):.1f}s  {clip.get('width')}x{clip.get('height')}  "
                f"{_human_bytes(clip.get('bytes', 0))}  backend={outcome.backend}  "
                f"took {outcome.seconds:.1f}s"
            )
        return
    message = outcome.error["message"] if outcome.error else "generation failed"
    _fail(message, code=2 if outcome.status == "rejected" else 1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="animabot")
def main() -> None:
    """animabot: make still pictures move."""


_CAMERAS = click.Choice([c.value for c in CameraMove])


@main.command()
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write the MP4 (default: animabot-data/demo.mp4).")
@click.option("--camera", type=_CAMERAS, default="zoom-in", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the summary.")
def demo(output: Path | None, camera: str, as_json: bool) -> None:
    """Animate the bundled sample photograph offline with the local backend."""
    settings = get_settings()
    out = output or settings.data_dir / "demo.mp4"
    params = JobParams(prompt="slow push-in on the astronaut, gentle and cinematic",
                       camera=CameraMove(camera), seed=42, backend="local")
    _animate(SAMPLE, params, out, as_json=as_json)


@main.command()
@click.argument("image", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="The motion you want, e.g. 'gentle waves, slow push-in'.")
@click.option("--camera", type=_CAMERAS, default="zoom-in", show_default=True)
@click.option("--motion", type=click.IntRange(0, 4), default=None, help="Motion strength 0..4.")
@click.option("--duration", type=float, default=None, help="Clip length in seconds.")
@click.option("--aspect", type=click.Choice(ASPECTS), default="auto", show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--negative", default="", help="What to avoid.")
@click.option("--backend", default=None, help="Backend name (see `animabot backends`).")
@click.option("--end-frame", type=click.Path(path_type=Path), default=None,
              help="A picture the clip should end on (only some models can).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write the MP4 (default: IMAGE-animated.mp4 here).")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")
def animate(image: Path, prompt: str, camera: str, motion: int | None, duration: float | None, aspect: str,
            seed: int | None, negative: str, backend: str | None, end_frame: Path | None, output: Path | None,
            as_json: bool) -> None:
    """Animate IMAGE in-process through the whole pipeline."""
    settings = get_settings()
    params = JobParams(
        prompt=prompt, camera=CameraMove(camera),
        motion=settings.default_motion if motion is None else motion,
        duration=settings.default_duration if duration is None else duration,
        aspect=aspect, seed=seed, negative=negative, backend=backend,
    )
    _animate(image, params, output or Path(f"{image.stem}-animated.mp4"), as_json=as_json, end_frame=end_frame)


@main.command()
@click.argument("image", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect(image: Path, as_json: bool) -> None:
    """Show what validation concludes about IMAGE, without generating anything."""
    from worker import imaging

    settings = get_settings()
    try:
        if not image.is_file():
            raise UserError(f"{image} is not a file; give the path of a JPEG, PNG or WebP picture",
                            code="not_found")
        source = imaging.load_image(image, settings)
        report = {"ok": True, **imaging.describe(source, settings), **_subject_and_route(source, settings)}
    except UserError as exc:
        if as_json:
            click.echo(json.dumps({"ok": False, "error": exc.to_json()}))
        _fail(exc.message)
    if as_json:
        click.echo(json.dumps(report))
        return
    _print_fields(report)


def _subject_and_route(source: Any, settings: Settings) -> dict[str, Any]:
    """What the classify and route stages would conclude for this picture."""
    from backends.base import GenerationRequest
    from worker import imaging, prompts, routing, subject

    found = subject.classify(source.image)
    aspect = imaging.resolve_aspect(*source.size)
    width, height = aspect.size(settings.output_long_side)
    steering = prompts.steer(found.kind, CameraMove.ZOOM_IN)
    probe = GenerationRequest(image_path=Path("probe.png"), prompt="", output_dir=Path("."), camera=steering.camera,
                              duration=settings.default_duration, aspect=aspect, width=width, height=height)
    try:
        route: dict[str, Any] = routing.plan_route(found.kind, probe, settings).to_json()
    except UserError as exc:
        route = {"error": exc.message}
    return {"subject": found.to_json(), "route": route}


def _print_fields(fields: dict[str, Any], prefix: str = "") -> None:
    """``key: value`` lines, nested dicts flattened to ``outer.inner``, lists comma-joined."""
    for key, value in fields.items():
        if key == "ok" or value is None:
            continue
        if isinstance(value, dict):
            _print_fields(value, f"{prefix}{key}.")
        else:
            shown = ", ".join(map(str, value)) if isinstance(value, list) else value
            click.echo(f"{prefix + key:>22}: {shown if shown != '' else '-'}")


@main.command()
@click.argument("clip", type=click.Path(path_type=Path))
@click.option("--source", type=click.Path(path_type=Path), default=None,
              help="The picture the clip was made from (enables the drift and wrong-start checks).")
@click.option("--duration", type=float, default=None, help="Requested length in seconds (default: the clip's).")
@click.option("--size", default=None, help="Requested WIDTHxHEIGHT (default: the clip's).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def qc(clip: Path, source: Path | None, duration: float | None, size: str | None, as_json: bool) -> None:
    """Run the quality gate on CLIP: accepted or rejected, with reasons and metrics (exit 0 either way)."""
    import numpy as np

    from backends import video
    from worker import imaging, quality

    settings = get_settings()
    try:
        info = video.probe(clip)
    except (video.VideoError, OSError) as exc:
        _fail(f"cannot read {clip}: {exc}")
    width, height = info.width, info.height
    if size:
        try:
            width, height = (int(v) for v in size.lower().split("x"))
        except ValueError:
            _fail(f"--size {size!r} is not WIDTHxHEIGHT, e.g. 1280x720")
    pixels = None
    if source is not None:
        try:
            picture = imaging.load_image(source, settings)
        except UserError as exc:
            _fail(f"cannot read {source}: {exc.message}")
        aspect = imaging.resolve_aspect(width, height)
        fitted, _ = imaging.fit(picture.image, aspect, width=width, height=height, mode=settings.fit_mode)
        pixels = np.asarray(fitted.convert("RGB"))
    verdict = quality.judge(clip, width=width, height=height, fps=info.fps, duration=duration or info.duration,
                            source=pixels, thresholds=settings.quality_thresholds())
    if as_json:
        click.echo(json.dumps({"accepted": verdict.accepted, "reasons": verdict.reasons,
                               "metrics": {**verdict.metrics, "score": verdict.score}}))
        return
    click.echo("accepted" if verdict.accepted else "rejected: " + ", ".join(
        f"{r} ({quality.REASON_TEXT.get(r, r)})" for r in verdict.reasons))
    _print_fields(verdict.metrics)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def backends(as_json: bool) -> None:
    """List installed backends, whether each is usable here (and why not), and their capabilities."""
    from backends.registry import backend_classes, load_failures

    settings = get_settings()
    rows = []
    for name, cls in backend_classes().items():
        usable = cls.check_usable(settings)
        caps = asdict(cls.capabilities)
        caps = {k: sorted(v) if isinstance(v, frozenset) else v for k, v in caps.items()}
        rows.append({"name": name, "description": cls.description, "usable": usable.usable,
                     "reason": usable.reason, "capabilities": caps, "image_models": list(cls.image_models)})
    for name, reason in load_failures().items():
        rows.append({"name": name, "description": "", "usable": False, "reason": f"broken: {reason}",
                     "capabilities": None})
    records = _health(settings)
    for row in rows:
        row["health"] = [r for r in records if r["backend"] == row["name"]]
    if as_json:
        click.echo(json.dumps({"backends": rows}))
        return
    for row in rows:
        mark = "usable" if row["usable"] else f"not usable: {row['reason']}"
        click.echo(f"{row['name']:<10} {mark}\n           {row['description']}")
        for record in row["health"]:
            model = f" {record['model']}" if record["model"] else ""
            state = (f"cooling down {record['cooldown_seconds']:.0f} s" if record["cooldown_seconds"]
                     else f"{record['consecutive_failures']} recent failure(s)" if record["consecutive_failures"]
                     else "healthy")
            click.echo(f"           health{model}: {state}"
                       + (f" (last error: {record['last_error']})" if record["last_error"] else ""))
        caps = row["capabilities"]
        if caps:
            lo, hi = caps["durations"]
            click.echo(
                f"           cameras: {', '.join(caps['cameras'])}\n"
                f"           durations {lo:g}-{hi:g}s, aspects {' '.join(caps['aspects'])}, {caps['fps']} fps, "
                f"${caps['cost_per_second_usd']:g}/s, network: {'yes' if caps['needs_network'] else 'no'}, "
                f"end frames: {'yes' if caps['end_frame'] else 'no'}"
            )
        if row.get("image_models"):
            click.echo(f"           paints stills from text: {', '.join(row['image_models'])}")


# -- the job system ---------------------------------------------------------------------------------


def _db(settings: Settings) -> Any:
    from worker.db import init_db

    try:
        return init_db(settings)
    except Exception as exc:
        _fail(f"cannot open the database {settings.database_url!r}: {exc}", code=1)


@main.command()
def run() -> None:
    """Run animabot: the job system, the web endpoint and the front end (embedded), or the front end (scale-out)."""
    from bot import serve

    settings = get_settings()
    _configure_logging(settings)
    try:
        mode = serve.mode(settings)
    except serve.ConfigurationError as exc:
        _fail(str(exc))
    db = _db(settings)

    def ready(port: int) -> None:
        where = "this process" if mode == "embedded" else "Celery workers (`animabot worker`)"
        click.echo(f"animabot running ({mode}: jobs run in {where}); web endpoint on "
                   f"http://{settings.web_host}:{port}; Ctrl-C stops", err=True)
        if not settings.discord_token:
            click.echo("not connected to Discord: set ANIMABOT_DISCORD_TOKEN to your bot's token (README: "
                       "'Connecting to Discord'); meanwhile job events are printed here and "
                       "`animabot submit PICTURE --prompt ...` queues jobs", err=True)
        else:
            click.echo("connected to Discord: /animate is ready", err=True)

    try:
        asyncio.run(serve.run(db, settings, ready=ready))
    except serve.ConfigurationError as exc:
        _fail(str(exc))


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("-c", "--concurrency", type=int, default=None, help="Jobs worked on at once (default: setting).")
@click.pass_context
def worker(ctx: click.Context, concurrency: int | None) -> None:
    """Run a Celery worker (scale-out mode); extra options go to `celery worker`."""
    settings = get_settings()
    if not settings.redis_url:
        _fail("ANIMABOT_REDIS_URL is not set; a separate worker needs Redis and PostgreSQL. "
              "Without them `animabot run` already runs the jobs in one process")
    from worker.celery import QUEUES, app

    app.worker_main(["worker", "-l", "info", "-Q", ",".join(QUEUES),
                     "-c", str(concurrency or settings.worker_concurrency), *ctx.args])


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def beat(ctx: click.Context) -> None:
    """Run Celery beat (scale-out mode): the pollers' clock, the reaper and the daily grant; run exactly one."""
    settings = get_settings()
    if not settings.redis_url:
        _fail("ANIMABOT_REDIS_URL is not set; beat is only for scale-out mode (`animabot run` does it embedded)")
    from worker.celery import app

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app.start(["beat", "-l", "info", "-s", str(settings.data_dir / "celerybeat-schedule"), *ctx.args])


@main.command()
@click.argument("image", type=click.Path(path_type=Path), required=False)
@click.option("--prompt", required=True, help="The motion you want (without IMAGE: also what to paint).")
@click.option("--camera", type=_CAMERAS, default="zoom-in", show_default=True)
@click.option("--duration", type=float, default=None, help="Clip length in seconds.")
@click.option("--backend", default=None, help="Backend name (see `animabot backends`).")
@click.option("--model", default=None, help="Model of that backend.")
@click.option("--end-frame", type=click.Path(path_type=Path), default=None,
              help="A picture the clip should end on (only some models can).")
@click.option("--member", default=None, help="GUILD:USER to charge (default: a free operator job).")
@click.option("--key", default=None, help="Idempotency key: submitting it again returns the same job.")
@click.option("--wait", is_flag=True, help="Wait for the job to end and print its outcome.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def submit(image: Path | None, prompt: str, camera: str, duration: float | None, backend: str | None,
           model: str | None, end_frame: Path | None, member: str | None, key: str | None, wait: bool,
           as_json: bool) -> None:
    """Submit IMAGE to the job system (`animabot run` or the Celery workers do it).

    Without IMAGE a text-to-image model paints the picture from the prompt first (ANIMABOT_TEXT_TO_IMAGE).
    """
    from worker.submit import submit as submit_job

    settings = get_settings()
    if image is not None and not image.is_file():
        _fail(f"{image} is not a file; give the path of a JPEG, PNG or WebP picture")
    if end_frame is not None and not end_frame.is_file():
        _fail(f"--end-frame {end_frame} is not a file; give the path of a JPEG, PNG or WebP picture")
    owner = None
    if member:
        if member.count(":") != 1:
            _fail(f"--member {member!r} is not GUILD:USER, e.g. 1234:5678")
        guild, user = member.split(":")
        owner = (guild, user)
    db = _db(settings)
    kick = None
    if settings.redis_url:
        from worker.celery import kick
    params = JobParams(prompt=prompt, camera=CameraMove(camera), backend=backend, model=model,
                       duration=settings.default_duration if duration is None else duration)
    try:
        receipt = submit_job(db, settings, image=image.read_bytes() if image is not None else None, params=params,
                             member=owner, key=key, kick=kick,
                             end_image=end_frame.read_bytes() if end_frame is not None else None)
    except UserError as exc:
        if as_json:
            click.echo(json.dumps({"ok": False, "error": exc.to_json()}))
        _fail(exc.message)
    if not wait:
        if as_json:
            click.echo(json.dumps({"ok": True, **receipt.to_json()}))
        else:
            click.echo(f"job {receipt.job_id} queued, position {receipt.position}, "
                       f"about {receipt.eta_seconds:.0f} s, {receipt.price_credits} credits held")
        return
    outcome = _wait_for(db, settings, receipt.job_id)
    if as_json:
        click.echo(json.dumps(outcome.to_json()))
    elif outcome.status == "succeeded":
        click.echo(f"job {receipt.job_id}: {outcome.output}")
    if outcome.status != "succeeded":
        _fail(outcome.error["message"] if outcome.error else outcome.status, code=1)


def _wait_for(db: Any, settings: Settings, job_id: int) -> Any:
    from worker.jobs import load_job
    from worker.pipeline import Pipeline

    while not load_job(db, job_id).job_state.terminal:
        time.sleep(0.25)
    return Pipeline(db, settings).outcome(job_id)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def jobs(as_json: bool) -> None:
    """List unfinished jobs with their state, queue position and estimated seconds until done."""
    from sqlmodel import Session, select

    from worker import scheduler
    from worker.models import FINAL_STATES, Job

    settings = get_settings()
    db = _db(settings)
    with Session(db) as session:
        rows = session.exec(select(Job).where(Job.state.not_in([s.value for s in FINAL_STATES]))  # type: ignore[attr-defined]
                            .order_by(Job.id)).all()
    listed = []
    for job in rows:
        position, eta = scheduler.position(db, settings, job.id or 0)
        listed.append({"job_id": job.id, "state": job.state, "position": position, "eta_seconds": round(eta, 1),
                       "backend": job.backend, "prompt": job.prompt})
    if as_json:
        click.echo(json.dumps({"jobs": listed}))
        return
    if not listed:
        click.echo("no unfinished jobs")
    for row in listed:
        where = f"position {row['position']}" if row["position"] else row["state"]
        click.echo(f"job {row['job_id']:<6} {where:<16} about {row['eta_seconds']:.0f} s  {row['prompt'][:50]}")


@main.command()
@click.argument("job_id", type=int)
def cancel(job_id: int) -> None:
    """Cancel job JOB_ID: its provider request is stopped and its credits go back."""
    from worker.runner import CancelRefused, Worker

    settings = get_settings()
    db = _db(settings)
    worker = Worker(db, settings)

    async def go() -> bool:
        try:
            return await worker.cancel(job_id)
        finally:
            await worker.aclose()

    try:
        now = asyncio.run(go())
    except CancelRefused as exc:
        _fail(str(exc))
    except LookupError:
        _fail(f"there is no job {job_id}; `animabot jobs` lists the unfinished ones")
    click.echo(f"job {job_id} canceled" if now else f"job {job_id} will stop when its current step ends")


def _health(settings: Settings) -> list[dict[str, Any]]:
    """Health records (failures, cooldowns) from the database; none when it cannot be opened."""
    from worker import health
    from worker.db import init_db

    try:
        return health.report(init_db(settings))
    except Exception as exc:  # health is extra information: a missing database must not hide the list
        log.warning("backend health unavailable: %s", exc)
        return []


if __name__ == "__main__":
    main()
