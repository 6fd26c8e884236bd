"""``animabot run``: the long-running process, in either of the two ways to run animabot.

- **Embedded** (no ``ANIMABOT_REDIS_URL``): the job system's worker loops, the web endpoint and the
  front end, all in this one process, on SQLite by default. Nothing else to install or start.
- **Scale-out** (``ANIMABOT_REDIS_URL`` and a PostgreSQL ``ANIMABOT_DATABASE_URL``): this process is
  the front end and the web endpoint; Celery workers (``animabot worker``) do the jobs and
  ``animabot beat`` the periodic work, on as many machines as wanted.

The front end until the Discord one exists is the console: it prints every job event and confirms
it, which is what any front end does with the event stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import click
from sqlalchemy import Engine

from worker import events
from worker.events import JobEvent
from worker.runner import JobControl, Worker
from worker.settings import Settings


class ConfigurationError(Exception):
    """The settings cannot run; the message says what to set."""


def mode(settings: Settings) -> str:
    """``embedded`` or ``scale-out``, or :class:`ConfigurationError` for a mix that cannot work."""
    if not settings.redis_url:
        return "embedded"
    if settings.database_url.startswith("sqlite"):
        raise ConfigurationError(
            "ANIMABOT_REDIS_URL is set, so workers may run on other machines, but the database is SQLite, "
            "which they cannot share; set ANIMABOT_DATABASE_URL=postgresql://user@host/db, or unset "
            "ANIMABOT_REDIS_URL to run everything in this one process"
        )
    return "scale-out"


def describe(event: JobEvent) -> str:
    """One line for the console front end."""
    p = event.payload
    what = {
        "queued": lambda: f"queued, position {p.get('position')}, about {p.get('eta_seconds', 0):.0f} s",
        "started": lambda: "started",
        "painting": lambda: f"painting the picture from the prompt on {p.get('backend')}",
        "generating": lambda: (f"generating on {p.get('backend')} "
                               f"(attempt {p.get('attempt')} of {p.get('max_attempts')})"),
        "retrying": lambda: f"retrying: {p.get('reason')}",
        "post-processing": lambda: "post-processing",
        "succeeded": lambda: (f"done: {p['clip']['path']} ({p['clip']['duration']:g} s, "
                              f"{p['clip']['bytes'] // 1024} KiB, {p.get('credits', 0)} credits)"),
        "failed": lambda: f"failed: {p.get('message')}",
        "canceled": lambda: "canceled",
    }.get(event.kind, lambda: event.kind)()
    return f"job {event.job_id}: {what}"


async def console_front_end(event: JobEvent) -> None:
    """Print one job event."""
    click.echo(describe(event))


async def run(
    db: Engine,
    settings: Settings,
    *,
    front_end: Callable[[JobEvent], Awaitable[None]] = console_front_end,
    stop: asyncio.Event | None = None,
    ready: Callable[[int], None] | None = None,
) -> None:
    """Run until ``stop`` is set (or SIGINT/SIGTERM); ``ready(port)`` is called once serving."""
    from worker import web

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    # Import every backend now, not inside the first member's submit: those imports hold the GIL for
    # about 0.2 s, which would stall the acknowledgements of a burst of /animate.
    from backends.registry import backend_classes

    await asyncio.to_thread(backend_classes)
    runtime = None
    if mode(settings) == "embedded":
        from worker.embedded import EmbeddedRuntime

        runtime = EmbeddedRuntime(db, settings)
        await runtime.start()
        worker: JobControl = runtime.handle
    else:
        from worker.celery import kick

        worker = Worker(db, settings, kick=kick)
    app = web.make_app(worker, settings.webhook_key(), max_body=settings.webhook_max_bytes)
    runner, port = await web.serve(app, settings.web_host, settings.web_port)
    discord_bot = None
    try:
        if settings.discord_token:
            discord_bot = await _start_discord(db, settings, worker, runtime)
            front_end = discord_bot.delivery
        if ready is not None:
            ready(port)
        await events.consume(db, front_end, stop=stop)
    finally:
        if discord_bot is not None:
            await discord_bot.close()
        await runner.cleanup()
        if runtime is not None:
            await runtime.stop()
        else:
            await worker.aclose()


async def _start_discord(db: Engine, settings: Settings, worker: JobControl, runtime: object) -> Any:
    """Log the bot in and connect it; raises :class:`ConfigurationError` for a token Discord refuses."""
    import discord

    from bot.discord_bot import AnimaBot, invite_url, point_discord_py_at_env

    point_discord_py_at_env()
    kick = runtime.kick if runtime is not None else _celery_kick()  # type: ignore[attr-defined]
    bot = AnimaBot(db, settings, worker, kick)
    try:
        await bot.login(settings.discord_token)
    except discord.LoginFailure:
        await bot.close()
        raise ConfigurationError(
            "Discord refused ANIMABOT_DISCORD_TOKEN; copy the bot token again from "
            "https://discord.com/developers/applications → your application → Bot → Reset Token"
        ) from None
    connection = asyncio.create_task(bot.connect(), name="discord-gateway")
    connection.add_done_callback(lambda t: t.cancelled() or t.exception() is None or logging.getLogger(
        __name__).error("discord connection ended: %s", t.exception()))
    await bot.wait_until_ready()
    if bot.application_id:
        click.echo(f"invite the bot to a server: {invite_url(bot.application_id)}", err=True)
    return bot


def _celery_kick() -> Any:
    from worker.celery import kick

    return kick
