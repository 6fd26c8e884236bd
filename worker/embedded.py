"""The embedded runtime: the whole job system inside one process, with no other service.

``animabot run`` uses it when no Redis is configured: ``worker_concurrency`` work loops, a poll loop
and a reaper loop share the process with the front end and the web endpoint, on SQLite. It calls the
same :class:`~worker.runner.Worker` methods the Celery tasks call; only the transport differs (an
in-process wake-up instead of a Redis queue). Jobs live in the database, so they survive a restart:
the first reaper round at start wakes every job that was ready or whose worker had died.

The job system runs on **its own thread and event loop**. Its units make synchronous database calls
and hand media work to threads; on the front end's loop those would delay Discord's acknowledgements
(which must come within 3 s, and which we aim to send within 150 ms under a burst). The front end and
the web endpoint reach the worker through :attr:`EmbeddedRuntime.handle`, whose coroutines run on the
job system's loop (the backends' HTTP clients belong to that loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import Engine

from backends.base import Backend
from worker.grants import grant_daily_to_active_members
from worker.runner import Worker
from worker.settings import Settings

log = logging.getLogger(__name__)

POLL_EVERY = 0.25
IDLE_WAIT = 1.0

T = TypeVar("T")


class EmbeddedRuntime:
    """Runs a :class:`Worker`'s duties on a thread of their own until stopped."""

    def __init__(self, db: Engine, settings: Settings, *, backends: dict[str, Backend] | None = None) -> None:
        self.settings = settings
        self._wake = asyncio.Event()  # bound to the job system's loop on its first wait
        self.worker = Worker(db, settings, backends=backends, kick=self.kick)
        self.handle = WorkerHandle(self)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None

    def kick(self, n: int = 1) -> None:
        """Wake the work loops: ``n`` jobs need attention (safe from any thread)."""
        loop = self._loop
        if n <= 0 or loop is None or loop.is_closed():
            return
        if threading.current_thread() is self._thread:
            self._wake.set()
        else:
            with contextlib.suppress(RuntimeError):  # closing down
                loop.call_soon_threadsafe(self._wake.set)

    async def start(self) -> None:
        """Start the job system's thread; returns once its first reaper round resumed what was in progress."""
        started: Future[None] = Future()
        self._thread = threading.Thread(target=self._thread_main, args=(started,), name="animabot-jobs",
                                        daemon=True)
        self._thread.start()
        await asyncio.wrap_future(started)

    async def stop(self) -> None:
        """Stop the loops (a unit of work in progress is abandoned; its lease returns it later)."""
        loop, stopping, thread = self._loop, self._stopping, self._thread
        if loop is None or stopping is None or thread is None:
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(stopping.set)
        await asyncio.to_thread(thread.join)
        self._thread = None

    def run(self, coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        """Run ``coro`` on the job system's loop; awaitable from any other loop."""
        assert self._loop is not None, "the runtime is not started"
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    def _thread_main(self, started: Future[None]) -> None:
        try:
            asyncio.run(self._main(started))
        except BaseException as exc:  # reported to start() if it is still waiting
            if not started.done():
                started.set_exception(exc)
            else:
                log.exception("the job system's thread ended")

    async def _main(self, started: Future[None]) -> None:
        self._loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()
        await self.worker.reap()
        tasks = [asyncio.create_task(self._work_loop(), name=f"animabot-work-{i}")
                 for i in range(self.settings.worker_concurrency)]
        tasks += [
            asyncio.create_task(self._every(min(POLL_EVERY, self.settings.poll_tick), self.worker.poll_due),
                                name="animabot-poll"),
            asyncio.create_task(self._every(self.settings.reap_interval, self.worker.reap), name="animabot-reap"),
            asyncio.create_task(self._daily(), name="animabot-daily-grant"),
        ]
        started.set_result(None)
        try:
            await self._stopping.wait()
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
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


class WorkerHandle:
    """The embedded worker as the front end and the web endpoint see it, from their own loop."""

    def __init__(self, runtime: EmbeddedRuntime) -> None:
        self._runtime = runtime
        self.db = runtime.worker.db
        self.owner = runtime.worker.owner
        self.settings = runtime.settings

    async def webhook(self, *args: Any, **kwargs: Any) -> str:
        """:meth:`Worker.webhook`, on the job system's loop."""
        return await self._runtime.run(self._runtime.worker.webhook(*args, **kwargs))

    async def cancel(self, job_id: int, *, account_id: int | None = None) -> bool:
        """:meth:`Worker.cancel`, on the job system's loop."""
        return await self._runtime.run(self._runtime.worker.cancel(job_id, account_id=account_id))

    async def aclose(self) -> None:
        """Nothing to close here: :meth:`EmbeddedRuntime.stop` closes the worker."""
