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

The CLI runs this in-process; the job system will run the same stages from its tasks.
"""

from __future__ import annotations

import asyncio
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
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
    State,
)
from backends.registry import UnknownBackend, create_backend, get_backend_class
from worker import artifacts, encode, imaging, ledger, postprocess, pricing, prompts, quality, routing, subject
from worker.errors import InvalidParameters, UserError
from worker.models import Attempt, Clip, GuildSettings, Job, JobStage, JobState, utcnow
from worker.settings import Settings

ProgressCallback = Callable[[str, float], None]

#: The job state a stage runs in.
STAGE_STATE = {
    "validate": JobState.VALIDATING,
    "classify": JobState.VALIDATING,
    "enhance": JobState.VALIDATING,
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
    faces: tuple[Box, ...] = ()
    focus: Box | None = None
    fitted_pixels: np.ndarray | None = None
    route: routing.Route | None = None
    camera: CameraMove = CameraMove.ZOOM_IN
    motion: int = 2
    model: str | None = None
    backend: Backend | None = None
    prompt: str = ""
    negative: str = ""
    seed: int = 0
    attempt: int = 0
    candidates: list[tuple[float, int, GenerationResult, quality.Verdict]] = field(default_factory=list)
    segments: list[GenerationResult] = field(default_factory=list)
    segment_image: Path | None = None
    segment_pixels: np.ndarray | None = None
    segment_duration: float = 0.0
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
            for stage in ("validate", "classify", "enhance", "route", "prompt"):
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

    async def _classify(self, run: _Run) -> dict[str, Any]:
        assert run.source is not None
        found = await asyncio.to_thread(subject.classify, run.source.image)
        run.subject, run.faces = found.kind, found.faces
        self._move(run, JobState.VALIDATING, subject=run.subject)
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
        return detail

    async def _route(self, run: _Run) -> dict[str, Any]:
        steering = prompts.steer(run.subject, CameraMove(run.job.camera))
        run.camera, run.motion = steering.camera, run.job.motion
        overrides = self._guild_overrides(run.job.guild_id)
        probe = self._request(run, None, out_name="probe.mp4")
        run.route = routing.plan_route(
            run.subject, probe, self.settings, backend=run.job.requested_backend, model=run.job.model,
            guild_overrides=overrides, instances=self._backends,
        )
        first = run.route.steps[0]
        try:
            credits = pricing.price(first.backend, first.model, run.job.duration)
        except pricing.UnknownPrice:
            credits = 0
        self._move(run, JobState.VALIDATING, backend=first.backend,
                   price_credits=max(run.job.price_credits, credits))
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
        built = prompts.build_prompt(run.subject, run.job.prompt, run.camera, motion=run.motion,
                                     negative=run.job.negative_prompt)
        run.prompt, run.negative = built.prompt, built.negative
        return {"prompt": run.prompt, "negative": run.negative}

    async def _generate_until_accepted(self, run: _Run) -> None:
        """The single retry loop, along the route.

        Each backend gets up to ``attempts_per_backend`` attempts and the job ``max_attempts`` in all.
        A transient error or a rejected clip is retried with a new seed (after a drift rejection also
        with one step less motion, the known cure for morphing); a permanent error moves on to the
        next backend; a moderation refusal ends the job. With ``best_of`` > 1 the job keeps generating
        until it has that many accepted candidates (or the budget is spent) and keeps the best.
        """
        assert run.route is not None and run.fitted is not None
        failures: list[str] = []
        run.segment_image, run.segment_pixels = run.fitted, run.fitted_pixels
        for step in run.route.steps:
            run.backend, run.model, run.motion = self.backend(step.backend), step.model, run.job.motion
            tries = 0
            while tries < self.settings.attempts_per_backend and run.attempt < self._budget(run):
                tries += 1
                run.attempt, run.generated, run.verdict = run.attempt + 1, None, None
                run.segment_duration = self._next_segment(run)
                if run.attempt > 1:
                    run.seed = random.randrange(2**31)
                try:
                    await self._stage(run, "generate", self._generate)
                except BackendError as exc:
                    self._end_attempt(run, "error", error=exc)
                    failures.append(exc.message)
                    if isinstance(exc, ContentRefused):
                        raise GenerationFailed(exc.code, _plain(exc)) from exc
                    if not exc.transient:
                        break  # this backend cannot do it: next on the route
                    await asyncio.sleep(min(self.settings.retry_backoff * 2 ** (run.attempt - 1), 30.0))
                    continue
                await self._stage(run, "check", self._check)
                verdict, result = run.verdict, run.generated
                assert verdict is not None and result is not None
                if not verdict.accepted:
                    self._end_attempt(run, "rejected")
                    failures.append("it " + ", ".join(quality.REASON_TEXT.get(r, r) for r in verdict.reasons))
                    if {"drift", "wrong_start"} & set(verdict.reasons):
                        run.motion = max(0, run.motion - 1)
                    continue
                self._end_attempt(run, "accepted")
                tries = 0  # a new segment starts a fresh count on this backend
                if self._extending(run):
                    run.segments.append(result)
                    if self._covered(run) >= run.job.duration - 1e-6:
                        return
                    await self._continue_from_last_frame(run, result)
                    continue
                run.candidates.append((verdict.score, run.attempt, result, verdict))
                if len(run.candidates) >= self.settings.best_of:
                    break
            if run.candidates or run.attempt >= self._budget(run):
                break
        if run.candidates:
            _, number, result, verdict = max(run.candidates, key=lambda c: (c[0], -c[1]))
            run.generated, run.verdict = result, verdict
            assert run.backend is not None
            chosen = self._attempt_backend(run.job.id, number)
            self._move(run, run.job.job_state, backend=chosen)
            for _, other, _, _ in run.candidates:
                if other != number:
                    self._set_verdict(run.job.id, other, "runner-up")
            return
        raise GenerationFailed(
            "generation_failed",
            f"no usable clip after {run.attempt} attempts ({failures[-1] if failures else 'no backend ran'}); "
            "nothing was charged — try again, or try another camera move or backend",
        )

    def _budget(self, run: _Run) -> int:
        """Attempts this job may make: ``max_attempts`` per segment it needs."""
        return self.settings.max_attempts * max(1, math.ceil(run.job.duration / self._max_segment(run)))

    def _max_segment(self, run: _Run) -> float:
        assert run.backend is not None
        return run.backend.capabilities.durations[1]

    def _extending(self, run: _Run) -> bool:
        """Whether this job is longer than its backend allows, so it is built from segments."""
        return bool(run.segments) or run.job.duration > self._max_segment(run) + 1e-6

    def _covered(self, run: _Run) -> float:
        overlap = self.settings.stitch_overlap
        return sum(seg.duration for seg in run.segments) - overlap * max(0, len(run.segments) - 1)

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
        remaining = run.job.duration - self._covered(run) + (overlap if run.segments else 0.0)
        if remaining <= hi:
            return max(remaining, lo)
        if remaining < 2 * hi - overlap:
            return max((remaining + overlap) / 2, lo)
        return hi

    async def _continue_from_last_frame(self, run: _Run, result: GenerationResult) -> None:
        """The next segment starts where this one's cross-fade will begin, so the fade joins like with like."""
        before = max(0, round(self.settings.stitch_overlap * result.fps) - 1)
        pixels = await asyncio.to_thread(postprocess.last_frame, result.video_path, before=before)
        path = run.artifact("generate", "lastframe", f"seg{len(run.segments)}", ext="png")
        await asyncio.to_thread(Image.fromarray(pixels).save, path, compress_level=1)
        run.segment_image, run.segment_pixels = path, pixels

    def _attempt_backend(self, job_id: int | None, number: int) -> str:
        with Session(self.engine) as session:
            return session.exec(
                select(Attempt.backend).where(Attempt.job_id == job_id, Attempt.number == number)
            ).one()

    def _set_verdict(self, job_id: int | None, number: int, verdict: str) -> None:
        with Session(self.engine) as session:
            attempt = session.exec(
                select(Attempt).where(Attempt.job_id == job_id, Attempt.number == number)
            ).one()
            attempt.verdict = verdict
            session.add(attempt)
            session.commit()

    def _request(self, run: _Run, backend: Backend | None, *, out_name: str) -> GenerationRequest:
        assert run.fitted is not None
        return GenerationRequest(
            image_path=run.segment_image or run.fitted,
            prompt=run.prompt,
            negative_prompt=run.negative,
            output_dir=artifacts.job_dir(self.settings.media_path, run.job.id or 0),
            output_name=out_name,
            camera=run.camera,
            motion=run.motion,
            duration=run.segment_duration if backend else run.job.duration,
            aspect=run.aspect,
            width=run.width,
            height=run.height,
            fps=backend.capabilities.fps if backend else self.settings.output_fps,
            seed=run.seed,
            model=run.model if backend else run.job.model,
            focus=run.focus,
        )

    async def _generate(self, run: _Run) -> dict[str, Any]:
        backend = run.backend
        assert backend is not None and run.job.id is not None
        out_name = artifacts.artifact_name(
            "generate", backend.name, run.model or "", run.camera.value, f"m{run.motion}", f"s{run.seed}",
            f"a{run.attempt}", ext="mp4",
        )
        request = self._request(run, backend, out_name=out_name)
        with Session(self.engine) as session:
            session.add(
                Attempt(job_id=run.job.id, number=run.attempt, backend=backend.name, model=run.model,
                        seed=run.seed, motion=run.motion)
            )
            session.commit()
        handle = await backend.submit(request)
        self._update_attempt(run, handle=handle.to_json(), state="running")
        run.generated = await self._wait(backend, handle)
        self._update_attempt(run, state="generated", output_path=str(run.generated.video_path),
                             cost_usd=run.generated.cost_usd)
        if run.generated.cost_usd:  # the provider is paid for every output, accepted or not
            self._move(run, run.job.job_state, cost_usd=run.job.cost_usd + run.generated.cost_usd)
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

    async def _check(self, run: _Run) -> dict[str, Any]:
        assert run.generated is not None
        run.verdict = await asyncio.to_thread(
            quality.judge, run.generated.video_path, width=run.width, height=run.height,
            fps=run.generated.fps, duration=run.segment_duration, source=run.segment_pixels,
            thresholds=self.settings.quality_thresholds(),
        )
        return run.verdict.to_json()

    async def _post_process(self, run: _Run) -> dict[str, Any]:
        detail: dict[str, Any] = {}
        target = self.settings.output_fps
        changed = bool(run.segments)
        if run.segments:
            stitched = run.artifact("post-process", f"stitch{len(run.segments)}", ext="mp4")
            report = await asyncio.to_thread(
                postprocess.stitch, [seg.video_path for seg in run.segments], stitched,
                overlap=self.settings.stitch_overlap, fps=target, width=run.width, height=run.height,
            )
            seams = await asyncio.to_thread(postprocess.seam_checks, stitched, report.seams, fps=target)
            detail["stitch"] = {"segments": len(run.segments), "frames": report.frames,
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
                duration=run.job.duration, thresholds=self.settings.quality_thresholds(),
            )
            detail["verdict"] = verdict.to_json()
            if not verdict.accepted:
                reasons = ", ".join(quality.REASON_TEXT.get(r, r) for r in verdict.reasons)
                raise GenerationFailed(
                    "post_process_rejected",
                    f"the finished clip {reasons} after joining or smoothing it; nothing was charged — try again",
                )
        run.finished = current
        if not detail:
            return {"skipped": True, "reason": f"already {target} fps, one segment"}
        return detail

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
