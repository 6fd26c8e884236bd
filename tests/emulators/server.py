"""The life cycle the protocol emulators share: an aiohttp app on a free port of 127.0.0.1."""

from __future__ import annotations

import asyncio
from typing import Any, Self

from aiohttp import web


class LocalServer:
    """An aiohttp app on a free port of 127.0.0.1, started and stopped as an async context manager.

    Every emulator (Discord, Replicate, fal, Cog) is one, so that a test gets a real HTTP server without picking
    a port, and ``async with Emulator() as emu:`` (or ``await emu.start()`` / ``await emu.stop()``) behaves the
    same for all of them. A subclass builds its app in :meth:`_make_app` and opens and closes what it needs
    besides (client sessions for webhooks, websockets, background tasks) in :meth:`_on_start` and
    :meth:`_on_stop`; :meth:`_on_stop` runs while the server still listens.
    """

    #: Seconds :meth:`stop` lets requests still being handled finish before it drops them.
    shutdown_timeout: float = 0.5

    def __init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    def _make_app(self) -> web.Application:
        """The app to serve, with its routes."""
        raise NotImplementedError

    async def _on_start(self) -> None:
        """Called once the server listens (``port`` and ``base_url`` are set)."""

    async def _on_stop(self) -> None:
        """Called first by :meth:`stop`, before the server stops listening."""

    async def start(self) -> Self:
        """Listen on a free port of 127.0.0.1."""
        self._runner = web.AppRunner(
            self._make_app(), access_log=None, handle_signals=False, shutdown_timeout=self.shutdown_timeout
        )
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]
        await self._on_start()
        return self

    async def stop(self) -> None:
        """Run :meth:`_on_stop`, then stop listening."""
        await self._on_stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        if self.port is None:
            raise RuntimeError("the emulator is not started")
        return f"http://127.0.0.1:{self.port}"


async def cancel_tasks(*tasks: asyncio.Task[Any]) -> None:
    """Cancel ``tasks`` and wait until they have ended, whatever they raised."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
