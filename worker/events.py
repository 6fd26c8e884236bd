"""The job event stream, which is also the outbox of finished results.

Every state change a member should hear about is written here in the same transaction as the change
itself, so an event exists exactly when its change does. Front ends read what they have not handled
yet, in order, and confirm each event once handled (:func:`ack`); until then it stays, so a front end
that was down gets everything it missed when it comes back, and no finished result is ever dropped.

Kinds, with their payload:

=================  ===========================================================================
``queued``         ``position``, ``eta_seconds``
``started``        –
``generating``     ``backend``, ``model``, ``attempt``, ``max_attempts``, ``segment``
``retrying``       ``attempt``, ``backend``, ``reason`` (plain words), ``reasons`` (gate codes)
``post-processing``–
``succeeded``      ``clip`` (``id``, ``path``, ``width``, ``height``, ``duration``, ``bytes``),
                   ``backend``, ``model``, ``seed``, ``credits``, ``prompt``, ``attempts``
``failed``         ``code``, ``message``, ``status`` (``failed``, or ``rejected`` for bad input)
``canceled``       –
=================  ===========================================================================

Each payload also carries ``job_id``, ``key`` (the front end's idempotency key, e.g. the interaction
id), ``guild_id``, ``channel_id`` and ``state``. Delivery is at least once: a front end that crashes
after acting on an event and before confirming it sees it again, so it acts idempotently per event id
(the Discord front end sends the event id as the message nonce).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Engine
from sqlmodel import Session, select

from worker.models import Event, Job, utcnow

log = logging.getLogger(__name__)

#: Longest wait before offering a job's undeliverable event again, seconds.
MAX_RETRY_WAIT = 60.0

FINAL_KINDS = frozenset({"succeeded", "failed", "canceled"})


@dataclass(frozen=True)
class JobEvent:
    """One event as front ends see it."""

    id: int
    job_id: int
    kind: str
    payload: dict[str, Any]
    created_at: datetime

    @property
    def final(self) -> bool:
        """Whether this is a job's result (its last event)."""
        return self.kind in FINAL_KINDS


def publish(session: Session, job: Job, kind: str, payload: dict[str, Any] | None = None) -> None:
    """Write event ``kind`` for ``job`` in ``session``'s transaction; it exists once the caller commits."""
    assert job.id is not None
    body = {
        "job_id": job.id, "key": job.key, "guild_id": job.guild_id, "channel_id": job.channel_id,
        "state": job.state, **(payload or {}),
    }
    session.execute(sa.insert(Event).values(job_id=job.id, kind=kind, payload=body, created_at=utcnow()))


def pending(
    engine: Engine, *, limit: int = 100, job_id: int | None = None, skip_jobs: Iterable[int] = ()
) -> list[JobEvent]:
    """Events no front end has confirmed yet, oldest first (leaving out the jobs in ``skip_jobs``)."""
    with Session(engine) as session:
        query = select(Event).where(Event.delivered_at.is_(None))  # type: ignore[union-attr]
        if job_id is not None:
            query = query.where(Event.job_id == job_id)
        if skipped := list(skip_jobs):
            query = query.where(Event.job_id.not_in(skipped))  # type: ignore[attr-defined]
        rows = session.exec(query.order_by(Event.id).limit(limit)).all()
        return [JobEvent(r.id or 0, r.job_id, r.kind, dict(r.payload), r.created_at) for r in rows]


def ack(engine: Engine, event_ids: Iterable[int]) -> int:
    """Confirm events as handled; returns how many were newly confirmed (replays count zero)."""
    ids = list(event_ids)
    if not ids:
        return 0
    with Session(engine) as session:
        done = session.execute(
            sa.update(Event).where(Event.id.in_(ids), Event.delivered_at.is_(None))  # type: ignore[union-attr]
            .values(delivered_at=utcnow())
        ).rowcount
        session.commit()
        return done


def history(engine: Engine, job_id: int) -> list[JobEvent]:
    """Every event of one job, delivered or not, oldest first."""
    with Session(engine) as session:
        rows = session.exec(select(Event).where(Event.job_id == job_id).order_by(Event.id)).all()
        return [JobEvent(r.id or 0, r.job_id, r.kind, dict(r.payload), r.created_at) for r in rows]


Handler = Callable[[JobEvent], Awaitable[None]]


async def consume(engine: Engine, handle: Handler, *, stop: asyncio.Event, every: float = 0.25) -> None:
    """Feed undelivered events to ``handle`` in order, confirming each once it returns, until ``stop``.

    An event whose handler raises stays undelivered and is offered again later (after ``every``
    seconds, doubling up to a minute while it keeps failing), with every later event of the same job
    held back so a job's events never arrive out of order; other jobs' events go on meanwhile.
    """
    loop = asyncio.get_running_loop()
    backoff: dict[int, tuple[float, float]] = {}  # job id → (retry at, last wait)
    while not stop.is_set():
        now = loop.time()
        waiting = [job for job, (at, _) in backoff.items() if at > now]
        batch = await asyncio.to_thread(pending, engine, limit=200, skip_jobs=waiting)
        stuck: set[int] = set()
        for event in batch:
            if event.job_id in stuck:
                continue
            try:
                await handle(event)
            except Exception:
                log.exception("event %s (%s of job %s) not delivered; will retry", event.id, event.kind, event.job_id)
                stuck.add(event.job_id)
                wait = min(backoff.get(event.job_id, (0.0, every / 2))[1] * 2, MAX_RETRY_WAIT)
                backoff[event.job_id] = (loop.time() + wait, wait)
                continue
            backoff.pop(event.job_id, None)
            await asyncio.to_thread(ack, engine, [event.id])
        if len(batch) < 200 or stuck:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)
