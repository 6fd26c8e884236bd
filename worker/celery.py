"""Celery: how the job system scales out over Redis to any number of worker processes and machines.

    celery -A worker worker -Q animabot,animabot.periodic     # or: animabot worker
    animabot beat                  # periodic work: polls, the reaper, daily credits

The broker carries only "a job needs attention" (``animabot.work``); the jobs table says which job and
what it needs, and the worker that takes the message claims the fairest ready job under a lease. So a
lost, duplicated or late message costs nothing: a duplicate finds nothing ready, and a job whose
message was lost is found by the reaper's next round. Configuration follows the known traps of Celery
on Redis (reference: ``reliability.md`` §1):

- ``acks_late`` with ``task_reject_on_worker_lost``: a message whose worker is killed goes back to
  the queue instead of being acknowledged and lost.
- ``worker_prefetch_multiplier = 1``: a worker holds only what it runs, so a killed worker strands
  nothing in its prefetch buffer.
- one ``visibility_timeout`` in all three places, far above any task's run time, so Redis never
  redelivers a message that is still running; recovery after a kill does not wait for it, because
  the DB lease (``lease_seconds``) hands the job to another worker first.
- no countdown beyond a few seconds (long waits are ``next_run_at`` in the database instead).
- the broker connection is retried forever, so workers resume by themselves after Redis restarts.

Every process builds its own :class:`~worker.runner.Worker` lazily, after the fork, with one event
loop thread that the tasks run their coroutines on (backends keep their connections there).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Coroutine
from datetime import timedelta
from typing import Any, TypeVar

from celery import Celery, signals
from celery.schedules import crontab
from kombu.exceptions import OperationalError

from worker.settings import Settings, get_settings

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Longest a task may run (a long clip's post-processing is the longest unit), seconds.
TASK_HARD_LIMIT = 30 * 60
VISIBILITY_TIMEOUT = 3 * TASK_HARD_LIMIT
#: Countdowns longer than this are left to the reaper (Redis redelivers long ETAs in loops).
MAX_COUNTDOWN = 60.0
WORK, POLL, REAP, DAILY = "animabot.work", "animabot.poll", "animabot.reap", "animabot.daily_grant"
#: Work messages and the periodic ones (polls, reaper, daily grant) travel in separate queues, so a backlog
#: of work never holds back the polls that finish running generations. Workers consume both.
QUEUES = ("animabot", "animabot.periodic")


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration for ``settings`` (Redis broker, at-least-once delivery)."""
    transport = {"visibility_timeout": VISIBILITY_TIMEOUT}
    return {
        "broker_url": settings.redis_url or "redis://127.0.0.1:6379/0",
        "broker_transport_options": transport,
        "result_backend_transport_options": transport,
        "visibility_timeout": VISIBILITY_TIMEOUT,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "broker_heartbeat": 0,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_time_limit": TASK_HARD_LIMIT,
        "task_soft_time_limit": TASK_HARD_LIMIT - 60,
        "task_default_queue": QUEUES[0],
        "task_routes": {name: {"queue": QUEUES[1]} for name in (POLL, REAP, DAILY)},
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": settings.worker_concurrency,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "worker_soft_shutdown_timeout": 30.0,
        "worker_hijack_root_logger": False,
        "task_serializer": "json",
        "accept_content": ["json"],
        "beat_schedule": {
            "poll": {"task": POLL, "schedule": timedelta(seconds=settings.poll_tick),
                     "options": {"expires": 5 * settings.poll_tick}},
            "reap": {"task": REAP, "schedule": timedelta(seconds=settings.reap_interval),
                     "options": {"expires": 3 * settings.reap_interval}},
            "daily-grant": {"task": DAILY, "schedule": crontab(hour=0, minute=5)},
        },
        "timezone": "UTC",
    }


app = Celery("animabot")
app.conf.update(celery_config(get_settings()))


class _Runtime:
    """The worker of one process and the event loop thread its coroutines run on."""

    def __init__(self, settings: Settings) -> None:
        from worker.db import init_db
        from worker.runner import Worker

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="animabot-loop", daemon=True)
        self.thread.start()
        self.db = init_db(settings)
        self.worker = Worker(self.db, settings, kick=kick)
        self.worker.kick_later = kick_at  # type: ignore[method-assign]
        self.worker.top_up = top_up  # type: ignore[method-assign]

    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()


_runtime: _Runtime | None = None
_lock = threading.Lock()


def runtime() -> _Runtime:
    """The runtime of the current process, built on first use (after the prefork pool forked)."""
    global _runtime
    with _lock:
        if _runtime is None:
            _runtime = _Runtime(get_settings())
        return _runtime


@signals.worker_process_init.connect
def _forget_parent_runtime(**_: Any) -> None:
    global _runtime
    _runtime = None  # a forked child must not share its parent's loop thread or connections


def kick(n: int = 1) -> None:
    """Tell the workers that ``n`` more jobs need attention.

    Best effort: the jobs are already in the database, so with the broker unreachable the wake-up is
    dropped with a warning and the reaper's next round wakes the jobs instead. A submit must not fail
    (or report failure for a job it accepted and reserved credits for) because Redis is down.
    """
    if n <= 0:
        return
    try:
        with app.producer_or_acquire() as producer:
            for _ in range(n):
                work.apply_async(producer=producer)
    except OperationalError as exc:
        log.warning("could not wake the workers for %d job(s), the reaper will: %s", n, exc)


def top_up(ready: int) -> None:
    """Make sure ``ready`` messages wait in the queue (the reaper's wake-up), without piling up more."""
    with app.connection_for_write() as conn:
        waiting = conn.default_channel.client.llen(app.conf.task_default_queue)
    kick(ready - int(waiting))


def kick_at(at: float) -> None:
    """Have a worker look at the jobs again at epoch second ``at`` (soon ones only; the reaper does the rest)."""
    delay = at - time.time()
    if delay <= MAX_COUNTDOWN:
        work.apply_async(countdown=max(0.0, delay))


@app.task(name=WORK)
def work() -> int | None:
    """Do one unit of work on the fairest ready job (if any is ready)."""
    return runtime().run(runtime().worker.work_once())


@app.task(name=POLL)
def poll() -> int:
    """Check the running generations that are due."""
    return runtime().run(runtime().worker.poll_due())


@app.task(name=REAP)
def reap() -> int:
    """Fail overdue jobs with a refund and wake the ready ones."""
    return runtime().run(runtime().worker.reap())


@app.task(name=DAILY)
def daily_grant() -> int:
    """Give today's free credits to every member active in the last 30 days."""
    from worker.grants import grant_daily_to_active_members

    rt = runtime()
    return grant_daily_to_active_members(rt.db, get_settings())
