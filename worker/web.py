"""The web endpoint: where providers' webhooks arrive, and the health check.

    POST /webhooks/{backend}                         a provider's signed webhook (Replicate, fal)
    POST /webhooks/{backend}/{attempt_id}/{token}   a webhook on a URL we signed for one attempt (Cog, any)
    GET  /clips/{clip_id}/{token}/clip.mp4            a finished clip, for links when a file is too big to attach
    GET  /health                                     database reachable, jobs waiting and running

Every webhook is verified by its backend (:meth:`~backends.base.Backend.verify_webhook`: the
provider's signature, its age, replays) and, on the per-attempt URLs, by the HMAC ``token`` of the
attempt id under our secret. What it says is then only a hint: the job system asks the provider
itself (or, for a provider that cannot be asked, reads what the verified webhook delivered). Bad
signatures, stale timestamps, replays, unknown generations and oversized bodies are refused with the
matching status and logged, never acted on.
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from aiohttp import web
from sqlmodel import Session

from backends.base import WebhookRejected
from worker.links import clip_path, webhook_path, webhook_token
from worker.models import FINAL_STATES, Clip, Job
from worker.runner import JobControl

log = logging.getLogger(__name__)

__all__ = ["clip_path", "make_app", "serve", "webhook_path", "webhook_token"]

#: Default cap on a webhook body (``settings.webhook_max_bytes`` overrides it in ``animabot run``).
MAX_BODY = 1024 * 1024
_WORKER: web.AppKey[JobControl] = web.AppKey("worker")
_SECRET: web.AppKey[bytes] = web.AppKey("secret", bytes)


def make_app(worker: JobControl, secret: bytes, *, max_body: int = MAX_BODY) -> web.Application:
    """The aiohttp application for ``worker``; bodies over ``max_body`` bytes are refused with 413."""
    app = web.Application(client_max_size=max_body)
    app[_WORKER] = worker
    app[_SECRET] = secret
    app.router.add_post("/webhooks/{backend}", _webhook)
    app.router.add_post("/webhooks/{backend}/{attempt_id:\\d+}/{token}", _webhook)
    app.router.add_get("/clips/{clip_id:\\d+}/{token}/clip.mp4", _clip)
    app.router.add_get("/health", _health)
    return app


async def _webhook(request: web.Request) -> web.Response:
    backend = request.match_info["backend"]
    attempt_id = int(request.match_info["attempt_id"]) if "attempt_id" in request.match_info else None
    if attempt_id is not None:
        expected = webhook_token(request.app[_SECRET], attempt_id)
        if not hmac.compare_digest(expected, request.match_info["token"]):
            log.warning("webhook for attempt %s refused: bad token from %s", attempt_id, request.remote)
            raise web.HTTPForbidden(text="bad token")
    body = await request.read()  # capped by client_max_size: 413 above MAX_BODY
    try:
        outcome = await request.app[_WORKER].webhook(backend, request.headers, body, attempt_id=attempt_id)
    except WebhookRejected as exc:
        log.warning("webhook from %s for %s refused (%s): %s", request.remote, backend, exc.status, exc.reason)
        return web.json_response({"ok": False, "error": exc.reason}, status=exc.status)
    return web.json_response({"ok": True, "outcome": outcome, "ended": outcome == "ended"})


async def _clip(request: web.Request) -> web.StreamResponse:
    clip_id = int(request.match_info["clip_id"])
    if not hmac.compare_digest(clip_path(request.app[_SECRET], clip_id), request.path):
        raise web.HTTPForbidden(text="bad token")
    with Session(request.app[_WORKER].db) as session:
        clip = session.get(Clip, clip_id)
    if clip is None or clip.deleted or not Path(clip.path).is_file():
        raise web.HTTPNotFound(text="this clip was deleted")
    return web.FileResponse(clip.path, headers={"Content-Type": "video/mp4"})


async def _health(request: web.Request) -> web.Response:
    worker = request.app[_WORKER]

    def counts() -> dict[str, Any]:
        with Session(worker.db) as session:
            rows = session.execute(
                sa.select(Job.state, sa.func.count()).where(Job.state.not_in([s.value for s in FINAL_STATES]))  # type: ignore[attr-defined]
                .group_by(Job.state)
            ).all()
        return {state: n for state, n in rows}

    try:
        import asyncio

        jobs = await asyncio.to_thread(counts)
    except Exception as exc:
        return web.json_response({"ok": False, "error": f"database: {exc}"}, status=503)
    return web.json_response({"ok": True, "jobs": jobs, "worker": worker.owner})


async def serve(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start serving ``app``; the runner (to clean up) and the port it listens on."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    sockets = site._server.sockets if site._server else []  # type: ignore[union-attr]
    bound = sockets[0].getsockname()[1] if sockets else port
    return runner, bound
