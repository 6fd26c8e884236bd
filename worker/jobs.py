"""Creating jobs: the parameters a user may choose, checked once, and the job row that records them.

Every front end (the CLI now, the Discord bot and the job system later) builds a :class:`JobParams`
and calls :func:`create_job`; the pipeline then reads everything it needs from the row.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from backends.base import Aspect, CameraMove
from worker import ledger, pricing
from worker.errors import InvalidParameters
from worker.models import Job, utcnow

ASPECTS = ("auto", *(a.value for a in Aspect))
MAX_PROMPT = 1000
MAX_DURATION = 60.0


@dataclass(frozen=True)
class JobParams:
    """What the user asked for. ``seed=None`` picks a random seed; ``aspect="auto"`` follows the image."""

    prompt: str
    camera: CameraMove = CameraMove.ZOOM_IN
    motion: int = 2
    duration: float = 5.0
    aspect: str = "auto"
    seed: int | None = None
    negative: str = ""
    backend: str | None = None
    model: str | None = None

    def checked(self) -> JobParams:
        """These parameters, or :class:`InvalidParameters` saying which one is wrong and what would work."""
        prompt = self.prompt.strip()
        if not prompt:
            raise InvalidParameters("the prompt is empty; describe the motion you want, e.g. 'gentle waves'")
        if len(prompt) > MAX_PROMPT:
            raise InvalidParameters(f"the prompt has {len(prompt)} characters; keep it under {MAX_PROMPT}")
        if len(self.negative) > MAX_PROMPT:
            raise InvalidParameters(f"the negative prompt is over {MAX_PROMPT} characters; shorten it")
        try:
            camera = CameraMove(self.camera)
        except ValueError:
            moves = ", ".join(c.value for c in CameraMove)
            raise InvalidParameters(f"unknown camera move {self.camera!r}; use one of: {moves}") from None
        if not 0 <= self.motion <= 4:
            raise InvalidParameters(f"motion {self.motion} is out of range; use 0 (subtle) to 4 (strong)")
        if not 0 < self.duration <= MAX_DURATION:
            raise InvalidParameters(
                f"duration {self.duration:g}s is out of range; use more than 0 and at most {MAX_DURATION:g}s"
            )
        if self.aspect not in ASPECTS:
            raise InvalidParameters(f"unknown aspect {self.aspect!r}; use one of: {', '.join(ASPECTS)}")
        if self.seed is not None and not 0 <= self.seed < 2**31:
            raise InvalidParameters(f"seed {self.seed} is out of range; use 0 to {2**31 - 1}")
        seed = self.seed if self.seed is not None else random.randrange(2**31)
        return JobParams(**{**asdict(self), "prompt": prompt, "camera": camera, "seed": seed})


def create_or_find_job(
    engine: Engine,
    params: JobParams,
    *,
    source_path: Path | None = None,
    key: str | None = None,
    account_id: int | None = None,
    guild_id: str | None = None,
    channel_id: str | None = None,
    parent_job_id: int | None = None,
    default_backend: str = "local",
    price: int | None = None,
    admit: Callable[[Session, Job], None] | None = None,
    detail: dict[str, Any] | None = None,
) -> tuple[Job, bool]:
    """Check ``params`` and write a queued job; with ``key``, find the existing job for that key instead.

    Returns the job and whether this call created it.

    With ``account_id`` the job's price is reserved from that member's credits in the same transaction
    as the job row: either both are written or neither (:class:`~worker.errors.InsufficientCredits`
    says the balance and the price). Jobs without an account (the operator's CLI runs) are free.
    ``price`` overrides the price of the requested (or default) backend; ``admit(session, job)`` runs
    inside the transaction, before the reservation, and may raise to refuse the job (limits, cooldown).
    """
    with Session(engine, expire_on_commit=False) as session:  # the new row stays readable: no read-back
        if key is not None:
            existing = session.exec(select(Job).where(Job.key == key)).first()
            if existing is not None:
                return existing, False
        p = params.checked()
        if account_id is None:
            price = 0
        elif price is None:
            price = _price(p, default_backend)
        job = Job(
            key=key,
            account_id=account_id,
            guild_id=guild_id,
            channel_id=channel_id,
            parent_job_id=parent_job_id,
            prompt=p.prompt,
            negative_prompt=p.negative,
            camera=p.camera.value,
            motion=p.motion,
            duration=p.duration,
            aspect=p.aspect,
            seed=p.seed or 0,
            requested_backend=p.backend,
            model=p.model,
            source_path=str(source_path) if source_path else None,
            price_credits=price,
            next_run_at=utcnow(),
            detail=dict(detail or {}),
        )
        session.add(job)
        try:
            session.flush()
            if admit is not None:
                admit(session, job)
            if account_id is not None:
                ledger.reserve(session, account_id, price, job_id=job.id or 0, memo=f"job {job.id}")
            session.commit()
        except IntegrityError:
            session.rollback()
            if key is None:
                raise
            return session.exec(select(Job).where(Job.key == key)).one(), False  # a concurrent submit won
        except Exception:
            session.rollback()
            raise
        return job, True


def create_job(engine: Engine, params: JobParams, **kwargs: Any) -> Job:
    """:func:`create_or_find_job`, for callers that need only the job."""
    return create_or_find_job(engine, params, **kwargs)[0]


def _price(params: JobParams, default_backend: str) -> int:
    backend = params.backend or default_backend
    try:
        return pricing.price(backend, params.model, params.duration)
    except pricing.UnknownPrice:
        raise InvalidParameters(
            f"backend {backend!r} has no price, so it cannot be charged; add it to the price table"
        ) from None


def load_job(engine: Engine, job_id: int) -> Job:
    """The job row; raise ``LookupError`` if there is none."""
    with Session(engine) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise LookupError(f"no job {job_id}")
        return job
