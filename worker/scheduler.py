r"""Who works on which job next: fair claims with leases, queue positions, and finding stuck jobs.

The jobs table is the queue. A job is *ready* when its ``next_run_at`` has passed, it is not final,
and no live lease holds it. A worker :func:`claim`\\ s one ready job at a time with a lease (a
conditional UPDATE, so two workers never hold one job), renews the lease while it works
(:func:`renew`) and gives the job back with the time it next needs attention (:func:`release`). A
worker that dies simply stops renewing: its lease runs out and the job is ready again.

Fairness: jobs already under way come first (finishing work frees memory and members wait less);
then queued jobs in round-robin order across members, not first-come-first-served, so one member's
batch of ten does not hold everyone else back: every member's first queued job goes before anyone's
second.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections import defaultdict
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy import Engine
from sqlmodel import Session, select

from worker import events
from worker.models import FINAL_STATES, Attempt, Job, JobState, utcnow
from worker.settings import Settings

_FINAL = [state.value for state in FINAL_STATES]
_QUEUED = JobState.QUEUED.value
#: Queued jobs looked at when ordering the queue fairly; members beyond the oldest ones wait a turn.
FAIR_WINDOW = 500
#: Mean run time assumed before any job has finished, seconds.
DEFAULT_RUN_SECONDS = 60.0


def worker_id() -> str:
    """A name for this process that is unique across machines and restarts."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _ready(now: datetime) -> sa.ColumnElement[bool]:
    return sa.and_(
        Job.next_run_at <= now,  # type: ignore[operator]
        Job.state.not_in(_FINAL),  # type: ignore[attr-defined]
        sa.or_(Job.lease_owner.is_(None), Job.lease_expires_at < now),  # type: ignore[union-attr,operator]
    )


def fair_order(rows: list[tuple[int, int | None]], started: dict[int, int] | None = None) -> list[int]:
    """Job ids in round-robin order across members, each member's own jobs oldest first.

    ``rows`` are ``(job_id, account_id)`` in submission order; jobs without an account (the operator's)
    each count as their own member. ``started`` counts each member's jobs already under way: a member
    with two running goes after one with none.
    """
    seen: dict[object, int] = defaultdict(int, started or {})
    ranked = []
    for job_id, account_id in rows:
        owner: object = account_id if account_id is not None else ("job", job_id)
        seen[owner] += 1
        ranked.append((seen[owner], job_id))
    return [job_id for _, job_id in sorted(ranked)]


def candidates(db: Engine, *, limit: int = 8) -> list[int]:
    """Ready jobs, the one to take first first."""
    now = utcnow()
    with Session(db) as session:
        under_way = session.exec(
            select(Job.id).where(_ready(now), Job.state != _QUEUED).order_by(Job.next_run_at).limit(limit)
        ).all()
        queued = session.exec(
            select(Job.id, Job.account_id).where(_ready(now), Job.state == _QUEUED)
            .order_by(Job.id).limit(FAIR_WINDOW)  # type: ignore[arg-type]
        ).all()
        started = _started(session, {a for _, a in queued if a is not None})
    return [*under_way, *fair_order([(int(i), a) for i, a in queued], started)[:limit]]


def _started(session: Session, accounts: set[int]) -> dict[int, int]:
    """Unfinished jobs per member that have left the queue (or are being taken out of it now)."""
    if not accounts:
        return {}
    rows = session.execute(
        sa.select(Job.account_id, sa.func.count()).where(
            Job.account_id.in_(accounts),  # type: ignore[union-attr]
            Job.state.not_in(_FINAL),  # type: ignore[attr-defined]
            sa.or_(Job.state != _QUEUED, Job.lease_owner.is_not(None)),  # type: ignore[union-attr]
        ).group_by(Job.account_id)
    ).all()
    return {int(account): int(n) for account, n in rows}


def claim(db: Engine, owner: str, lease_seconds: float) -> int | None:
    """Take the next ready job for ``owner`` under a lease; its id, or None when nothing is ready."""
    for _ in range(3):
        found = candidates(db)
        if not found:
            return None
        for job_id in found:
            if take(db, job_id, owner, lease_seconds):
                return job_id
    return None


def take(db: Engine, job_id: int, owner: str, lease_seconds: float, *, ready_only: bool = True) -> bool:
    """Lease job ``job_id`` to ``owner`` if it is free (and ready, unless ``ready_only`` is False)."""
    now = utcnow()
    free = sa.or_(Job.lease_owner.is_(None), Job.lease_expires_at < now)  # type: ignore[union-attr,operator]
    condition = _ready(now) if ready_only else sa.and_(free, Job.state.not_in(_FINAL))  # type: ignore[attr-defined]
    with Session(db) as session:
        taken = session.execute(
            sa.update(Job).where(Job.id == job_id, condition).values(
                lease_owner=owner,
                lease_expires_at=now + timedelta(seconds=lease_seconds),
                claims=Job.claims + 1,
                # a lease that ran out means the last holder died with the job in hand
                recoveries=Job.recoveries + sa.case((Job.lease_owner.is_not(None), 1), else_=0),  # type: ignore[union-attr]
            )
        ).rowcount
        session.commit()
    return bool(taken)


def renew(db: Engine, job_id: int, owner: str, lease_seconds: float) -> bool:
    """Extend ``owner``'s lease on ``job_id``; False if it lost the job."""
    with Session(db) as session:
        done = session.execute(
            sa.update(Job).where(Job.id == job_id, Job.lease_owner == owner)
            .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
        ).rowcount
        session.commit()
    return bool(done)


