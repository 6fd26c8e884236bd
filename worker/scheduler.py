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

Cost: the database does the ordering. Finding the next job is one query (window functions over the
oldest ``FAIR_WINDOW`` ready jobs), taking it one conditional UPDATE that returns the row, giving it
back one or two UPDATEs; a queue position is one aggregate query, however long the queue.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Engine
from sqlmodel import Session, select

from worker import events
from worker.models import FINAL_STATES, Attempt, Job, JobState, utcnow
from worker.settings import Settings

_FINAL = [state.value for state in FINAL_STATES]
#: Unfinished states, listed: ``state IN (...)`` can use the index on ``state``, ``NOT IN`` cannot.
_OPEN = [state.value for state in JobState if not state.terminal]
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


def _started_counts(members: sa.Select[Any]) -> sa.CTE:
    """Per member among ``members`` (a query of account ids): unfinished jobs out of the queue or leased.

    A queued job under a lease is being taken out of the queue now, so it counts as started.
    """
    return (
        sa.select(Job.account_id.label("account_id"), sa.func.count().label("n"))  # type: ignore[union-attr]
        .where(
            Job.account_id.in_(members),  # type: ignore[union-attr]
            Job.state.in_(_OPEN),  # type: ignore[attr-defined]
            sa.or_(Job.state != _QUEUED, Job.lease_owner.is_not(None)),  # type: ignore[union-attr]
        )
        .group_by(Job.account_id)
        .cte("started")
    )


def _candidates_query(now: datetime, limit: int) -> sa.Select[Any]:
    """One statement: ready jobs under way (longest waiting first), then the fair order of the queue.

    The fair order is :func:`fair_order` computed by the database over the ``FAIR_WINDOW`` oldest ready
    queued jobs: a job's turn is its member's count of started jobs plus its place among the member's own
    queued jobs (a job without an account is a member of its own), ties going to the older job.
    """
    under_way = (
        sa.select(Job.id.label("id"), sa.func.row_number().over(order_by=[Job.next_run_at, Job.id]).label("k"))  # type: ignore[arg-type]
        .where(_ready(now), Job.state != _QUEUED)
        .order_by(Job.next_run_at).limit(limit)  # type: ignore[arg-type]
        .subquery()
    )
    window = (
        sa.select(Job.id.label("id"), Job.account_id.label("account_id"))  # type: ignore[union-attr]
        .where(_ready(now), Job.state == _QUEUED)
        .order_by(Job.id).limit(FAIR_WINDOW)  # type: ignore[arg-type]
        .cte("fair_window")
    )
    started = _started_counts(sa.select(window.c.account_id))
    member = sa.func.coalesce(window.c.account_id, -window.c.id)
    turn = sa.func.coalesce(started.c.n, 0) + sa.func.row_number().over(partition_by=member, order_by=window.c.id)
    turns = (
        sa.select(window.c.id.label("id"), turn.label("turn"))
        .select_from(window.outerjoin(started, started.c.account_id == window.c.account_id))
        .subquery()
    )
    fair = (
        sa.select(turns.c.id, sa.func.row_number().over(order_by=[turns.c.turn, turns.c.id]).label("k"))
        .order_by(turns.c.turn, turns.c.id).limit(limit)
        .subquery()
    )
    both = sa.union_all(
        sa.select(under_way.c.id, sa.literal_column("0").label("grp"), under_way.c.k),
        sa.select(fair.c.id, sa.literal_column("1").label("grp"), fair.c.k),
    ).subquery()
    return sa.select(both.c.id).order_by(both.c.grp, both.c.k)


def candidates(db: Engine, *, limit: int = 8) -> list[int]:
    """Ready jobs, the one to take first first (one query)."""
    with db.connect() as conn:
        return [int(job_id) for job_id in conn.execute(_candidates_query(utcnow(), limit)).scalars()]


def claim(db: Engine, owner: str, lease_seconds: float) -> int | None:
    """Take the next ready job for ``owner`` under a lease; its id, or None when nothing is ready."""
    job = claim_job(db, owner, lease_seconds)
    return job.id if job is not None else None


def claim_job(db: Engine, owner: str, lease_seconds: float) -> Job | None:
    """:func:`claim`, returning the job row as the lease left it (so the caller need not read it again)."""
    for _ in range(3):
        found = candidates(db)
        if not found:
            return None
        for job_id in found:
            if (job := _take(db, job_id, owner, lease_seconds, ready_only=True)) is not None:
                return job
    return None


def take(db: Engine, job_id: int, owner: str, lease_seconds: float, *, ready_only: bool = True) -> bool:
    """Lease job ``job_id`` to ``owner`` if it is free (and ready, unless ``ready_only`` is False)."""
    return _take(db, job_id, owner, lease_seconds, ready_only=ready_only) is not None


