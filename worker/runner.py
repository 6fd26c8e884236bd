"""The worker: what every process that runs jobs does, whichever way it is started.

One :class:`Worker` per process. Its four duties, each a short call that never waits on a provider:

- :meth:`Worker.work_once` claims the next ready job (fairly, under a lease it keeps renewing), does
  one unit of pipeline work on it and gives it back saying when it needs attention again.
- :meth:`Worker.poll_due` asks providers about every running generation whose check is due, many
  at once, and marks the answered ones ready. While a generation runs nothing is held but its row,
  so one process keeps thousands in flight.
- :meth:`Worker.reap` fails jobs past their deadline with a refund and wakes jobs whose worker died.
- :meth:`Worker.cancel` ends a job for its owner, provider request included.

Celery tasks (``worker.celery``) and the embedded runtime (``worker.embedded``) only call these; the
``kick(n)`` they pass in is how a worker says "n more jobs need attention".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy import Engine
from sqlmodel import Session, select

from backends.base import Backend, WebhookRejected
from backends.registry import UnknownBackend
from worker import scheduler
from worker.jobs import load_job
from worker.models import Attempt, Job, utcnow
from worker.pipeline import Pipeline, Step
from worker.settings import Settings

log = logging.getLogger(__name__)

Kick = Callable[[int], None]


class JobControl(Protocol):
    """What front ends and the web endpoint use of a worker: a :class:`Worker`, or the embedded runtime's handle."""

    db: Engine
    owner: str

    async def webhook(
        self, backend_name: str, headers: Mapping[str, str], body: bytes, *, attempt_id: int | None = None
    ) -> str:
        """Act on a provider's webhook (see :meth:`Worker.webhook`)."""

    async def cancel(self, job_id: int, *, account_id: int | None = None) -> bool:
        """Cancel a job for its owner (see :meth:`Worker.cancel`)."""

    async def aclose(self) -> None:
        """Let go of connections."""


#: At most this many provider status calls run at once in one poll round.
POLL_CONCURRENCY = 200
#: How long a poller holds the attempts it took before another poller may take them, seconds.
POLL_HOLD = 60.0
#: Wait before retrying a job whose unit of work raised something unexpected, seconds.
CRASH_BACKOFF = 2.0


class CancelRefused(Exception):
    """The job cannot be canceled by this member (not theirs, or already over)."""


@dataclass
class Stats:
    """What this worker has done, for logs and benchmarks."""

    units: int = 0
    polls: int = 0
    answered: int = 0
    reaped: int = 0
    crashes: int = 0
    by_step: dict[str, int] = field(default_factory=dict)