def release(db: Engine, job_id: int, owner: str, next_run_at: datetime | None) -> bool:
    """Give the job back; it needs a worker again at ``next_run_at`` (None: when an attempt is ready).

    Returns True when the job is ready right away (a cancel request or a provider answer arrived
    meanwhile), so the caller should have a worker look at it.
    """
    with Session(db) as session:
        session.execute(
            sa.update(Job).where(Job.id == job_id, Job.lease_owner == owner)
            .values(lease_owner=None, lease_expires_at=None, next_run_at=next_run_at)
        )
        session.commit()
        job = session.get(Job, job_id)
        if job is None or job.job_state.terminal:
            return False
        answered = session.exec(
            select(Attempt.id).where(Attempt.job_id == job_id, Attempt.state == "ready")
        ).first()
        if (job.cancel_requested or answered is not None) and job.next_run_at is None:
            session.execute(sa.update(Job).where(Job.id == job_id, Job.next_run_at.is_(None))  # type: ignore[union-attr]
                            .values(next_run_at=utcnow()))
            session.commit()
            return True
    return next_run_at is not None and next_run_at <= utcnow()


def ready_count(db: Engine) -> int:
    """Jobs that need a worker now."""
    with Session(db) as session:
        return session.scalar(sa.select(sa.func.count()).select_from(Job).where(_ready(utcnow()))) or 0


def due_attempts(db: Engine, *, limit: int, hold_seconds: float) -> list[Attempt]:
    """Running attempts whose next check is due, each held back from other pollers for ``hold_seconds``."""
    now = utcnow()
    with Session(db, expire_on_commit=False) as session:
        ids = session.exec(
            select(Attempt.id).where(Attempt.state == "running", Attempt.next_poll_at <= now)  # type: ignore[operator]
            .order_by(Attempt.next_poll_at).limit(limit)
        ).all()
        if not ids:
            return []
        rows = session.exec(
            sa.update(Attempt)
            .where(Attempt.id.in_(ids), Attempt.state == "running", Attempt.next_poll_at <= now)  # type: ignore[union-attr,operator]
            .values(next_poll_at=now + timedelta(seconds=hold_seconds))
            .returning(Attempt)
        ).all()
        session.commit()
        return [row[0] if isinstance(row, tuple | sa.Row) else row for row in rows]


def reschedule_polls(db: Engine, when: dict[int, datetime]) -> None:
    """Set the next check of each running attempt (``attempt id → when``) in one transaction."""
    if not when:
        return
    with Session(db) as session:
        session.execute(
            sa.update(Attempt).where(Attempt.state == "running"),
            [{"id": attempt_id, "next_poll_at": at} for attempt_id, at in when.items()],
            execution_options={"synchronize_session": None},
        )
        session.commit()


def overdue(db: Engine, settings: Settings) -> list[int]:
    """Unfinished jobs older than ``job_deadline`` that no live worker holds."""
    now = utcnow()
    with Session(db) as session:
        return list(session.exec(
            select(Job.id).where(
                Job.state.not_in(_FINAL),  # type: ignore[attr-defined]
                Job.created_at < now - timedelta(seconds=settings.job_deadline),
                sa.or_(Job.lease_owner.is_(None), Job.lease_expires_at < now),  # type: ignore[union-attr,operator]
            ).limit(100)
        ).all())


def position(db: Engine, settings: Settings, job_id: int) -> tuple[int, float]:
    """Queue position of a job (0 once it has started) and a rough estimate of seconds until done.

    The estimate is the mean run time of recent jobs, plus one such run per ``worker_concurrency`` jobs
    ahead in the queue.
    """
    with Session(db) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise LookupError(f"no job {job_id}")
        mean = _mean_run_seconds(session)
        if job.job_state.terminal:
            return 0, 0.0
        if job.job_state is not JobState.QUEUED:
            return 0, mean
        queued = session.exec(
            select(Job.id, Job.account_id).where(Job.state == _QUEUED, Job.lease_owner.is_(None))  # type: ignore[union-attr]
            .order_by(Job.id).limit(FAIR_WINDOW * 4)  # type: ignore[arg-type]
        ).all()
        started = _started(session, {a for _, a in queued if a is not None})
    order = fair_order([(int(i), a) for i, a in queued], started)
    ahead = order.index(job_id) if job_id in order else len(order)
    return ahead + 1, mean * (1 + ahead / settings.worker_concurrency)


def _mean_run_seconds(session: Session) -> float:
    recent = session.exec(
        select(Job.started_at, Job.finished_at)
        .where(Job.state == JobState.SUCCEEDED.value, Job.started_at.is_not(None))  # type: ignore[union-attr]
        .order_by(Job.id.desc()).limit(50)  # type: ignore[union-attr]
    ).all()
    spans = [(end - start).total_seconds() for start, end in recent if start and end]
    return sum(spans) / len(spans) if spans else DEFAULT_RUN_SECONDS


def announce_queued(db: Engine, job_id: int, position: int, eta_seconds: float) -> None:
    """Publish a new job's ``queued`` event."""
    with Session(db) as session:
        job = session.get(Job, job_id)
        assert job is not None
        events.publish(session, job, "queued", {"position": position, "eta_seconds": round(eta_seconds, 1)})
        session.commit()
