"""The pipeline: turns a queued job into a stored clip, one plain stage at a time.

    validate → classify → enhance → route → prompt → generate → check → post-process → encode → store

Each stage is a method that reads what earlier stages left on the :class:`_Run` and returns a small
JSON-able dict of what it found; the runner records that, the outcome and the timing as a
:class:`~worker.models.JobStage` row and moves the job along its state machine. ``generate`` and
``check`` form the one retry loop: a transient backend error or a rejected clip is retried with a new
seed until ``settings.max_attempts`` attempts are spent.

Outcomes, as front ends report them:

- ``succeeded`` — a clip is stored and delivered; the reservation (if any) is captured.
- ``rejected`` — the input was refused (:class:`~worker.errors.UserError`); nothing was generated.
- ``failed`` — generation did not produce an acceptable clip; the reservation is voided.

The work is cut into units (:meth:`Pipeline.advance`) that each start from what the database says:
prepare and submit the first attempt; collect, judge and submit the next; finish the clip. Between
units a job holds nothing but its row: while a provider works, the job waits on a webhook or a poll
(:meth:`Pipeline.poll`). The job system (``worker.engine``) runs the units from its workers; the
CLI runs them in-process with :meth:`Pipeline.run`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from PIL import Image
from sqlalchemy import Engine
from sqlmodel import Session, select

from backends import video
from backends.base import (
    Aspect,
    Backend,
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    Box,
    CameraMove,
    ContentRefused,
    GenerationRequest,
    GenerationResult,
    Handle,
    ImageRequest,
    RateLimited,
    State,
)
from backends.registry import UnknownBackend, create_backend, get_backend_class
from worker import (
    artifacts,
    encode,
    events,
    health,
    imaging,
    ledger,
    links,
    postprocess,
    pricing,
    prompts,
    quality,
    routing,
    stills,
    subject,
)
from worker.errors import ImageRejected, InvalidParameters, UserError
from worker.jobs import load_job
from worker.models import Attempt, Clip, GuildSettings, IllegalTransition, Job, JobStage, JobState, utcnow
from worker.settings import Settings

ProgressCallback = Callable[[str, float], None]

log = logging.getLogger(__name__)

class GenerationFailed(Exception):
    """No acceptable clip after every attempt; ``code`` and ``message`` say why in plain words."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class JobOutcome:
    """How a job ended, in the shape ``animabot animate --json`` prints."""

    job_id: int
    status: str
    output: Path | None
    subject: str | None
    backend: str | None
    attempts: list[dict[str, Any]]
    cost: dict[str, Any]
    error: dict[str, str] | None
    seconds: float
    clip: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The JSON object front ends print."""
        return {
            "status": self.status,
            "output": str(self.output) if self.output else None,
            "subject": self.subject,
            "backend": self.backend,
            "attempts": self.attempts,
            "cost": self.cost,
            "error": self.error,
            "job_id": self.job_id,
            "seconds": round(self.seconds, 3),
            "clip": self.clip,
        }


@dataclass
class Loop:
    """Where a job stands in the retry loop, saved on the job after every attempt.

    ``step`` indexes the route; ``tries`` counts attempts on that step's backend; ``attempt`` counts
    them all. Accepted attempts become ``segments`` (an extended clip) or ``candidates`` (score,
    attempt number) for best-of-N. ``not_before`` (epoch seconds) is when a transient error may be
    retried. ``throttled`` counts submits the provider turned away before starting anything (a 429, a
    busy Cog server): back-pressure, which costs the job no attempt.
    """

    motion: int
    seed: int
    step: int = 0
    tries: int = 0
    attempt: int = 0
    step_done: bool = False
    not_before: float = 0.0
    segments: list[int] = field(default_factory=list)
    candidates: list[list[float]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    segment_image: str | None = None
    throttled: int = 0

    def to_json(self) -> dict[str, Any]:
        """As saved in ``job.detail["loop"]``."""
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Loop:
        """The loop :meth:`to_json` saved."""
        return cls(**raw)


@dataclass(frozen=True)
class Step:
    """What a job needs after :meth:`Pipeline.advance`: nothing more, a provider's answer, or time."""

    kind: str  # "done", "wait" (on attempt ``attempt_id``) or "retry" (at epoch second ``at``)
    attempt_id: int | None = None
    at: float = 0.0


DONE = Step("done")
#: How many of a backend's latest provider ids count as held when looking for a lost submit's generation.
KNOWN_IDS_CHECKED = 5000


@dataclass
class _Run:
    """What the stages of one job hand each other; rebuilt from the job row for every unit of work."""

    job: Job
    settings: Settings
    loop: Loop
    source: imaging.SourceImage | None = None
    aspect: Aspect = Aspect.LANDSCAPE
    width: int = 0
    height: int = 0
    fitted: Path | None = None
    subject: str = "unknown"
    faces: tuple[Box, ...] = ()
    focus: Box | None = None
    fitted_pixels: np.ndarray | None = None
    route: routing.Route | None = None
    camera: CameraMove = CameraMove.ZOOM_IN
    model: str | None = None
    backend: Backend | None = None
    prompt: str = ""
    negative: str = ""
    segment_duration: float = 0.0
    generated: GenerationResult | None = None
    verdict: quality.Verdict | None = None
    finished: Path | None = None
    encoded: encode.EncodeReport | None = None
    clip: Clip | None = None
    # Written with the job's next state move, in its transaction (Pipeline._note, Pipeline._record).
    unsaved: dict[str, Any] = field(default_factory=dict)
    stages: list[dict[str, Any]] = field(default_factory=list)
    healthy: Callable[[str, str | None], str | None] | None = None
    collected: dict[int, Attempt] = field(default_factory=dict)  # attempts judged in this unit, by number

    @property
    def media(self) -> Path:
        return self.settings.media_path

    @property
    def segment_image(self) -> Path | None:
        """The picture the next generation starts from: the fitted source, or an extension's last frame."""
        return Path(self.loop.segment_image) if self.loop.segment_image else self.fitted

    def segment_pixels(self) -> np.ndarray | None:
        if self.loop.segment_image is None:
            if self.fitted_pixels is None and self.fitted is not None:
                self.fitted_pixels = _read_rgb(self.fitted)
            return self.fitted_pixels
        return _read_rgb(Path(self.loop.segment_image))

    def artifact(self, stage: str, *parts: object, ext: str) -> Path:
        assert self.job.id is not None
        return artifacts.artifact_path(self.media, self.job.id, stage, *parts, ext=ext)

    def plan_json(self) -> dict[str, Any]:
        """What preparation decided, saved on the job so any worker can carry on from there."""
        assert self.route is not None
        return {
            "aspect": self.aspect.value, "width": self.width, "height": self.height, "fitted": str(self.fitted),
            "subject": self.subject, "faces": _jsonable(self.faces), "focus": _jsonable(self.focus),
            "camera": self.camera.value, "prompt": self.prompt, "negative": self.negative,
            "route": self.route.to_json(),
        }

    def load_plan(self, plan: dict[str, Any]) -> None:
        self.aspect, self.width, self.height = Aspect(plan["aspect"]), plan["width"], plan["height"]
        self.fitted, self.subject = Path(plan["fitted"]), plan["subject"]
        self.faces = tuple(Box(**b) for b in plan["faces"])
        self.focus = Box(**plan["focus"]) if plan["focus"] else None
        self.camera, self.prompt, self.negative = CameraMove(plan["camera"]), plan["prompt"], plan["negative"]
        raw = plan["route"]
        self.route = routing.Route(
            subject=raw["subject"], origin=raw["origin"],
            steps=tuple(routing.RouteStep(s["backend"], s["model"], s["reason"]) for s in raw["steps"]),
        )