def _take(db: Engine, job_id: int, owner: str, lease_seconds: float, *, ready_only: bool) -> Job | None:
    """The conditional UPDATE that leases a job; the leased row (RETURNING), or None if it was not free."""
    now = utcnow()
    free = sa.or_(Job.lease_owner.is_(None), Job.lease_expires_at < now)  # type: ignore[union-attr,operator]
    condition = _ready(now) if ready_only else sa.and_(free, Job.state.in_(_OPEN))  # type: ignore[attr-defined]
    with Session(db, expire_on_commit=False) as session:
        job = session.scalars(
            sa.update(Job).where(Job.id == job_id, condition).values(
                lease_owner=owner,
                lease_expires_at=now + timedelta(seconds=lease_seconds),
                claims=Job.claims + 1,
                # a lease that ran out means the last holder died with the job in hand
                recoveries=Job.recoveries + sa.case((Job.lease_owner.is_not(None), 1), else_=0),  # type: ignore[union-attr]
            ).returning(Job),
            execution_options={"synchronize_session": False},
        ).first()
        session.commit()
    return job


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
        state = session.scalar(
            sa.update(Job).where(Job.id == job_id, Job.lease_owner == owner)
            .values(lease_owner=None, lease_expires_at=None, next_run_at=next_run_at)
            .returning(Job.state)
        )
        if state is not None and JobState(state).terminal:
            session.commit()
            return False
        # A second statement, so on PostgreSQL it sees what committed after the first one: an answer (or a
        # cancel) that arrived while this worker held the job must not be lost under next_run_at = NULL.
        answered = sa.exists().where(Attempt.job_id == job_id, Attempt.state == "ready")
        woke = session.scalar(
            sa.update(Job).where(
                Job.id == job_id, Job.next_run_at.is_(None), Job.state.in_(_OPEN),  # type: ignore[union-attr,attr-defined]
                sa.or_(Job.cancel_requested, answered),
            ).values(next_run_at=utcnow()).returning(Job.id)
        )
        session.commit()
    if woke is not None:
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

    The position is the job's place in :func:`fair_order` over every queued job, counted by the database
    in one aggregate query (no job list is read, so it costs the same with 5 or 5,000 queued). The
    estimate is the mean run time of recent jobs, plus one such run per ``worker_concurrency`` jobs
    ahead in the queue.
    """
    with db.connect() as conn:
        row = conn.execute(
            sa.select(Job.state, Job.account_id, Job.lease_owner).where(Job.id == job_id)
        ).one_or_none()
        if row is None:
            raise LookupError(f"no job {job_id}")
        state, account_id, lease_owner = row
        if JobState(state).terminal:
            return 0, 0.0
        mean = _mean_run_seconds(conn)
        if state != _QUEUED:
            return 0, mean
        # A queued job under a lease is being started right now: next.
        ahead = 0 if lease_owner is not None else int(conn.scalar(_ahead_query(job_id, account_id)) or 0)
    return ahead + 1, mean * (1 + ahead / settings.worker_concurrency)


def _ahead_query(job_id: int, account_id: int | None) -> sa.Select[Any]:
    """How many queued jobs go before job ``job_id`` in :func:`fair_order`, counted by the database.

    No job list is read: per member, the count of its queued jobs (``q``), of those older than this job
    (``a``) and of its unfinished jobs already started (``s``) are enough. The member's *k*-th queued
    job has turn ``s + k``; this job's turn is ``t = s₀ + a₀ + 1`` (its own member's counts), and ties go
    to the older job. So of this job's own member, the ``a₀`` older jobs go first; of any other member
    with ``n = t - s``, the jobs with turn before ``t`` (``min(q, n - 1)``) go first, plus its ``n``-th,
    of turn ``t``, if that one is older (``a ≥ n``). A job without an account is a member of its own.
    """
    waiting = sa.and_(Job.state == _QUEUED, Job.lease_owner.is_(None))  # type: ignore[union-attr]
    member = sa.func.coalesce(Job.account_id, -Job.id)
    queued = sa.func.sum(sa.case((waiting, 1), else_=0))
    per = (
        sa.select(
            member.label("m"),
            queued.label("q"),
            sa.func.sum(sa.case((sa.and_(waiting, Job.id < job_id), 1), else_=0)).label("a"),
            sa.func.sum(sa.case((waiting, 0), else_=1)).label("s"),
        )
        .where(Job.state.in_(_OPEN))  # type: ignore[attr-defined]
        .group_by(member)
        .having(queued > 0)
        .cte("per")
    )
    own = account_id if account_id is not None else -job_id
    turn = sa.select(per.c.s + per.c.a + 1).where(per.c.m == own).scalar_subquery()
    n = turn - per.c.s
    before = sa.case(
        (per.c.m == own, per.c.a),
        (n <= 0, 0),
        (n > per.c.q, per.c.q),
        else_=n - 1 + sa.case((per.c.a >= n, 1), else_=0),
    )
    return sa.select(sa.func.coalesce(sa.func.sum(before), 0)).select_from(per)


def _mean_run_seconds(conn: sa.Connection) -> float:
    recent = conn.execute(
        sa.select(Job.started_at, Job.finished_at)
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
