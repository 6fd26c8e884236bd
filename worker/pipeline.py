"""The pipeline: turns a queued job into a stored clip, one plain stage at a time.

    validate → enhance → classify → route → prompt → generate → check → post-process → encode → store

Each stage is a method that reads what earlier stages left on the :class:`_Run` and returns a small
JSON-able dict of what it found; the runner records that, the outcome and the timing as a
:class:`~worker.models.JobStage` row and moves the job along its state machine. ``generate`` and
``check`` form the one retry loop: a transient backend error or a rejected clip is retried with a new
seed until ``settings.max_attempts`` attempts are spent.

Outcomes, as front ends report them:

- ``succeeded`` — a clip is stored and delivered; the reservation (if any) is captured.
- ``rejected`` — the input was refused (:class:`~worker.errors.UserError`); nothing was generated.
- ``failed`` — generation did not produce an acceptable clip; the reservation is voided.

The CLI runs this in-process; the job system will run the same stages from its tasks.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session, select

from backends import video
from backends.base import (
    Aspect,
    Backend,
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    CameraMove,
    GenerationRequest,
    GenerationResult,
    Handle,
    State,
)
from backends.registry import UnknownBackend, create_backend, get_backend_class
from worker import artifacts, encode, imaging, ledger, pricing, quality
from worker.errors import InvalidParameters, UserError
from worker.models import Attempt, Clip, Job, JobStage, JobState, utcnow
from worker.settings import Settings

ProgressCallback = Callable[[str, float], None]

#: The job state a stage runs in.
STAGE_STATE = {
    "validate": JobState.VALIDATING,
    "enhance": JobState.VALIDATING,
    "classify": JobState.VALIDATING,
    "route": JobState.VALIDATING,
    "prompt": JobState.VALIDATING,
    "generate": JobState.GENERATING,
    "check": JobState.CHECKING,
    "post-process": JobState.POST_PROCESSING,
    "encode": JobState.POST_PROCESSING,
    "store": JobState.DELIVERING,
}


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
class _Run:
    """What the stages of one job hand each other."""

    job: Job
    settings: Settings
    deliver_to: Path | None
    source: imaging.SourceImage | None = None
    aspect: Aspect = Aspect.LANDSCAPE
    width: int = 0
    height: int = 0
    fitted: Path | None = None
    subject: str = "unknown"
    backend: Backend | None = None
    prompt: str = ""
    negative: str = ""
    seed: int = 0
    attempt: int = 0
    generated: GenerationResult | None = None
    verdict: quality.Verdict | None = None
    finished: Path | None = None
    encoded: encode.EncodeReport | None = None

    @property
    def media(self) -> Path:
        return self.settings.media_path

    def artifact(self, stage: str, *parts: object, ext: str) -> Path:
        assert self.job.id is not None
        return artifacts.artifact_path(self.media, self.job.id, stage, *parts, ext=ext)


class Pipeline:
    """Runs jobs through every stage and records what happened on them.

    ``backends`` maps a backend name to a ready instance (e.g. a :class:`backends.fake.FakeBackend` with
    scripted outcomes); other backends are created from the registry on first use.
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

    # -- running -------------------------------------------------------------------------------

    async def run(self, job_id: int, *, deliver_to: Path | None = None) -> JobOutcome:
        """Run job ``job_id`` to its end; with ``deliver_to``, copy the finished clip there."""
        started = time.perf_counter()
        with Session(self.engine) as session:
            job = session.get(Job, job_id)
            if job is None:
                raise LookupError(f"no job {job_id}")
            session.expunge(job)
        run = _Run(job=job, settings=self.settings, deliver_to=deliver_to, seed=job.seed)
        status, error = "succeeded", None
        try:
            for stage in ("validate", "enhance", "classify", "route", "prompt"):
                await self._stage(run, stage, getattr(self, "_" + stage))
            await self._generate_until_accepted(run)
            for stage in ("post-process", "encode", "store"):
                await self._stage(run, stage, getattr(self, "_" + stage.replace("-", "_")))
            self._finish(run, JobState.SUCCEEDED)
        except UserError as exc:
            status, error = "rejected", exc.to_json()
            self._finish(run, JobState.FAILED, exc.code, exc.message)
        except GenerationFailed as exc:
            status, error = "failed", {"code": exc.code, "message": exc.message}
            self._finish(run, JobState.FAILED, exc.code, exc.message)
        return self._outcome(run, status, error, time.perf_counter() - started)

    async def _stage(self, run: _Run, stage: str, fn: Callable[[_Run], Any]) -> dict[str, Any]:
        self._move(run, STAGE_STATE[stage])
        self._progress(stage, 0.0)
        t0 = time.perf_counter()
        started_at = utcnow()
        try:
            detail = await fn(run) or {}
        except (UserError, GenerationFailed, BackendError) as exc:
            failure = {"code": exc.code, "message": getattr(exc, "message", str(exc))}
            self._record(run, stage, "failed", time.perf_counter() - t0, started_at, failure)
            raise
        outcome = "skipped" if detail.get("skipped") else "ok"
        if stage == "check" and run.verdict is not None and not run.verdict.accepted:
            outcome = "rejected"
        self._record(run, stage, outcome, time.perf_counter() - t0, started_at, detail)
        self._progress(stage, 1.0)
        return detail

    def _record(
        self, run: _Run, stage: str, outcome: str, seconds: float, started_at: Any, detail: dict[str, Any]
    ) -> None:
        assert run.job.id is not None
        with Session(self.engine) as session:
            session.add(
                JobStage(
                    job_id=run.job.id, stage=stage, outcome=outcome, seconds=round(seconds, 4),
                    detail=_jsonable(detail), started_at=started_at,
                )
            )
            session.commit()

    def _move(self, run: _Run, state: JobState, **fields: Any) -> None:
        with Session(self.engine) as session:
            job = session.get(Job, run.job.id)
            assert job is not None
            job.advance(state)
            for name, value in fields.items():
                setattr(job, name, value)
            job.updated_at = utcnow()
            session.add(job)
            session.commit()
            session.refresh(job)
            session.expunge(job)
            run.job = job

    def _finish(self, run: _Run, state: JobState, code: str | None = None, message: str | None = None) -> None:
        assert run.job.id is not None
        with Session(self.engine) as session:
            if state is JobState.SUCCEEDED:
                ledger.capture(session, run.job.id)
            else:
                ledger.void(session, run.job.id)
        self._move(run, state, error_code=code, error_message=message)

    def _outcome(self, run: _Run, status: str, error: dict[str, str] | None, seconds: float) -> JobOutcome:
        assert run.job.id is not None
        with Session(self.engine) as session:
            attempts = session.exec(
                select(Attempt).where(Attempt.job_id == run.job.id).order_by(Attempt.number)
            ).all()
            clip = session.exec(select(Clip).where(Clip.job_id == run.job.id)).first()
        output = run.deliver_to if (status == "succeeded" and run.deliver_to) else None
        if status == "succeeded" and output is None and run.job.output_path:
            output = Path(run.job.output_path)
        return JobOutcome(
            job_id=run.job.id,
            status=status,
            output=output,
            subject=run.job.subject,
            backend=run.job.backend,
            attempts=[
                {
                    "number": a.number, "backend": a.backend, "seed": a.seed, "motion": a.motion,
                    "verdict": a.verdict, "reasons": a.reasons, "error": a.error_code,
                }
                for a in attempts
            ],
            cost={"credits": run.job.price_credits, "usd": round(run.job.cost_usd, 4)},
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
        self._move(run, JobState.VALIDATING, source_path=str(kept))
        return {
            "format": source.format, "size": list(source.size), "bytes": source.bytes,
            "orientation_fixed": source.orientation_fixed, "conversions": source.conversions,
        }

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
        fitted, report = await asyncio.to_thread(
            imaging.fit, run.source.image, run.aspect, width=run.width, height=run.height,
            mode=self.settings.fit_mode,
        )
        run.fitted = run.artifact("enhance", f"{run.width}x{run.height}", self.settings.fit_mode, ext="png")
        await asyncio.to_thread(fitted.save, run.fitted, compress_level=1)
        return {"aspect": run.aspect.value, "width": run.width, "height": run.height, **_jsonable(report)}

    async def _classify(self, run: _Run) -> dict[str, Any]:
        run.subject = "unknown"
        self._move(run, JobState.VALIDATING, subject=run.subject)
        return {"subject": run.subject, "confidence": 0.0, "faces": []}

    async def _route(self, run: _Run) -> dict[str, Any]:
        name = run.job.requested_backend or self.settings.default_backend
        cls = self._backend_class(name)
        usable = cls.check_usable(self.settings)
        if not usable.usable:
            raise InvalidParameters(f"backend {name!r} is not usable here: {usable.reason}")
        backend = self.backend(name)
        refusals = backend.refusals(self._request(run, backend, out_name="probe.mp4"))
        if refusals:
            raise InvalidParameters(f"backend {name!r} cannot do this: " + "; ".join(refusals))
        run.backend = backend
        try:
            credits = pricing.price(name, run.job.model, run.job.duration)
        except pricing.UnknownPrice:
            credits = 0
        self._move(run, JobState.VALIDATING, backend=name, price_credits=max(run.job.price_credits, credits))
        reason = "requested by the user" if run.job.requested_backend else "the configured default backend"
        return {"backend": name, "reason": reason, "price_credits": credits}

    async def _prompt(self, run: _Run) -> dict[str, Any]:
        run.prompt, run.negative = run.job.prompt, run.job.negative_prompt
        return {"prompt": run.prompt, "negative": run.negative}

    async def _generate_until_accepted(self, run: _Run) -> None:
        """The single retry loop: generate, check, and on a transient error or a rejection go again."""
        failures: list[str] = []
        for number in range(1, self.settings.max_attempts + 1):
            run.attempt, run.generated, run.verdict = number, None, None
            if number > 1:
                run.seed = random.randrange(2**31)
            try:
                await self._stage(run, "generate", self._generate)
            except BackendError as exc:
                self._end_attempt(run, "error", error=exc)
                failures.append(exc.message)
                if not exc.transient:
                    raise GenerationFailed(exc.code, _plain(exc)) from exc
                await asyncio.sleep(min(self.settings.retry_backoff * 2 ** (number - 1), 30.0))
                continue
            await self._stage(run, "check", self._check)
            assert run.verdict is not None
            self._end_attempt(run, "accepted" if run.verdict.accepted else "rejected")
            if run.verdict.accepted:
                return
            failures.append("the output " + ", ".join(run.verdict.reasons).replace("_", " "))
        raise GenerationFailed(
            "generation_failed",
            f"no usable clip after {self.settings.max_attempts} attempts ({failures[-1]}); "
            "nothing was charged — try again, or try another camera move or backend",
        )

    def _request(self, run: _Run, backend: Backend, *, out_name: str) -> GenerationRequest:
        assert run.fitted is not None
        return GenerationRequest(
            image_path=run.fitted,
            prompt=run.prompt,
            negative_prompt=run.negative,
            output_dir=artifacts.job_dir(self.settings.media_path, run.job.id or 0),
            output_name=out_name,
            camera=CameraMove(run.job.camera),
            motion=run.job.motion,
            duration=run.job.duration,
            aspect=run.aspect,
            width=run.width,
            height=run.height,
            fps=backend.capabilities.fps,
            seed=run.seed,
            model=run.job.model,
        )

    async def _generate(self, run: _Run) -> dict[str, Any]:
        backend = run.backend
        assert backend is not None and run.job.id is not None
        out_name = artifacts.artifact_name(
            "generate", backend.name, run.job.camera, f"m{run.job.motion}", f"s{run.seed}",
            f"a{run.attempt}", ext="mp4",
        )
        request = self._request(run, backend, out_name=out_name)
        with Session(self.engine) as session:
            session.add(
                Attempt(job_id=run.job.id, number=run.attempt, backend=backend.name, model=run.job.model,
                        seed=run.seed, motion=run.job.motion)
            )
            session.commit()
        handle = await backend.submit(request)
        self._update_attempt(run, handle=handle.to_json(), state="running")
        run.generated = await self._wait(backend, handle)
        self._update_attempt(run, state="generated", output_path=str(run.generated.video_path),
                             cost_usd=run.generated.cost_usd)
        return {"backend": backend.name, "attempt": run.attempt, "seed": run.seed,
                "output": run.generated.video_path.name}

    async def _wait(self, backend: Backend, handle: Handle) -> GenerationResult:
        deadline = time.monotonic() + self.settings.generation_timeout
        interval = 0.02
        while True:
            report = await backend.status(handle)
            if report.progress is not None:  # the stage itself reports 1.0 when it ends
                self._progress("generate", min(report.progress, 0.99))
            if report.state is State.SUCCEEDED:
                return await backend.result(handle)
            if report.state is State.FAILED:
                raise report.error or BackendUnavailable(report.message or "generation failed")
            if report.state is State.CANCELED:
                raise GenerationFailed("canceled", "the generation was canceled")
            if time.monotonic() > deadline:
                await backend.cancel(handle)
                raise BackendTimeout(f"no result after {self.settings.generation_timeout:g}s", backend=backend.name)
            await asyncio.sleep(interval)
            interval = min(interval * 1.5, 1.0)

    def _update_attempt(self, run: _Run, **fields: Any) -> None:
        with Session(self.engine) as session:
            attempt = session.exec(
                select(Attempt).where(Attempt.job_id == run.job.id, Attempt.number == run.attempt)
            ).one()
            for name, value in fields.items():
                setattr(attempt, name, value)
            session.add(attempt)
            session.commit()

    def _end_attempt(self, run: _Run, verdict: str, *, error: BackendError | None = None) -> None:
        fields: dict[str, Any] = {"verdict": verdict, "finished_at": utcnow(), "state": "finished"}
        if run.verdict is not None and error is None:
            fields["reasons"] = list(run.verdict.reasons)
        if error is not None:
            fields.update(error_code=error.code, error_message=error.message[:2000])
        self._update_attempt(run, **fields)
        if run.generated is not None and verdict == "accepted":
            with Session(self.engine) as session:
                job = session.get(Job, run.job.id)
                assert job is not None
                job.cost_usd += run.generated.cost_usd
                session.add(job)
                session.commit()

    async def _check(self, run: _Run) -> dict[str, Any]:
        assert run.generated is not None
        run.verdict = await asyncio.to_thread(
            quality.judge, run.generated.video_path, width=run.width, height=run.height,
            fps=run.generated.fps, duration=run.job.duration,
        )
        return run.verdict.to_json()

    async def _post_process(self, run: _Run) -> dict[str, Any]:
        assert run.generated is not None
        target = self.settings.output_fps
        if round(run.generated.fps) == target:
            run.finished = run.generated.video_path
            return {"skipped": True, "reason": f"already {target} fps"}
        run.finished = run.artifact("post-process", f"{target}fps", ext="mp4")
        await asyncio.to_thread(encode.change_fps, run.generated.video_path, run.finished, target)
        return {"fps": [run.generated.fps, target], "method": "duplicate"}

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
        with Session(self.engine) as session:
            session.add(
                Clip(job_id=run.job.id, account_id=run.job.account_id, guild_id=run.job.guild_id,
                     path=str(final), width=info.width, height=info.height, duration=round(info.duration, 3),
                     bytes=info.bytes, backend=run.job.backend or "", prompt=run.job.prompt)
            )
            session.commit()
        detail: dict[str, Any] = {"path": str(final)}
        if run.deliver_to is not None:
            run.deliver_to.parent.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(shutil.copyfile, final, run.deliver_to)
            detail["delivered_to"] = str(run.deliver_to)
        self._move(run, JobState.DELIVERING, output_path=str(final))
        return detail

    def _backend_class(self, name: str) -> type[Backend]:
        if name in self._backends:
            return type(self._backends[name])
        try:
            return get_backend_class(name)
        except UnknownBackend as exc:
            raise InvalidParameters(str(exc)) from None


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