def _read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


class Pipeline:
    """Moves jobs through every stage and records what happened on them.

    :meth:`advance` does one unit of work on a job (prepare and submit, collect and judge an attempt,
    or finish the clip) and says what the job needs next; the job system calls it from its workers.
    :meth:`run` drives one job to its end in-process, as the CLI does. ``backends`` maps a backend name
    to a ready instance (e.g. a :class:`backends.fake.FakeBackend` with scripted outcomes); other
    backends are created from the registry on first use.
    """

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        *,
        backends: dict[str, Backend] | None = None,
        progress: ProgressCallback | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self._backends: dict[str, Backend] = dict(backends or {})
        self._progress = progress or (lambda stage, fraction: None)

    def backend(self, name: str) -> Backend:
        """The instance of backend ``name`` this pipeline uses."""
        if name not in self._backends:
            self._backends[name] = create_backend(name, self.settings)
        return self._backends[name]

    async def aclose(self) -> None:
        """Close every backend this pipeline opened."""
        for backend in self._backends.values():
            await backend.aclose()

    # -- driving one job in-process ------------------------------------------------------------

    async def run(self, job_id: int, *, deliver_to: Path | None = None) -> JobOutcome:
        """Run job ``job_id`` to its end, waiting in-process; with ``deliver_to``, copy the clip there."""
        started = time.perf_counter()
        while (step := await self.advance(job_id)).kind != "done":
            if step.kind == "wait":
                assert step.attempt_id is not None
                await self._wait_here(step.attempt_id)
            else:
                await asyncio.sleep(max(0.0, step.at - time.time()))
        job = load_job(self.engine, job_id)
        if deliver_to is not None and job.job_state is JobState.SUCCEEDED and job.output_path:
            deliver_to.parent.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(shutil.copyfile, job.output_path, deliver_to)
        return self.outcome(job_id, deliver_to=deliver_to, seconds=time.perf_counter() - started)

    async def _wait_here(self, attempt_id: int) -> None:
        interval = 0.02
        while True:
            attempt = self._attempt(attempt_id)
            if attempt.state != "running":
                return
            report = await self.poll(attempt)
            if report is not None:
                self.mark_ready(attempt_id, report)
                return
            await asyncio.sleep(interval)
            interval = min(interval * 1.5, 1.0)

    # -- the unit of work ----------------------------------------------------------------------

    async def advance(self, job_id: int, *, job: Job | None = None) -> Step:
        """Do the next piece of work on job ``job_id`` and say what it needs next.

        Safe to call again after a crash at any point: every piece starts from what the database
        says, and a piece already done is not done twice (an attempt submitted to a provider is
        waited on, never submitted again). ``job`` is the row as the caller just read it (the claim
        returns it), so it is not read again.
        """
        job = job if job is not None and job.id == job_id else load_job(self.engine, job_id)
        if job.job_state.terminal:
            return DONE
        run = _Run(job=job, settings=self.settings, loop=self._loop(job))
        try:
            if job.job_state in (JobState.QUEUED, JobState.VALIDATING):
                if (later := await self._prepare(run)) is not None:
                    return later  # a prompt-only job's picture could not be painted yet
            else:
                run.load_plan(job.detail["plan"])
            if run.job.job_state in (JobState.POST_PROCESSING, JobState.DELIVERING):
                await self._finish_clip(run)
                return DONE
            return await self._generate(run)
        except UserError as exc:
            self._fail(run, exc.code, exc.message, status="rejected")
        except GenerationFailed as exc:
            self._fail(run, exc.code, exc.message)
        return DONE

    def _loop(self, job: Job) -> Loop:
        raw = job.detail.get("loop")
        return Loop.from_json(raw) if raw else Loop(motion=job.motion, seed=job.seed)

    async def _prepare(self, run: _Run) -> Step | None:
        if run.job.job_state is JobState.QUEUED:
            self._move(run, JobState.VALIDATING, event=("started", {}), started_at=utcnow())
        painting = not run.job.source_path and "paint" in run.job.detail
        if painting and (later := await self._paint_first(run)) is not None:
            return later
        for stage in ("validate", "classify", "enhance", "route", "prompt"):
            await self._stage(run, stage, getattr(self, "_" + stage))
        self._move(run, JobState.GENERATING, detail={**run.job.detail, "plan": run.plan_json()})
        return None

    async def _paint_first(self, run: _Run) -> Step | None:
        """A prompt-only job: paint its picture, which becomes the job's source; or say when to try again.

        A painting error follows the clips' rules: a transient one is retried after a backoff (at most
        ``max_attempts`` tries), a moderation refusal or another permanent one fails the job, refunded.
        """
        paint = dict(run.job.detail["paint"])
        tries = int(paint.get("tries", 0)) + 1
        try:
            await self._stage(run, "paint", lambda r: self._paint(r, tries))
            return None
        except BackendError as exc:
            if isinstance(exc, ContentRefused):
                raise GenerationFailed(exc.code, _plain(exc)) from None
            if not exc.transient or tries >= self.settings.max_attempts:
                raise GenerationFailed(
                    "paint_failed", f"could not paint a picture from the prompt ({exc.message}); nothing was "
                    "charged — try again later, or attach a picture",
                ) from None
            wait = self._backoff(tries, exc)
            self._move(run, JobState.VALIDATING, detail={**run.job.detail, "paint": {**paint, "tries": tries}},
                       event=("retrying", {"attempt": tries, "backend": paint["backend"],
                                           "reason": f"painting the picture failed ({exc.message})"}))
            return Step("retry", at=time.time() + wait)

    def _backoff(self, tries: int, error: BackendError) -> float:
        """Wait before retrying after the ``tries``-th transient failure: doubling, at most 30 s, or as asked."""
        return max(min(self.settings.retry_backoff * 2 ** (tries - 1), 30.0), getattr(error, "retry_after", 0.0))

    async def _paint(self, run: _Run, tries: int) -> dict[str, Any]:
        paint = run.job.detail["paint"]
        backend = self.backend(paint["backend"])
        aspect = stills.still_aspect(run.job.aspect)
        width, height = stills.still_size(aspect, self.settings.output_long_side)
        out = run.artifact("paint", backend.name, paint["model"], f"s{run.job.seed}", f"t{tries}", ext="png")
        self._move(run, JobState.VALIDATING,
                   event=("painting", {"backend": backend.name, "model": paint["model"], "attempt": tries}))
        still = await backend.imagine(ImageRequest(
            prompt=run.job.prompt, output_path=out, negative_prompt=run.job.negative_prompt, aspect=aspect,
            width=width, height=height, seed=run.job.seed, model=paint["model"], attempt=tries,
        ))
        self._move(run, JobState.VALIDATING, source_path=str(still.image_path),
                   cost_usd=run.job.cost_usd + still.cost_usd,
                   detail={**run.job.detail, "paint": {**paint, "tries": tries, "cost_usd": still.cost_usd}})
        return {"backend": backend.name, "model": paint["model"], "size": [still.width, still.height],
                "cost_usd": still.cost_usd, "output": still.image_path.name}

    async def _stage(self, run: _Run, stage: str, fn: Callable[[_Run], Any]) -> dict[str, Any]:
        self._progress(stage, 0.0)
        t0 = time.perf_counter()
        started_at = utcnow()
        try:
            detail = await fn(run) or {}
        except (UserError, GenerationFailed, BackendError) as exc:
            failure = {"code": exc.code, "message": getattr(exc, "message", str(exc))}
            self._record(run, stage, "failed", time.perf_counter() - t0, started_at, failure)
            raise
        outcome = "skipped" if detail.get("skipped") is True else "ok"  # (route lists the entries it skipped)
        if stage == "check" and run.verdict is not None and not run.verdict.accepted:
            outcome = "rejected"
        self._record(run, stage, outcome, time.perf_counter() - t0, started_at, detail)
        self._progress(stage, 1.0)
        return detail

    def _record(
        self, run: _Run, stage: str, outcome: str, seconds: float, started_at: Any, detail: dict[str, Any]
    ) -> None:
        """Note a stage's outcome; the row is written in the transaction of the job's next state move.

        Every stage is followed by a move in the same unit (the next state, a retry, the job's end), so
        no row waits long; a unit that crashes first loses its rows, and its redo records them once.
        """
        assert run.job.id is not None
        run.stages.append(dict(job_id=run.job.id, stage=stage, outcome=outcome, seconds=round(seconds, 4),
                               detail=_jsonable(detail), started_at=started_at))

    def _note(self, run: _Run, **fields: Any) -> None:
        """Set ``fields`` on the job, written with its next state move: for what no redo starts from."""
        for name, value in fields.items():
            setattr(run.job, name, value)
        run.unsaved.update(fields)

    def _healthy(self, run: _Run) -> Callable[[str, str | None], str | None]:
        """Backend health as this unit first read it (read again after it records an outcome)."""
        if run.healthy is None:
            run.healthy = health.checker(self.engine)
        return run.healthy

    def _move(
        self, run: _Run, state: JobState, *, event: tuple[str, dict[str, Any]] | None = None,
        session: Session | None = None, **fields: Any,
    ) -> None:
        """Move the job to ``state``, set ``fields`` and publish ``event``, in one transaction.

        The same transaction writes what the unit noted since its last move (:meth:`_note`, stage rows).
        The row is not read first: ``run.job`` is what the unit knows, and it holds the job's lease, so
        nobody else moves the job meanwhile. The UPDATE is conditional on the state ``run.job`` has, so a
        unit that lost its lease to another worker fails here instead of writing over the other's work.
        With ``session`` the caller commits (e.g. together with a ledger transfer).
        """
        job = run.job
        assert job.id is not None
        was = job.state
        job.advance(state)
        for name, value in fields.items():
            setattr(job, name, value)
        job.updated_at = utcnow()
        values = {**run.unsaved, **fields, "state": job.state, "updated_at": job.updated_at}
        if job.job_state.terminal:
            values["finished_at"] = job.finished_at
        own = session is None
        session = session or Session(self.engine)
        try:
            moved = session.execute(
                sa.update(Job).where(Job.id == job.id, Job.state == was).values(**values),
                execution_options={"synchronize_session": False},
            ).rowcount
            if moved != 1:
                raise IllegalTransition(f"job {job.id} is no longer {was}: another worker moved it")
            if run.stages:
                session.execute(sa.insert(JobStage), run.stages)
            if event is not None:
                events.publish(session, job, *event)
            if own:
                session.commit()
        finally:
            if own:
                session.close()
        run.unsaved, run.stages = {}, []

    def _fail(self, run: _Run, code: str, message: str, *, status: str = "failed") -> None:
        assert run.job.id is not None
        with Session(self.engine, expire_on_commit=False) as session:
            self._move(run, JobState.FAILED, session=session, error_code=code, error_message=message,
                       detail={**run.job.detail, "status": status}, next_run_at=None,
                       event=("failed", {"code": code, "message": message, "status": status}))
            ledger.void(session, run.job.id)  # commits the job's end with the refund

    def fail(self, job_id: int, code: str, message: str) -> None:
        """End job ``job_id`` as failed with ``message`` and give the credits back."""
        job = load_job(self.engine, job_id)
        if not job.job_state.terminal:
            self._fail(_Run(job=job, settings=self.settings, loop=self._loop(job)), code, message)

    async def cancel_provider_requests(self, job_id: int) -> None:
        """Stop every generation of the job that a provider may still be working on."""
        with Session(self.engine) as session:
            open_attempts = session.exec(
                select(Attempt).where(Attempt.job_id == job_id, Attempt.state.in_(("submitting", "running")))  # type: ignore[attr-defined]
            ).all()
        for attempt in open_attempts:
            if attempt.handle:
                with contextlib.suppress(BackendError, UnknownBackend):
                    await self.backend(attempt.backend).cancel(Handle.from_json(attempt.handle))
            self._update_attempt(job_id, attempt.number, state="finished", verdict="canceled",
                                 finished_at=utcnow(), next_poll_at=None)

    async def cancel(self, job_id: int) -> bool:
        """End job ``job_id`` as canceled: stop its provider request and give the credits back.

        Returns False when the job had already ended (nothing changes then).
        """
        job = load_job(self.engine, job_id)
        if job.job_state.terminal:
            return False
        await self.cancel_provider_requests(job_id)
        run = _Run(job=job, settings=self.settings, loop=self._loop(job))
        with Session(self.engine) as session:
            self._move(run, JobState.CANCELED, session=session, next_run_at=None, error_code="canceled",
                       error_message="canceled by its owner", event=("canceled", {}))
            ledger.void(session, job_id)
        return True

    def outcome(self, job_id: int, *, deliver_to: Path | None = None, seconds: float = 0.0) -> JobOutcome:
        """How job ``job_id`` ended (or stands), in the shape front ends print."""
        with Session(self.engine) as session:
            job = session.get(Job, job_id)
            assert job is not None
            attempts = session.exec(
                select(Attempt).where(Attempt.job_id == job_id).order_by(Attempt.number)
            ).all()
            clip = session.exec(select(Clip).where(Clip.job_id == job_id)).first()
        state = job.job_state
        status = {JobState.SUCCEEDED: "succeeded", JobState.CANCELED: "canceled"}.get(state)
        status = status or (job.detail.get("status", "failed") if state is JobState.FAILED else state.value)
        output = None
        if status == "succeeded":
            output = deliver_to or (Path(job.output_path) if job.output_path else None)
        error = {"code": job.error_code, "message": job.error_message} if job.error_code else None
        return JobOutcome(
            job_id=job_id,
            status=status,
            output=output,
            subject=job.subject,
            backend=job.backend,
            attempts=[
                {
                    "number": a.number, "backend": a.backend, "seed": a.seed, "motion": a.motion,
                    "verdict": a.verdict, "reasons": a.reasons, "error": a.error_code,
                }
                for a in attempts
            ],
            cost={"credits": job.price_credits, "usd": round(job.cost_usd, 4)},
            error=error,
            seconds=seconds,
            clip=(
                {"width": clip.width, "height": clip.height, "duration": clip.duration, "bytes": clip.bytes}
                if clip
                else {}
            ),
        )

    # -- stages --------------------------------------------------------------------------------

    async def _validate(self, run: _Run) -> dict[str, Any]:
        if not run.job.source_path:
            raise InvalidParameters("the job has no source image; attach a JPEG, PNG or WebP picture")
        long_side = self.settings.output_long_side
        source = await asyncio.to_thread(
            imaging.load_image, Path(run.job.source_path), self.settings, target=(long_side, long_side)
        )
        run.source = source
        kept = run.artifact("validate", "source", ext=Path(run.job.source_path).suffix.lstrip(".") or "img")
        if Path(run.job.source_path).resolve() != kept.resolve():
            await asyncio.to_thread(shutil.copyfile, run.job.source_path, kept)
        self._note(run, source_path=str(kept))
        detail = {
            "format": source.format, "size": list(source.size), "bytes": source.bytes,
            "orientation_fixed": source.orientation_fixed, "conversions": source.conversions,
        }
        if "end_frame" in run.job.detail:
            detail["end_frame"] = await self._validate_end_frame(run)
        return detail

    async def _validate_end_frame(self, run: _Run) -> dict[str, Any]:
        """Decode the end frame like the picture (refused with the reason) and keep it with the job's files."""
        end = dict(run.job.detail["end_frame"])
        path = Path(end["path"])
        long_side = self.settings.output_long_side
        try:
            picture = await asyncio.to_thread(imaging.load_image, path, self.settings, target=(long_side, long_side))
        except ImageRejected as exc:
            raise ImageRejected(f"the end frame cannot be used: {exc.message}", code=exc.code) from None
        kept = run.artifact("validate", "end", ext=path.suffix.lstrip(".") or "img")
        if path.resolve() != kept.resolve():
            await asyncio.to_thread(shutil.copyfile, path, kept)
        self._move(run, JobState.VALIDATING, detail={**run.job.detail, "end_frame": {**end, "path": str(kept)}})
        return {"format": picture.format, "size": list(picture.size), "conversions": picture.conversions}

    async def _fit_end_frame(self, run: _Run) -> dict[str, Any]:
        """The end frame fitted to the clip's aspect and size like the picture (centred: no face to follow)."""
        end = dict(run.job.detail["end_frame"])
        long_side = self.settings.output_long_side
        picture = await asyncio.to_thread(
            imaging.load_image, Path(end["path"]), self.settings, target=(long_side, long_side))
        fitted, report = await asyncio.to_thread(
            imaging.fit, picture.image, run.aspect, width=run.width, height=run.height, mode=self.settings.fit_mode)
        path = run.artifact("enhance", "end", f"{run.width}x{run.height}", self.settings.fit_mode, ext="png")
        await asyncio.to_thread(fitted.save, path, compress_level=1)
        self._move(run, JobState.VALIDATING, detail={**run.job.detail, "end_frame": {**end, "fitted": str(path)}})
        return _jsonable(report)

    async def _classify(self, run: _Run) -> dict[str, Any]:
        assert run.source is not None
        found = await asyncio.to_thread(subject.classify, run.source.image)
        run.subject, run.faces = found.kind, found.faces
        self._note(run, subject=run.subject)
        return found.to_json()

    async def _enhance(self, run: _Run) -> dict[str, Any]:
        assert run.source is not None
        allowed = None
        if run.job.requested_backend:
            allowed = self._backend_class(run.job.requested_backend).capabilities.aspects
        if run.job.aspect == "auto":
            run.aspect = imaging.resolve_aspect(*run.source.size, allowed=allowed)
        else:
            run.aspect = Aspect(run.job.aspect)
        run.width, run.height = run.aspect.size(self.settings.output_long_side)
        face = max(run.faces, key=lambda b: b.width * b.height, default=None)
        fitted, report = await asyncio.to_thread(
            imaging.fit, run.source.image, run.aspect, width=run.width, height=run.height,
            mode=self.settings.fit_mode, focus=face.center if face else None,
        )
        run.focus = _map_box(face, report) if face else None
        run.fitted = run.artifact("enhance", f"{run.width}x{run.height}", self.settings.fit_mode, ext="png")
        run.fitted_pixels = np.asarray(fitted.convert("RGB"))
        await asyncio.to_thread(fitted.save, run.fitted, compress_level=1)
        detail = {"aspect": run.aspect.value, "width": run.width, "height": run.height, **_jsonable(report)}
        if run.focus is not None:
            detail["focus"] = _jsonable(run.focus)
        if "end_frame" in run.job.detail:
            detail["end_frame"] = await self._fit_end_frame(run)
        return detail

    async def _route(self, run: _Run) -> dict[str, Any]:
        steering = prompts.steer(run.subject, CameraMove(run.job.camera))
        run.camera = steering.camera
        overrides = self._guild_overrides(run.job.guild_id)
        probe = self._request(run, None, out_name="probe.mp4")
        run.route = routing.plan_route(
            run.subject, probe, self.settings, backend=run.job.requested_backend, model=run.job.model,
            guild_overrides=overrides, instances=self._backends, healthy=self._healthy(run),
        )
        first = run.route.steps[0]
        try:
            credits = pricing.price(first.backend, first.model, run.job.duration)
        except pricing.UnknownPrice:
            credits = 0
        self._note(run, backend=first.backend)
        detail = {**run.route.to_json(), "camera": run.camera.value, "price_credits": credits}
        if steering.warning:
            detail["warning"] = steering.warning
        return detail

    def _guild_overrides(self, guild_id: str | None) -> dict[str, Any] | None:
        if not guild_id:
            return None
        with Session(self.engine) as session:
            guild = session.get(GuildSettings, guild_id)
            return dict(guild.routing_overrides) if guild and guild.routing_overrides else None

    async def _prompt(self, run: _Run) -> dict[str, Any]:
        built = prompts.build_prompt(run.subject, run.job.prompt, run.camera, motion=run.loop.motion,
                                     negative=run.job.negative_prompt)
        run.prompt, run.negative = built.prompt, built.negative
        return {"prompt": run.prompt, "negative": run.negative}

    # -- generation: the one retry loop, one attempt per unit of work ----------------------------

    async def _generate(self, run: _Run) -> Step:
        """Collect the job's finished attempt if it has one, then submit the next or finish.

        The loop walks the route: each backend gets up to ``attempts_per_backend`` attempts and the
        job ``max_attempts`` per segment it needs. A transient error or a rejected clip is retried
        with a new seed (after a drift rejection also one step less motion, the known cure for
        morphing), after a backoff for errors; a permanent error moves on to the next backend; a
        moderation refusal ends the job. With ``best_of`` > 1 the job keeps generating until it has
        that many accepted candidates (or the budget is spent) and keeps the best.
        """
        # The first attempt is written with the loop (see _submit): without a loop there is none to look for.
        latest = self._latest_attempt(run) if "loop" in run.job.detail else None
        if latest is not None and latest.state == "running":
            return Step("wait", attempt_id=latest.id)
        if latest is not None and latest.state == "submitting":
            # A worker died between creating the attempt and recording the provider's handle: the provider
            # may have started it. Adopt that generation if the backend can find it, else submit again.
            if not await self._resume_lost_submit(run, latest):
                error = BackendUnavailable("the worker stopped while submitting; submitting again",
                                           backend=latest.backend)
                self._end_attempt(run, latest, "error", error=error)
            elif latest.state == "running":
                return Step("wait", attempt_id=latest.id)
        if latest is not None and latest.state == "ready":
            await self._collect(run, latest)
        while True:
            if self._covered_all(run) or len(run.loop.candidates) >= self.settings.best_of:
                break
            if not self._select_step(run):
                break
            if time.time() < run.loop.not_before:
                return Step("retry", at=run.loop.not_before)
            attempt = await self._submit(run)
            if attempt is not None and attempt.state != "ready":
                return Step("wait", attempt_id=attempt.id)
            if attempt is not None:  # done as soon as submitted (a local backend): collected in this unit
                await self._collect(run, attempt)
        if not run.loop.candidates and not run.loop.segments:
            failures = run.loop.failures
            raise GenerationFailed(
                "generation_failed",
                f"no usable clip after {run.loop.attempt} attempts "
                f"({failures[-1] if failures else 'no backend ran'}); "
                "nothing was charged — try again, or try another camera move or backend",
            )
        await self._finish_clip(run)
        return DONE

    def _select_step(self, run: _Run) -> bool:
        """Point ``run`` at the backend of the next attempt; False when the loop has nothing left to try."""
        assert run.route is not None
        loop = run.loop
        healthy = self._healthy(run)
        while loop.step < len(run.route.steps):
            step = run.route.steps[loop.step]
            run.backend, run.model = self.backend(step.backend), step.model
            if loop.attempt >= self._budget(run):
                return False
            cooling = loop.step + 1 < len(run.route.steps) and healthy(step.backend, step.model)
            if loop.tries < self.settings.attempts_per_backend and not loop.step_done and not cooling:
                return True
            if loop.candidates:
                return False
            loop.step, loop.tries, loop.step_done, loop.motion = loop.step + 1, 0, False, run.job.motion
        return False

    def _budget(self, run: _Run) -> int:
        """Attempts this job may make: ``max_attempts`` per segment it needs, throttled submits not counted."""
        segments = max(1, math.ceil(run.job.duration / self._max_segment(run)))
        return self.settings.max_attempts * segments + run.loop.throttled

    def _max_segment(self, run: _Run) -> float:
        assert run.backend is not None
        return max(run.backend.allowed_durations(run.model) or [run.backend.capabilities.durations[1]])

    def _extending(self, run: _Run) -> bool:
        """Whether this job is longer than its backend allows, so it is built from segments."""
        return bool(run.loop.segments) or run.job.duration > self._max_segment(run) + 1e-6

    def _covered(self, run: _Run) -> float:
        overlap = self.settings.stitch_overlap
        durations = [self._result(run, n).duration for n in run.loop.segments]
        return sum(durations) - overlap * max(0, len(durations) - 1)

    def _covered_all(self, run: _Run) -> bool:
        return bool(run.loop.segments) and self._covered(run) >= run.job.duration - 1e-6

    def _next_segment(self, run: _Run) -> float:
        """Length of the next generation: the whole clip, or the next segment of an extension.

        Segments overlap by ``stitch_overlap`` seconds for the cross-fade; a remainder that would be
        shorter than the backend allows is balanced with the segment before it.
        """
        assert run.backend is not None
        lo, hi = run.backend.capabilities.durations
        if not self._extending(run):
            return run.job.duration
        overlap = self.settings.stitch_overlap
        remaining = run.job.duration - self._covered(run) + (overlap if run.loop.segments else 0.0)
        if allowed := run.backend.allowed_durations(run.model):
            # A model with fixed lengths: the shortest that covers the rest, else its longest (the clip may
            # end up to one segment longer than asked, never shorter).
            return min((a for a in allowed if a >= remaining - 1e-6), default=max(allowed))
        if remaining <= hi:
            return max(remaining, lo)
        if remaining < 2 * hi - overlap:
            return max((remaining + overlap) / 2, lo)
        return hi

    async def _submit(self, run: _Run) -> Attempt | None:
        """Start the next attempt at its backend; the attempt, or None if the backend refused at once.

        A local backend (no network) is asked at once how it is doing, which costs nothing: an instant one
        is already done, and its attempt is recorded ``ready`` for the caller to collect in this unit.
        """
        backend, loop = run.backend, run.loop
        assert backend is not None and run.job.id is not None
        loop.attempt, loop.tries = loop.attempt + 1, loop.tries + 1
        if loop.attempt > 1:
            loop.seed = random.randrange(2**31)
        run.segment_duration = self._next_segment(run)
        out_name = self._out_name(run, backend)
        # The attempt row and the loop position are written before the provider hears of it: after a
        # crash the job finds the attempt and never submits it twice without knowing.
        with Session(self.engine, expire_on_commit=False) as session:
            attempt = Attempt(job_id=run.job.id, number=loop.attempt, backend=backend.name, model=run.model,
                              seed=loop.seed, motion=loop.motion, segment=len(loop.segments),
                              result={"duration": run.segment_duration})
            session.add(attempt)
            self._move(run, JobState.GENERATING, session=session, backend=backend.name,
                       detail={**run.job.detail, "loop": loop.to_json()},
                       event=("generating", {"backend": backend.name, "model": run.model, "attempt": loop.attempt,
                                             "max_attempts": self._budget(run), "segment": len(loop.segments)}))
            session.commit()
            attempt_id = attempt.id
        request = self._request(run, backend, out_name=out_name, webhook_url=self._webhook_url(backend, attempt_id))
        self._progress("generate", 0.0)
        adopted = False
        try:
            handle = await backend.submit(request)
        except BackendError as exc:
            # An answer lost on the way back (a timeout, a dropped connection) may hide a started, billed
            # generation: adopt it rather than start a second one. A refusal (4xx, 429) started nothing.
            recovered = await self._recover(backend, request, attempt) if exc.transient and not isinstance(
                exc, RateLimited) else None
            if recovered is None:
                self._record(run, "generate", "failed", 0.0, utcnow(), {"code": exc.code, "message": exc.message})
                self._end_attempt(run, attempt, "error", error=exc)
                return None
            handle, adopted = recovered, True
        # A local backend (no network) is asked at once, as is an adopted generation (its webhook may have
        # come and gone while nobody held it); a remote one is left to its webhook and the polls.
        await self._record_handle(attempt, handle, ask=not backend.capabilities.needs_network or adopted)
        return attempt

    async def _record_handle(self, attempt: Attempt, handle: Handle, *, ask: bool) -> None:
        """Save the provider's handle on ``attempt`` (running, or ready if ``ask`` finds it already done)."""
        now = utcnow()
        fields: dict[str, Any] = dict(handle=handle.to_json(), state="running", provider_id=handle.id,
                                      started_at=now, next_poll_at=now)
        attempt.sqlmodel_update(fields)
        if ask and (report := await self._answer_at_once(attempt)):
            fields.update(state="ready", report=report, next_poll_at=None)  # never polled
            attempt.sqlmodel_update(fields)
        self._update_attempt(attempt.job_id, attempt.number, **fields)

    def _out_name(self, run: _Run, backend: Backend) -> str:
        """The file name of the loop's current attempt."""
        loop = run.loop
        return artifacts.artifact_name(
            "generate", backend.name, run.model or "", run.camera.value, f"m{loop.motion}", f"s{loop.seed}",
            f"a{loop.attempt}", ext="mp4",
        )

    async def _recover(self, backend: Backend, request: GenerationRequest, attempt: Attempt) -> Handle | None:
        """The generation a lost submit of ``attempt`` started at the provider, or None."""
        started = attempt.started_at if attempt.started_at.tzinfo else attempt.started_at.replace(tzinfo=UTC)
        # Generations already held (this job's earlier attempts, a retried job with the same picture and
        # prompt) may have the same inputs: only one nobody holds can be the lost one.
        with Session(self.engine) as session:
            known = {i for i in session.exec(
                select(Attempt.provider_id).where(Attempt.backend == backend.name)
                .order_by(Attempt.id.desc()).limit(KNOWN_IDS_CHECKED)) if i}  # type: ignore[union-attr]
        try:
            handle = await backend.recover(request, since=started.timestamp(), known=known)
        except BackendError as exc:
            log.warning("attempt %s: could not look for the generation of a lost submit: %s", attempt.id, exc)
            return None
        if handle is not None:
            log.info("attempt %s: adopted %s's generation %s instead of submitting again", attempt.id,
                     backend.name, handle.id)
        return handle

    async def _resume_lost_submit(self, run: _Run, attempt: Attempt) -> bool:
        """Adopt the generation a crashed unit's submit started; whether one was found (``attempt`` is updated)."""
        backend = self.backend(attempt.backend)
        run.backend, run.model = backend, attempt.model  # the loop (seed, motion, number) was saved with it
        run.segment_duration = float(attempt.result.get("duration") or run.segment_duration)
        request = self._request(run, backend, out_name=self._out_name(run, backend),
                                webhook_url=self._webhook_url(backend, attempt.id))
        handle = await self._recover(backend, request, attempt)
        if handle is None:
            return False
        await self._record_handle(attempt, handle, ask=True)
        return True

    async def _answer_at_once(self, attempt: Attempt) -> dict[str, Any] | None:
        """A just-submitted attempt's final report if it already has one; None while it runs."""
        try:
            return await self.poll(attempt)
        except Exception:  # a backend bug: the attempt is recorded running, and the polls will ask again
            log.warning("attempt %s: status check right after submit failed", attempt.id, exc_info=True)
            return None

    def _webhook_url(self, backend: Backend, attempt_id: int | None) -> str:
        """Where the provider reports on this attempt, if the web endpoint is reachable from outside."""
        if not self.settings.public_url or attempt_id is None:
            return ""
        return self.settings.public_url.rstrip("/") + links.webhook_path(
            self.settings.webhook_key(), backend.name, attempt_id)

    async def poll(self, attempt: Attempt) -> dict[str, Any] | None:
        """Ask the provider about a running attempt: its final report, or None while it still works.

        An attempt past ``generation_timeout`` is canceled at the provider and reported as timed out.
        """
        backend = self.backend(attempt.backend)
        handle = Handle.from_json(attempt.handle)
        try:
            # A backend that cannot be polled answers from what its webhooks left in the handle.
            report = await backend.status(handle)
        except BackendError as exc:
            if exc.transient:
                return None  # asking failed, not the generation: ask again later
            return {"state": State.FAILED.value, "error": exc.to_json()}
        if report.state is State.SUCCEEDED:
            return {"state": State.SUCCEEDED.value}
        if report.state in (State.FAILED, State.CANCELED):
            error = report.error or BackendUnavailable(
                report.message or f"the generation was {report.state.value}", backend=backend.name
            )
            return {"state": report.state.value, "error": error.to_json()}
        started = attempt.started_at if attempt.started_at.tzinfo else attempt.started_at.replace(tzinfo=UTC)
        if (utcnow() - started).total_seconds() > self.settings.generation_timeout:
            with contextlib.suppress(BackendError):
                await backend.cancel(handle)
            error = BackendTimeout(f"no result after {self.settings.generation_timeout:g}s", backend=backend.name)
            return {"state": State.FAILED.value, "error": error.to_json()}
        if report.progress is not None:  # the stage itself reports 1.0 when it ends
            self._progress("generate", min(report.progress, 0.99))
        return None

    def mark_ready(self, attempt_id: int, report: dict[str, Any]) -> int | None:
        """Record a running attempt's final report; the job id it belongs to, or None if already recorded."""
        with Session(self.engine) as session:
            updated = session.execute(
                sa.update(Attempt)
                .where(Attempt.id == attempt_id, Attempt.state == "running")
                .values(state="ready", report=report, next_poll_at=None)
                .returning(Attempt.job_id)
            ).scalar_one_or_none()
            if updated is not None:
                session.execute(sa.update(Job).where(Job.id == updated).values(next_run_at=utcnow()))
            session.commit()
            return updated

    async def _collect(self, run: _Run, attempt: Attempt) -> None:
        """Fetch and judge a finished attempt, then record the verdict and the loop's next position."""
        assert run.route is not None
        run.backend = self.backend(attempt.backend)
        run.model = attempt.model
        run.segment_duration = float(attempt.result.get("duration", run.job.duration))
        started = attempt.started_at
        seconds = (utcnow() - (started if started.tzinfo else started.replace(tzinfo=UTC))).total_seconds()
        report = attempt.report
        try:
            if report.get("state") != State.SUCCEEDED.value:
                raise BackendError.from_json(report.get("error") or {"message": "the generation failed"})
            run.generated = await run.backend.result(Handle.from_json(attempt.handle))
        except BackendError as exc:
            self._record(run, "generate", "failed", seconds, started, {"code": exc.code, "message": exc.message})
            self._end_attempt(run, attempt, "error", error=exc)
            return
        result = {**attempt.result, **_result_json(run.generated)}
        self._record(run, "generate", "ok", seconds, started,
                     {"backend": attempt.backend, "attempt": attempt.number, "seed": attempt.seed,
                      "output": run.generated.video_path.name})
        with Session(self.engine) as session:
            session.execute(sa.update(Attempt).where(Attempt.id == attempt.id).values(
                result=result, output_path=str(run.generated.video_path), cost_usd=run.generated.cost_usd))
            self._move(run, JobState.CHECKING, session=session, cost_usd=run.job.cost_usd + run.generated.cost_usd)
            session.commit()
        attempt.result = result
        await self._stage(run, "check", self._check)
        assert run.verdict is not None
        if not run.verdict.accepted:
            self._end_attempt(run, attempt, "rejected")
            return
        if self._extending(run):
            run.loop.segments.append(attempt.number)
            if not self._covered_all(run):
                await self._continue_from_last_frame(run, run.generated)
        else:
            run.loop.candidates.append([run.verdict.score, attempt.number])
        run.loop.tries = 0  # a new segment starts a fresh count on this backend
        self._end_attempt(run, attempt, "accepted")

    def _end_attempt(self, run: _Run, attempt: Attempt, verdict: str, *, error: BackendError | None = None) -> None:
        """Record an attempt's verdict and move the loop on, in one transaction."""
        loop = run.loop
        fields: dict[str, Any] = {"verdict": verdict, "finished_at": utcnow(), "state": "finished",
                                  "next_poll_at": None}
        event = None
        if self.backend(attempt.backend).capabilities.needs_network:
            if error is not None:
                health.record_failure(self.engine, attempt.backend, attempt.model, error)
            elif verdict in ("accepted", "rejected"):  # the provider delivered, whatever the gate thinks
                health.record_success(self.engine, attempt.backend, attempt.model)
            run.healthy = None  # the next pick sees the cooldown this may have started
        if error is not None:
            fields.update(error_code=error.code, error_message=error.message[:2000])
            loop.failures.append(error.message)
            if isinstance(error, ContentRefused):
                self._save_attempt_and_loop(run, attempt, fields, None)
                raise GenerationFailed(error.code, _plain(error))
            if isinstance(error, RateLimited) and attempt.state == "submitting":
                # Turned away before anything started: wait as asked and submit again, without spending
                # the job's attempts (two jobs on a one-slot Cog server); ``job_deadline`` bounds the wait.
                loop.tries, loop.throttled = loop.tries - 1, loop.throttled + 1
                loop.not_before = time.time() + error.retry_after
            elif error.transient:
                loop.not_before = time.time() + self._backoff(loop.attempt, error)
            else:
                loop.step_done = True  # this backend cannot do it: next on the route
            event = ("retrying", {"attempt": attempt.number, "backend": attempt.backend, "reason": error.message})
        elif verdict == "rejected":
            assert run.verdict is not None
            fields["reasons"] = list(run.verdict.reasons)
            reasons = ", ".join(quality.REASON_TEXT.get(r, r) for r in run.verdict.reasons)
            loop.failures.append("it " + reasons)
            if {"drift", "wrong_start"} & set(run.verdict.reasons):
                loop.motion = max(0, loop.motion - 1)
            event = ("retrying", {"attempt": attempt.number, "backend": attempt.backend,
                                  "reasons": list(run.verdict.reasons), "reason": f"that one {reasons}"})
        elif run.verdict is not None:
            fields["reasons"] = list(run.verdict.reasons)
        self._save_attempt_and_loop(run, attempt, fields, event)

    def _save_attempt_and_loop(
        self, run: _Run, attempt: Attempt, fields: dict[str, Any], event: tuple[str, dict[str, Any]] | None
    ) -> None:
        with Session(self.engine) as session:
            session.execute(sa.update(Attempt).where(Attempt.id == attempt.id).values(**fields))
            self._move(run, run.job.job_state if run.job.job_state is not JobState.CHECKING else JobState.GENERATING,
                       session=session, detail={**run.job.detail, "loop": run.loop.to_json()}, event=event)
            session.commit()
        attempt.sqlmodel_update(fields)
        run.collected[attempt.number] = attempt

    async def _continue_from_last_frame(self, run: _Run, result: GenerationResult) -> None:
        """The next segment starts where this one's cross-fade will begin, so the fade joins like with like."""
        before = max(0, round(self.settings.stitch_overlap * result.fps) - 1)
        pixels = await asyncio.to_thread(postprocess.last_frame, result.video_path, before=before)
        path = run.artifact("generate", "lastframe", f"seg{len(run.loop.segments)}", ext="png")
        await asyncio.to_thread(Image.fromarray(pixels).save, path, compress_level=1)
        run.loop.segment_image = str(path)

    async def _finish_clip(self, run: _Run) -> None:
        """Post-process, encode and store the clip, then charge for it and announce it."""
        assert run.job.id is not None
        loop = run.loop
        made_by: Attempt | None = None
        if run.job.job_state in (JobState.GENERATING, JobState.CHECKING):
            chosen = None
            if loop.candidates:
                _, chosen_number = max(loop.candidates, key=lambda c: (c[0], -c[1]))
                chosen = int(chosen_number)
                for _, other in loop.candidates:
                    if int(other) != chosen:
                        self._update_attempt(run.job.id, int(other), verdict="runner-up")
            last = chosen or loop.segments[-1]
            made_by = run.collected.get(last) or self._attempt_row(run.job.id, last)
            self._move(run, JobState.POST_PROCESSING, backend=made_by.backend,
                       detail={**run.job.detail, "chosen": chosen}, event=("post-processing", {}))
        chosen = run.job.detail.get("chosen")
        if made_by is None:
            made_by = self._attempt_row(run.job.id, chosen or loop.segments[-1])
        run.generated = self._result(run, chosen, made_by) if chosen else None
        if run.job.job_state is JobState.POST_PROCESSING or self._clip(run.job.id) is None:
            for stage in ("post-process", "encode", "store"):
                await self._stage(run, stage, getattr(self, "_" + stage.replace("-", "_")))
        clip = run.clip or self._clip(run.job.id)
        assert clip is not None
        credits = self._charge(run, made_by)
        payload = {
            "clip": {"id": clip.id, "path": clip.path, "width": clip.width, "height": clip.height,
                     "duration": clip.duration, "bytes": clip.bytes},
            "backend": made_by.backend, "model": made_by.model, "seed": made_by.seed, "credits": credits,
            "prompt": run.job.prompt, "attempts": loop.attempt,
        }
        reserved = run.job.price_credits
        with Session(self.engine, expire_on_commit=False) as session:
            self._move(run, JobState.SUCCEEDED, session=session, next_run_at=None, price_credits=credits,
                       detail={**run.job.detail, "status": "succeeded"}, event=("succeeded", payload))
            if credits:
                ledger.capture(session, run.job.id, amount=credits)  # commits the job's end with the charge
            elif reserved:
                ledger.void(session, run.job.id)
            else:
                session.commit()  # a free job reserved nothing, so there is nothing to void

    def _charge(self, run: _Run, made_by: Attempt) -> int:
        """Credits for the clip: the price of the model that made it, never more than was reserved."""
        overrides = None
        if run.job.guild_id:
            with Session(self.engine) as session:
                guild = session.get(GuildSettings, run.job.guild_id)
                overrides = dict(guild.prices) if guild and guild.prices else None
        try:
            actual = pricing.price(made_by.backend, made_by.model, run.job.duration, overrides=overrides,
                                   end_frame="end_frame" in run.job.detail)
            actual += int(run.job.detail.get("paint", {}).get("credits", 0))  # a prompt-only job's still
        except pricing.UnknownPrice:
            actual = run.job.price_credits
        return min(actual, run.job.price_credits)

    def _result(self, run: _Run, number: int, row: Attempt | None = None) -> GenerationResult:
        raw = (row or self._attempt_row(run.job.id, number)).result
        return GenerationResult(video_path=Path(raw["video_path"]), width=raw["width"], height=raw["height"],
                                fps=raw["fps"], frames=raw["frames"], cost_usd=raw.get("cost_usd", 0.0))

    def _latest_attempt(self, run: _Run) -> Attempt | None:
        with Session(self.engine) as session:
            return session.exec(
                select(Attempt).where(Attempt.job_id == run.job.id).order_by(Attempt.number.desc())  # type: ignore[attr-defined]
            ).first()

    def _attempt(self, attempt_id: int | None) -> Attempt:
        with Session(self.engine) as session:
            attempt = session.get(Attempt, attempt_id)
            assert attempt is not None
            return attempt

    def _attempt_row(self, job_id: int | None, number: int) -> Attempt:
        with Session(self.engine) as session:
            return session.exec(select(Attempt).where(Attempt.job_id == job_id, Attempt.number == number)).one()

    def _update_attempt(self, job_id: int | None, number: int, **fields: Any) -> None:
        with Session(self.engine) as session:
            session.execute(
                sa.update(Attempt).where(Attempt.job_id == job_id, Attempt.number == number).values(**fields)
            )
            session.commit()

    def _clip(self, job_id: int) -> Clip | None:
        with Session(self.engine) as session:
            return session.exec(select(Clip).where(Clip.job_id == job_id)).first()

    def _request(
        self, run: _Run, backend: Backend | None, *, out_name: str, webhook_url: str = ""
    ) -> GenerationRequest:
        assert run.fitted is not None
        return GenerationRequest(
            image_path=run.segment_image or run.fitted,
            prompt=run.prompt,
            negative_prompt=run.negative,
            output_dir=artifacts.job_dir(self.settings.media_path, run.job.id or 0),
            output_name=out_name,
            camera=run.camera,
            motion=run.loop.motion,
            duration=run.segment_duration if backend else run.job.duration,
            aspect=run.aspect,
            width=run.width,
            height=run.height,
            fps=backend.capabilities.fps if backend else self.settings.output_fps,
            seed=run.loop.seed,
            model=run.model if backend else run.job.model,
            focus=run.focus,
            key=f"animabot-job{run.job.id}-attempt{run.loop.attempt}",
            attempt=run.loop.attempt,
            webhook_url=webhook_url,
            end_image_path=Path(end) if (end := run.job.detail.get("end_frame", {}).get("fitted"))
            and self._ends_clip(run, backend) else None,
        )

    def _ends_clip(self, run: _Run, backend: Backend | None) -> bool:
        """Whether the generation about to start makes the end of the clip (where an end frame belongs)."""
        if backend is None or not self._extending(run):
            return True
        overlap = self.settings.stitch_overlap if run.loop.segments else 0.0
        return self._covered(run) + run.segment_duration - overlap >= run.job.duration - 1e-6

    async def _check(self, run: _Run) -> dict[str, Any]:
        assert run.generated is not None
        run.verdict = await asyncio.to_thread(
            quality.judge, run.generated.video_path, width=run.width, height=run.height,
            fps=run.generated.fps, duration=run.segment_duration, source=run.segment_pixels(),
            thresholds=self.settings.quality_thresholds(),
        )
        return run.verdict.to_json()

    async def _post_process(self, run: _Run) -> dict[str, Any]:
        detail: dict[str, Any] = {}
        target = self.settings.output_fps
        segments = [self._result(run, number) for number in run.loop.segments]
        changed = bool(segments)
        if segments:
            stitched = run.artifact("post-process", f"stitch{len(segments)}", ext="mp4")
            report = await asyncio.to_thread(
                postprocess.stitch, [seg.video_path for seg in segments], stitched,
                overlap=self.settings.stitch_overlap, fps=target, width=run.width, height=run.height,
            )
            seams = await asyncio.to_thread(postprocess.seam_checks, stitched, report.seams, fps=target)
            detail["stitch"] = {"segments": len(segments), "frames": report.frames,
                                "seams": [_jsonable(seam) for seam in seams]}
            if any(seam.visible for seam in seams):
                raise GenerationFailed(
                    "visible_seam", "the segments of this long clip did not join smoothly; nothing was charged — "
                    "try again, or ask for a shorter clip",
                )
            current, fps = stitched, float(target)
        else:
            assert run.generated is not None
            current, fps = run.generated.video_path, run.generated.fps
        if round(fps) != target:
            out = run.artifact("post-process", f"{target}fps", self.settings.interpolation, ext="mp4")
            report = await asyncio.to_thread(
                postprocess.interpolate, current, out, fps=target, mode=self.settings.interpolation,
                duration=run.job.duration,
            )
            detail["interpolate"] = {"from_fps": fps, "fps": target, "mode": report.mode, "frames": report.frames}
            current, changed = out, True
        if changed:  # joining and smoothing make new frames: the gate judges them like any others
            verdict = await asyncio.to_thread(
                quality.judge, current, width=run.width, height=run.height, fps=target,
                duration=max(run.job.duration, self._covered(run)) if segments else run.job.duration,
                thresholds=self.settings.quality_thresholds(),
            )
            detail["verdict"] = verdict.to_json()
            if not verdict.accepted:
                reasons = ", ".join(quality.REASON_TEXT.get(r, r) for r in verdict.reasons)
                raise GenerationFailed(
                    "post_process_rejected",
                    f"the finished clip {reasons} after joining or smoothing it; nothing was charged — try again",
                )
        if prefix := run.job.detail.get("extends_clip"):
            current = await self._join_to_parent(run, Path(prefix), current, detail)
        run.finished = current
        if not detail:
            return {"skipped": True, "reason": f"already {target} fps, one segment"}
        return detail

    async def _join_to_parent(self, run: _Run, parent: Path, new: Path, detail: dict[str, Any]) -> Path:
        """An extension: the parent's clip, then the new part (which starts on its last frame), cross-faded."""
        target, overlap = self.settings.output_fps, self.settings.stitch_overlap
        joined = run.artifact("post-process", "extended", ext="mp4")
        report = await asyncio.to_thread(
            postprocess.stitch, [parent, new], joined, overlap=overlap, fps=target, width=run.width, height=run.height,
        )
        seams = await asyncio.to_thread(postprocess.seam_checks, joined, report.seams, fps=target)
        before = await asyncio.to_thread(video.probe, parent, count=False)
        verdict = await asyncio.to_thread(
            quality.judge, joined, width=run.width, height=run.height, fps=target,
            duration=before.duration + run.job.duration - overlap, thresholds=self.settings.quality_thresholds(),
        )
        detail["extend"] = {"parent_seconds": round(before.duration, 3), "frames": report.frames,
                            "seams": [_jsonable(seam) for seam in seams], "verdict": verdict.to_json()}
        if any(seam.visible for seam in seams) or not verdict.accepted:
            raise GenerationFailed(
                "visible_seam", "the new part did not join the clip smoothly; nothing was charged — try again",
            )
        return joined

    async def _encode(self, run: _Run) -> dict[str, Any]:
        assert run.finished is not None
        limit = self.settings.max_clip_bytes
        out = run.artifact("encode", "h264", _size_label(limit), ext="mp4")
        run.encoded = await asyncio.to_thread(encode.fit_to_limit, run.finished, out, limit_bytes=limit)
        return {"bytes": run.encoded.bytes, "limit": limit, "method": run.encoded.method}

    async def _store(self, run: _Run) -> dict[str, Any]:
        assert run.encoded is not None and run.job.id is not None
        final = run.encoded.path
        info = await asyncio.to_thread(video.probe, final, count=False)
        with Session(self.engine, expire_on_commit=False) as session:
            # A clip is written only here, with the move to delivering: a job still post-processing has none.
            found = None if run.job.job_state is JobState.POST_PROCESSING else session.exec(
                select(Clip).where(Clip.job_id == run.job.id)).first()
            clip = found or Clip(job_id=run.job.id)
            clip.sqlmodel_update(dict(
                account_id=run.job.account_id, guild_id=run.job.guild_id, path=str(final), width=info.width,
                height=info.height, duration=round(info.duration, 3), bytes=info.bytes,
                backend=run.job.backend or "", prompt=run.job.prompt,
            ))
            session.add(clip)  # a redone store (after a crash) updates the clip; a job never has two
            self._move(run, JobState.DELIVERING, session=session, output_path=str(final))
            session.commit()
        run.clip = clip
        return {"path": str(final)}

    def _backend_class(self, name: str) -> type[Backend]:
        if name in self._backends:
            return type(self._backends[name])
        try:
            return get_backend_class(name)
        except UnknownBackend as exc:
            raise InvalidParameters(str(exc)) from None