class Worker:
    """Runs jobs for one process: claims, units of work, polls, reaping, cancels."""

    def __init__(
        self,
        db: Engine,
        settings: Settings,
        *,
        backends: dict[str, Backend] | None = None,
        kick: Kick | None = None,
        owner: str | None = None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.pipeline = Pipeline(db, settings, backends=backends)
        self.kick: Kick = kick or (lambda n: None)
        self.owner = owner or scheduler.worker_id()
        self.stats = Stats()

    async def aclose(self) -> None:
        """Close the backends' connections."""
        await self.pipeline.aclose()

    # -- units of work -------------------------------------------------------------------------

    async def work_once(self) -> int | None:
        """Claim one ready job and move it on; the job's id, or None when no job was ready."""
        lease = self.settings.lease_seconds
        job = scheduler.claim_job(self.db, self.owner, lease)  # the row as leased: no need to read it again
        if job is None or job.id is None:
            return None
        job_id = job.id
        self.stats.units += 1
        unit = asyncio.create_task(self._unit(job))
        renewing = asyncio.create_task(self._keep_lease(job_id, unit))
        try:
            step = await unit
        except asyncio.CancelledError:
            if not renewing.done() or renewing.cancelled():
                raise  # this worker is being stopped, not the unit
            # The lease was lost (this worker stalled past it and another took the job): stop here, so
            # two workers never write one job at once. The new holder carries on from the database.
            log.warning("job %s: lease lost to another worker; this unit stopped", job_id)
            return job_id
        except Exception as exc:
            log.exception("job %s: unit of work failed; it will be retried", job_id)
            self.stats.crashes += 1
            renewing.cancel()
            if not _database_dropped(exc):  # a lost connection is the database's doing, not the job's
                with Session(self.db) as session:  # counts like a worker that died with the job in hand
                    session.execute(sa.update(Job).where(Job.id == job_id, Job.lease_owner == self.owner)
                                    .values(recoveries=Job.recoveries + 1))
                    session.commit()
            scheduler.release(self.db, job_id, self.owner, utcnow() + timedelta(seconds=CRASH_BACKOFF))
            return job_id
        finally:
            renewing.cancel()
        self.stats.by_step[step.kind] = self.stats.by_step.get(step.kind, 0) + 1
        at = datetime.fromtimestamp(step.at, UTC) if step.kind == "retry" else None
        if scheduler.release(self.db, job_id, self.owner, at):
            self.kick(1)
        elif step.kind == "retry":
            self.kick_later(step.at)
        return job_id

    async def _unit(self, job: Job) -> Step:
        """The unit of work a claimed job needs: end it (poisonous), cancel it, or move it on."""
        assert job.id is not None
        if job.recoveries > self.settings.max_recoveries:
            await self._end(job, "worker_crashed",
                            f"the worker stopped {job.recoveries} times while making this clip, so it was "
                            "stopped; nothing was charged — try again, perhaps with a shorter clip")
            return Step("done")
        if job.cancel_requested:
            await self.pipeline.cancel(job.id)
            return Step("done")
        return await self.pipeline.advance(job.id, job=job)

    def kick_later(self, at: float) -> None:
        """Hook for runtimes that can schedule a kick (Celery countdown); the reaper covers the rest."""

    async def _keep_lease(self, job_id: int, unit: asyncio.Task[Step]) -> None:
        """Renew the lease while ``unit`` runs; cancel ``unit`` if the lease turns out to be lost."""
        lease = self.settings.lease_seconds
        while True:
            await asyncio.sleep(lease / 3)
            try:
                held = await asyncio.to_thread(scheduler.renew, self.db, job_id, self.owner, lease)
            except Exception:  # the database blinked: try again at the next beat, the lease has slack
                log.warning("job %s: lease renewal failed; retrying", job_id, exc_info=True)
                continue
            if not held:
                unit.cancel()
                return

    async def _end(self, job: Job, code: str, message: str) -> None:
        """Fail ``job`` with a refund, canceling its provider request first."""
        assert job.id is not None
        await self.pipeline.cancel_provider_requests(job.id)
        self.pipeline.fail(job.id, code, message)

    # -- waiting on providers ------------------------------------------------------------------

    async def poll_due(self, *, limit: int = 5000) -> int:
        """Check every running generation that is due; how many had finished."""
        attempts = scheduler.due_attempts(self.db, limit=limit, hold_seconds=POLL_HOLD)
        if not attempts:
            return 0
        gate = asyncio.Semaphore(POLL_CONCURRENCY)

        async def check(attempt: Attempt) -> tuple[Attempt, dict[str, Any] | None]:
            async with gate:
                try:
                    return attempt, await self.pipeline.poll(attempt)
                except Exception:  # a backend bug must not stop the others being polled
                    log.exception("attempt %s: status check failed", attempt.id)
                    return attempt, None

        answered, later = 0, {}
        now = utcnow()
        for attempt, report in await asyncio.gather(*(check(a) for a in attempts)):
            assert attempt.id is not None
            if report is None:
                later[attempt.id] = now + timedelta(seconds=self.poll_interval(attempt, now))
            elif self.pipeline.mark_ready(attempt.id, report) is not None:
                answered += 1
        scheduler.reschedule_polls(self.db, later)
        self.stats.polls += len(attempts)
        self.stats.answered += answered
        if answered:
            self.kick(answered)
        return answered

    def poll_interval(self, attempt: Attempt, now: datetime) -> float:
        """Seconds until the next check: often at first, then every ``poll_interval`` at most."""
        started = attempt.started_at if attempt.started_at.tzinfo else attempt.started_at.replace(tzinfo=UTC)
        age = (now - started).total_seconds()
        return min(max(age / 4, 0.25), self.settings.poll_interval)

    async def resume(self, attempt_id: int) -> bool:
        """A provider said attempt ``attempt_id`` changed (a webhook): check it now. True if it ended."""
        with Session(self.db) as session:
            attempt = session.get(Attempt, attempt_id)
        if attempt is None or attempt.state != "running":
            return False
        report = await self.pipeline.poll(attempt)
        if report is None or self.pipeline.mark_ready(attempt_id, report) is None:
            return False
        self.kick(1)
        return True

    async def webhook(
        self, backend_name: str, headers: Mapping[str, str], body: bytes, *, attempt_id: int | None = None
    ) -> str:
        """Act on a provider's webhook: verify it, find its attempt, record what it says, check it now.

        ``attempt_id`` comes from a signed webhook URL (checked by the caller); without it the attempt is
        found by the provider's id for the generation. Returns what happened (``ended``, ``running``,
        ``already handled``); raises :class:`WebhookRejected` for anything not to act on (the caller
        answers with its status).
        """
        try:
            backend = self.pipeline.backend(backend_name)
        except UnknownBackend:
            raise WebhookRejected(404, f"no backend named {backend_name!r}") from None
        notice = await backend.verify_webhook(headers, body)
        with Session(self.db) as session:
            if attempt_id is not None:
                attempt = session.get(Attempt, attempt_id)
                if attempt is not None and (attempt.backend != backend_name or attempt.provider_id not in (
                        None, notice.request_id)):
                    attempt = None
            else:
                attempt = session.exec(
                    select(Attempt).where(Attempt.backend == backend_name, Attempt.provider_id == notice.request_id)
                    .order_by(Attempt.id.desc())  # type: ignore[union-attr]
                ).first()
        if attempt is None or attempt.id is None:
            raise WebhookRejected(404, f"no generation {notice.request_id!r} of {backend_name} is known here")
        if attempt.state != "running":
            return "already handled"
        if notice.data:  # e.g. the output a provider that cannot be polled sent with its last webhook
            handle = {**attempt.handle, "data": {**attempt.handle.get("data", {}), **notice.data}}
            with Session(self.db) as session:
                session.execute(sa.update(Attempt).where(Attempt.id == attempt.id, Attempt.state == "running")
                                .values(handle=handle))
                session.commit()
        return "ended" if await self.resume(attempt.id) else "running"

    # -- recovery ------------------------------------------------------------------------------

    async def reap(self) -> int:
        """Fail jobs past ``job_deadline`` with a refund, then wake every ready job; how many were failed."""
        failed = 0
        minutes = self.settings.job_deadline / 60
        for job_id in scheduler.overdue(self.db, self.settings):
            if not scheduler.take(self.db, job_id, self.owner, self.settings.lease_seconds, ready_only=False):
                continue
            job = load_job(self.db, job_id)
            await self._end(job, "deadline",
                            f"this clip was not done after {minutes:g} minutes, so it was stopped; nothing was "
                            "charged — try again later")
            failed += 1
        self.stats.reaped += failed
        self.top_up(scheduler.ready_count(self.db))
        return failed

    def top_up(self, ready: int) -> None:
        """Wake workers for ``ready`` jobs; runtimes with a queue count what is already waiting in it."""
        if ready:
            self.kick(ready)

    # -- members -------------------------------------------------------------------------------

    async def cancel(self, job_id: int, *, account_id: int | None = None) -> bool:
        """Cancel job ``job_id`` for its owner (``account_id``; None: the operator may cancel any).

        A job no worker holds is canceled at once (provider request included) and True is returned;
        one a worker is working on is flagged and canceled when that unit ends (False). Raises
        :class:`CancelRefused` for someone else's job or one that is over.
        """
        job = load_job(self.db, job_id)
        if account_id is not None and job.account_id != account_id:
            raise CancelRefused("that is not your job; you can only cancel your own")
        if job.job_state.terminal:
            raise CancelRefused(f"that job is already {job.state}; there is nothing to cancel")
        if scheduler.take(self.db, job_id, self.owner, self.settings.lease_seconds, ready_only=False):
            try:
                await self.pipeline.cancel(job_id)
            finally:
                scheduler.release(self.db, job_id, self.owner, None)
            return True
        with Session(self.db) as session:
            row = session.get(Job, job_id)
            assert row is not None
            row.cancel_requested = True
            session.add(row)
            session.commit()
        return False


def _database_dropped(exc: BaseException) -> bool:
    """Whether ``exc`` is the database connection going away (the pool then reconnects by itself)."""
    return isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated


async def drain(worker: Worker, *, until: Callable[[], bool], timeout: float = 60.0) -> None:
    """Work, poll and reap in this task until ``until()`` holds (tests and ``animabot animate``)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not until():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("jobs did not finish in time")
        did = await worker.work_once()
        await worker.poll_due()
        if did is None:
            await asyncio.sleep(0.05)
    with contextlib.suppress(Exception):
        await worker.reap()
