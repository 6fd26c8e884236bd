"""The embedded runtime: the whole job system inside one asyncio program, with no other service.

``animabot run`` uses it when no Redis is configured: ``worker_concurrency`` work loops, a poll loop
and a reaper loop share the process with the front end and the web endpoint, on SQLite. It calls the
same :class:`~worker.runner.Worker` methods the Celery tasks call; only the transport differs (an
in-process wake-up instead of a Redis queue). Jobs live in the database, so they survive a restart:
the first reaper round at start wakes every job that was ready or whose worker had died.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine

from backends.base import Backend
from worker.grants import grant_daily_to_active_members
from worker.runner import Worker
from worker.settings import Settings

log = logging.getLogger(__name__)

POLL_EVERY = 0.25
IDLE_WAIT = 1.0


class EmbeddedRuntime:
    """Runs a :class:`Worker`'s duties as tasks of the current event loop until stopped."""

    def __init__(self, db: Engine, settings: Settings, *, backends: dict[str, Backend] | None = None) -> None:
        self.settings = settings
        self._wake = asyncio.Event()
        self.worker = Worker(db, settings, backends=backends, kick=self.kick)
        self._tasks: list[asyncio.Task[None]] = []

    def kick(self, n: int = 1) -> None:
        """Wake the work loops: ``n`` jobs need attention (safe from any thread)."""
        if n <= 0:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None and loop is getattr(self, "_loop", None):
            self._wake.set()
        elif getattr(self, "_loop", None) is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def start(self) -> None:
        """Start the loops; the first reaper round resumes whatever was in progress before a restart."""
        self._loop = asyncio.get_running_loop()
        await self.worker.reap()
        self._tasks = [asyncio.create_task(self._work_loop(), name=f"animabot-work-{i}")
                       for i in range(self.settings.worker_concurrency)]
        self._tasks += [
            asyncio.create_task(self._every(min(POLL_EVERY, self.settings.poll_tick), self.worker.poll_due),
                                name="animabot-poll"),
            asyncio.create_task(self._every(self.settings.reap_interval, self.worker.reap), name="animabot-reap"),
            asyncio.create_task(self._daily(), name="animabot-daily-grant"),
        ]

    async def stop(self) -> None:
        """Stop the loops (a unit of work in progress is abandoned; its lease returns it later)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self.worker.aclose()

    async def _work_loop(self) -> None:
        while True:
            try:
                did = await self.worker.work_once()
            except Exception:  # the database went away for a moment: try again shortly
                log.exception("work loop")
                did = None
            if did is None:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), IDLE_WAIT)

    async def _every(self, seconds: float, duty: object) -> None:
        while True:
            try:
                await duty()  # type: ignore[operator]
            except Exception:
                log.exception("periodic duty %s", getattr(duty, "__name__", duty))
            await asyncio.sleep(seconds)

    async def _daily(self) -> None:
        while True:
            now = datetime.now(UTC)
            tomorrow = (now + timedelta(days=1)).replace(hour=0, minute=5, second=0, microsecond=0)
            await asyncio.sleep((tomorrow - now).total_seconds())
            try:
                await asyncio.to_thread(grant_daily_to_active_members, self.worker.db, self.settings)
            except Exception:
                log.exception("daily grant")