def _result_json(result: GenerationResult) -> dict[str, Any]:
    return {"video_path": str(result.video_path), "width": result.width, "height": result.height,
            "fps": result.fps, "frames": result.frames, "cost_usd": result.cost_usd}


def _map_box(box: Box, fit: imaging.FitReport) -> Box:
    """A box in source-image pixels, in the pixels of the fitted picture."""
    k = fit.scale
    if fit.crop_box is not None:
        x0, y0 = fit.crop_box[0], fit.crop_box[1]
        return Box((box.x - x0) * k, (box.y - y0) * k, box.width * k, box.height * k)
    left, top = (fit.pad[0], fit.pad[1]) if fit.pad else (0, 0)
    return Box(box.x * k + left, box.y * k + top, box.width * k, box.height * k)


def _size_label(limit: int) -> str:
    mib = limit / (1024 * 1024)
    return f"{mib:g}MiB" if mib >= 1 else f"{limit // 1024}KiB"


def _plain(exc: BackendError) -> str:
    if exc.code == "content_refused":
        return f"the model refused this picture or prompt ({exc.message}); nothing was charged"
    return f"generation failed: {exc.message}; nothing was charged"


def _jsonable(value: Any) -> Any:
    """Dataclasses, paths and tuples as plain JSON types."""
    from dataclasses import asdict, is_dataclass

    if is_dataclass(value) and not isinstance(value, type):
        return _jsonable(asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    return str(value)
