"""Each provider backend through a whole job, and every fault ending in a retry, a fallback or a refund.

The real job system (``submit`` → :class:`~worker.runner.Worker` → the web endpoint of ``worker.web`` on a
real port, or polls) drives the real backends, which talk through the providers' own client libraries to
the emulators of ``tests/emulators`` (Replicate, fal, a Cog server). A job goes all the way: the worker
submits, the provider's webhook (or a poll) says it finished, the clip is downloaded, judged by the quality
gate, post-processed, encoded and stored, the ``succeeded`` event is published and the credits captured.

After every test each job is terminal, the ledger audits clean, nothing is held, each succeeded job has
exactly one clip, and ``job.cost_usd`` (what the provider billed, failed and rejected generations
included) sits next to ``job.price_credits`` (what the member paid).

Kept lean for a shared 2-core machine: the picture is the astronaut scaled to 256 px, clips are the 5 s the
catalogue models make at 8 fps and 256 px (``output_fps=8``), and the three emulators are shared by the
module (each test has its own database, worker and web endpoint). A test that lets only webhooks move a
job drives the worker without ``poll_due``, so nothing but the webhook can have ended the generation.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import io
import json
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import fal_client.client
import numpy as np
import pytest
import pytest_asyncio
from emulators.cog_api import CogEmulator
from emulators.fal_api import FalEmulator
from emulators.replicate_api import Outcome, ReplicateEmulator
from PIL import Image
from sqlalchemy import Engine
from sqlmodel import Session, select

from backends import video
from backends.base import Backend
from backends.cog import CogBackend, load_catalogue
from backends.fal import FalBackend
from backends.replicate import ReplicateBackend
from bot import serve
from worker import events, ledger, web
from worker.db import init_db
from worker.events import JobEvent
from worker.jobs import JobParams
from worker.models import Account, Attempt, Clip, GuildSettings, Job
from worker.runner import Worker
from worker.settings import Settings
from worker.submit import submit

pytestmark = pytest.mark.asyncio(loop_scope="module")

SAMPLE = Path(__file__).resolve().parents[2] / "bot" / "assets" / "astronaut.png"
FPS = 8
SIDE = 256
GRANT = 100
MEMBER = ("guild-1", "user-1")
KLING = "kwaivgi/kling-v2.1"
FAL_KLING = "fal-ai/kling-video/v2.1/standard/image-to-video"


def _picture() -> bytes:
    """The astronaut (a portrait), scaled down to 256 px."""
    buf = io.BytesIO()
    with Image.open(SAMPLE) as im:
        im.convert("RGB").resize((SIDE, SIDE), Image.Resampling.LANCZOS).save(buf, "PNG")
    return buf.getvalue()


PICTURE = _picture()


@dataclass(frozen=True)
class Provider:
    """How one provider is set up and what a 5 s clip from it costs."""

    backend: str
    model: str | None
    credits: int  # the price table's price of 5 s
    usd: float  # the provider's list price of 5 s


PROVIDERS = {
    "replicate": Provider("replicate", KLING, 25, 0.25),
    "fal": Provider("fal", FAL_KLING, 30, 0.28),
    "cog": Provider("cog", None, 5, 0.0),  # self-hosted: no provider bill
}


@dataclass
class Emulators:
    """The three providers, shared by the module."""

    replicate: ReplicateEmulator
    fal: FalEmulator
    cog: CogEmulator

    def settings(self, *names: str) -> dict[str, Any]:
        """The settings that point the named backends at their emulators."""
        values: dict[str, Any] = {}
        if "replicate" in names:
            values.update(replicate_api_token=self.replicate.token, replicate_base_url=self.replicate.base_url)
        if "fal" in names:
            values.update(fal_key=self.fal.key, fal_queue_url=self.fal.base_url, fal_jwks_url=self.fal.jwks_url)
        if "cog" in names:
            values.update(cog_url=self.cog.url)
        return values


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def emulators() -> AsyncIterator[Emulators]:
    """Replicate, fal and a Cog server, making 5 s clips of 256 × 256 px at 8 fps."""
    clip = {"clip_size": (SIDE, SIDE), "clip_seconds": 5.0, "clip_fps": FPS}
    async with (ReplicateEmulator(start_delay=0.02, latency=0.2, **clip) as replicate,
                FalEmulator(**clip) as fal, CogEmulator() as cog):
        fal.queue_positions, fal.running_polls = (1,), 1
        yield Emulators(replicate, fal, cog)


@pytest.fixture(autouse=True)
def _fal_client_globals(monkeypatch):
    """The fal backend points fal_client's module globals at its settings; put them back after each test."""
    monkeypatch.setattr(fal_client.client, "QUEUE_URL_FORMAT", fal_client.client.QUEUE_URL_FORMAT)
    monkeypatch.setattr(fal_client.client, "MAX_ATTEMPTS", fal_client.client.MAX_ATTEMPTS)


@pytest.fixture(autouse=True)
def _scripts_used_up(request):
    """Every scripted outcome and fault a test queued was consumed by its own jobs, not left to the next test."""
    yield
    if "emulators" in request.fixturenames:
        emus: Emulators = request.getfixturevalue("emulators")
        emus.replicate.duplicate_webhooks = emus.cog.duplicate_webhooks = False
        assert not emus.replicate._script and all(f.times == 0 for f in emus.replicate._faults)
        assert not emus.fal.outcomes and all(i.times == 0 for i in emus.fal._injections)
        assert not emus.cog.put_errors
        # A fresh Replicate account for the next test: a lost create is looked for among recent predictions.
        emus.replicate.predictions.clear()


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Small clips, instant retries, enough credits for a few remote clips, downloads from the emulators."""
    values: dict[str, Any] = {
        "data_dir": tmp_path, "output_long_side": SIDE, "output_fps": FPS, "retry_backoff": 0.0,
        "daily_free_credits": GRANT, "webhook_secret": "provider-tests", "provider_download_hosts": ["127.0.0.1"],
        "interpolation": "blend",
    }
    return Settings(**{**values, **overrides})


@dataclass
class System:
    """One animabot: a database, a worker with its backends, and (with webhooks) its web endpoint."""

    settings: Settings
    db: Engine
    worker: Worker

    def submit(self, prompt: str = "a gentle smile", *, provider: str = "replicate", routed: bool = False,
               member: tuple[str, str] = MEMBER) -> int:
        """Queue a 5 s clip of the astronaut on ``provider`` (``routed``: let the route choose)."""
        chosen = {} if routed else {"backend": provider, "model": PROVIDERS[provider].model}
        params = JobParams(prompt=prompt, duration=5.0, **chosen)
        return submit(self.db, self.settings, image=PICTURE, params=params, member=member).job_id

    def job(self, job_id: int) -> Job:
        """The job as the database has it now."""
        with Session(self.db) as session:
            job = session.get(Job, job_id)
            assert job is not None
            return job

    def attempts(self, job_id: int) -> list[Attempt]:
        """The job's attempts, in order."""
        with Session(self.db) as session:
            return list(session.exec(select(Attempt).where(Attempt.job_id == job_id).order_by(Attempt.number)))

    def kinds(self, job_id: int) -> list[str]:
        """The kinds of the job's events, in order."""
        return [e.kind for e in events.history(self.db, job_id)]

    def account(self, member: tuple[str, str] = MEMBER) -> Account:
        """The member's credit account."""
        with Session(self.db) as session:
            account = session.exec(select(Account).where(Account.guild_id == member[0],
                                                         Account.user_id == member[1])).one()
            return account

    def running(self, job_id: int) -> Callable[[], bool]:
        """Whether the job's latest attempt is running at its provider."""
        return lambda: any(a.state == "running" for a in self.attempts(job_id))

    def finished(self, *job_ids: int) -> Callable[[], bool]:
        """Whether every one of the jobs is over."""
        return lambda: all(self.job(j).job_state.terminal for j in job_ids)

    async def run(self, until: Callable[[], bool], *, poll: bool = True, timeout: float = 30.0) -> None:
        """Work (and, with ``poll``, poll providers) until ``until()``; without polls only webhooks end waits."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not until():
            assert loop.time() < deadline, "the jobs did not get there in time"
            did = await self.worker.work_once()
            if poll:
                await self.worker.poll_due()
            if did is None:
                await asyncio.sleep(0.02)

    async def finish(self, *job_ids: int, poll: bool = True, timeout: float = 30.0) -> list[Job]:
        """Run the jobs to their end; the jobs."""
        await self.run(self.finished(*job_ids), poll=poll, timeout=timeout)
        return [self.job(j) for j in job_ids]


@contextlib.asynccontextmanager
async def animabot(tmp_path: Path, emus: Emulators, *names: str, webhooks: bool = True,
                   make: dict[str, Callable[[Settings], Backend]] | None = None,
                   **overrides: Any) -> AsyncIterator[System]:
    """An animabot using the named providers; with ``webhooks`` its web endpoint listens and is its public URL."""
    settings = make_settings(tmp_path, **emus.settings(*names), **overrides)
    db = init_db(settings)
    factories: dict[str, Callable[[Settings], Backend]] = {
        "replicate": ReplicateBackend, "fal": lambda s: FalBackend(s, request_timeout=10.0), "cog": CogBackend,
        **(make or {}),
    }
    worker = Worker(db, settings, backends={name: factories[name](settings) for name in names})
    runner = None
    if webhooks:
        app = web.make_app(worker, settings.webhook_key(), max_body=settings.webhook_max_bytes)
        runner, port = await web.serve(app, "127.0.0.1", 0)
        settings.public_url = f"http://127.0.0.1:{port}"
    try:
        yield System(settings, db, worker)
    finally:
        if runner is not None:
            await runner.cleanup()
        await worker.aclose()
        db.dispose()


def assert_settled(s: System, *job_ids: int) -> None:
    """Each job is over and accounted for: clean books, nothing held, one playable clip per success, costs noted."""
    with Session(s.db) as session:
        assert ledger.audit(session) == []
        assert all(a.held == 0 for a in session.exec(select(Account)))
        for job_id in job_ids:
            job = session.get(Job, job_id)
            assert job is not None and job.job_state.terminal, f"job {job_id} is {job and job.state}"
            clips = session.exec(select(Clip).where(Clip.job_id == job_id)).all()
            attempts = session.exec(select(Attempt).where(Attempt.job_id == job_id)).all()
            assert all(a.state == "finished" for a in attempts)
            still = job.detail.get("paint", {}).get("cost_usd", 0.0)  # a prompt-only job's painted picture
            assert job.cost_usd == pytest.approx(sum(a.cost_usd for a in attempts) + still)
            kinds = [e.kind for e in events.history(s.db, job_id)]
            assert kinds[-1] == job.state and sum(k in events.FINAL_KINDS for k in kinds) == 1
            if job.state == "succeeded":
                [clip] = clips
                info = video.probe(Path(clip.path))
                assert max(info.width, info.height) == SIDE and info.fps == pytest.approx(FPS)
                assert info.duration == pytest.approx(5.0, abs=0.3)
            else:
                assert clips == []


def assert_charged(s: System, job_id: int, provider: Provider, *, generations: int = 1) -> None:
    """The job succeeded on ``provider``, was charged its price once, and noted the provider's bill."""
    job = s.job(job_id)
    assert (job.state, job.backend, job.error_code) == ("succeeded", provider.backend, None)
    assert job.price_credits == provider.credits
    assert job.cost_usd == pytest.approx(provider.usd * generations)
    assert s.account().available == GRANT - provider.credits
    [done] = [e for e in events.history(s.db, job_id) if e.kind == "succeeded"]
    assert done.payload["credits"] == provider.credits and done.payload["backend"] == provider.backend


# -- each provider, happy path -------------------------------------------------------------------------


async def test_a_replicate_job_is_finished_by_replicates_webhook(tmp_path, emulators):
    """Replicate with a public URL: its signed webhook reaches the web endpoint and nothing but it ends the wait."""
    emu = emulators.replicate
    async with animabot(tmp_path, emulators, "replicate") as s:
        job_id = s.submit()
        await s.finish(job_id, poll=False)

        [attempt] = s.attempts(job_id)
        prediction = emu.predictions[attempt.provider_id]
        assert prediction.webhook == s.settings.public_url + web.webhook_path(b"provider-tests", "replicate",
                                                                              attempt.id)
        assert [(d.prediction_id, d.event, d.status) for d in emu.deliveries[-1:]] == [
            (attempt.provider_id, "completed", 200)]
        assert s.kinds(job_id) == ["queued", "started", "generating", "post-processing", "succeeded"]
        assert_charged(s, job_id, PROVIDERS["replicate"])
        assert_settled(s, job_id)


async def test_a_replicate_job_without_a_public_url_is_finished_by_polling(tmp_path, emulators):
    """No public URL, no webhook asked for: the worker's polls find the finished prediction."""
    emu = emulators.replicate
    async with animabot(tmp_path, emulators, "replicate", webhooks=False) as s:
        mark = emu.mark()
        job_id = s.submit()
        await s.finish(job_id)

        [create] = [c for c in emu.calls_since(mark) if c.method == "POST"]
        assert "webhook" not in create.json
        [attempt] = s.attempts(job_id)
        assert emu.predictions[attempt.provider_id].webhook is None
        assert_charged(s, job_id, PROVIDERS["replicate"])
        assert_settled(s, job_id)


async def _play_fal(emu: FalEmulator) -> None:
    """fal's GPUs: complete each request as it arrives (which sends its webhook); never polled into finishing."""
    while True:
        for job in list(emu.jobs.values()):
            if not job.completed and not job.canceled:
                await emu.finish(job.id)
        await asyncio.sleep(0.05)


async def test_a_fal_job_is_finished_by_fals_signed_webhook(tmp_path, emulators):
    """fal: its Ed25519-signed webhook ends the wait; forged, stale and replayed copies are refused, change nothing."""
    emu = emulators.fal
    async with animabot(tmp_path, emulators, "fal") as s:
        job_id = s.submit(provider="fal")
        gpu = asyncio.create_task(_play_fal(emu))
        try:
            await s.finish(job_id, poll=False)
        finally:
            gpu.cancel()
        [attempt] = s.attempts(job_id)
        assert emu.jobs[attempt.provider_id].webhook.startswith(s.settings.public_url + "/webhooks/fal/")
        [delivery] = [d for d in emu.deliveries if d.request_id == attempt.provider_id]
        assert delivery.status == 200 and json.loads(delivery.answer)["ended"] is True
        assert_charged(s, job_id, PROVIDERS["fal"])
        before = (s.kinds(job_id), s.job(job_id).updated_at)

        forged = await emu.send_webhook(attempt.provider_id, forge=True)
        stale = await emu.send_webhook(attempt.provider_id, stale=600)
        replayed = await emu.replay(delivery)
        assert (forged.status, stale.status, replayed.status) == (401, 401, 409)
        assert (s.kinds(job_id), s.job(job_id).updated_at) == before
        assert_settled(s, job_id)


async def test_a_cog_job_runs_in_animabot_run_and_is_finished_by_the_servers_webhook(tmp_path, emulators):
    """Cog cannot be polled: ``animabot run`` (embedded runtime + web endpoint) learns the end from its webhook."""
    emu = emulators.cog
    emu.duplicate_webhooks = True  # each final webhook twice: the second must be harmless
    settings = make_settings(tmp_path, **emulators.settings("cog"), web_port=0, poll_tick=0.1)
    db = init_db(settings)
    seen: list[JobEvent] = []
    stop, ready = asyncio.Event(), asyncio.Event()

    async def front_end(event: JobEvent) -> None:
        seen.append(event)
        if event.final:
            stop.set()

    def serving(port: int) -> None:
        settings.public_url = f"http://127.0.0.1:{port}"
        ready.set()

    app = asyncio.create_task(serve.run(db, settings, front_end=front_end, stop=stop, ready=serving))
    try:
        await asyncio.wait_for(ready.wait(), 10)
        job_id = submit(db, settings, image=PICTURE, params=JobParams(prompt="a gentle smile", backend="cog"),
                        member=MEMBER).job_id  # the runtime finds it on its next round
        await asyncio.wait_for(stop.wait(), 30)
        await asyncio.wait_for(app, 10)
    finally:
        stop.set()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(app, 10)
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().remove_signal_handler(sig)
    s = System(settings, db, Worker(db, settings))
    [attempt] = s.attempts(job_id)
    finals = [w for w in emu.webhooks if w["body"]["id"] == attempt.provider_id and w["body"]["status"] != "processing"]
    assert [w["status"] for w in finals] == [200, 200]  # the duplicate was answered "already handled"
    assert finals[0]["url"].startswith(settings.public_url + f"/webhooks/cog/{attempt.id}/")
    assert [e.kind for e in seen if e.job_id == job_id][-2:] == ["post-processing", "succeeded"]
    assert_charged(s, job_id, PROVIDERS["cog"])
    assert_settled(s, job_id)
    db.dispose()


# -- faults, each ending in a retry, a fallback or a refund --------------------------------------------


async def test_a_throttled_submit_is_retried_after_the_wait_the_provider_asked_for(tmp_path, emulators):
    """429 with Retry-After on create: the job waits that long, then the next submit goes through."""
    emu = emulators.replicate
    emu.throttle(retry_after=1, times=1)
    async with animabot(tmp_path, emulators, "replicate") as s:
        job_id = s.submit()
        await s.finish(job_id, poll=False)

        throttled, ok = s.attempts(job_id)
        assert (throttled.verdict, throttled.error_code, throttled.provider_id) == ("error", "rate_limited", None)
        assert (ok.started_at - throttled.finished_at).total_seconds() >= 0.9
        assert "retrying" in s.kinds(job_id)
        assert_charged(s, job_id, PROVIDERS["replicate"])
        assert_settled(s, job_id)


async def test_an_outage_is_retried_until_the_provider_delivers(tmp_path, emulators):
    """A 500 on create, then a prediction that fails (CUDA out of memory): retried each time, then a clip."""
    emu = emulators.replicate
    emu.fail_next(status=500, on="create")
    emu.script("fail")
    async with animabot(tmp_path, emulators, "replicate") as s:
        job_id = s.submit()
        await s.finish(job_id, poll=False)

        attempts = s.attempts(job_id)
        assert [(a.verdict, a.error_code) for a in attempts] == [
            ("error", "unavailable"), ("error", "unavailable"), ("accepted", None)]
        assert "500" in attempts[0].error_message and "out of memory" in attempts[1].error_message
        assert_charged(s, job_id, PROVIDERS["replicate"])
        assert_settled(s, job_id)


async def test_a_create_whose_answer_was_lost_is_adopted_not_started_twice(tmp_path, emulators):
    """Replicate takes no idempotency key: after a dropped answer the job finds its prediction, so one is billed."""
    emu = emulators.replicate
    emu.lose_answers = 1
    async with animabot(tmp_path, emulators, "replicate") as s:
        job_id = s.submit()
        await s.finish(job_id, poll=False)

        [attempt] = s.attempts(job_id)
        assert attempt.verdict == "accepted" and len(emu.predictions) == 1
        assert attempt.provider_id == next(iter(emu.predictions))
        assert_charged(s, job_id, PROVIDERS["replicate"])
        assert_settled(s, job_id)
    assert emu.lose_answers == 0


class _DiesAfterCreating(ReplicateBackend):
    """The real backend in a worker that dies once, right after Replicate accepted a prediction."""

    name = "replicate"
    died = False

    async def submit(self, request):
        handle = await super().submit(request)
        if not _DiesAfterCreating.died:
            _DiesAfterCreating.died = True
            raise RuntimeError("the worker died before recording the prediction")
        return handle


async def test_a_worker_that_died_after_creating_is_followed_by_one_that_adopts_the_prediction(tmp_path, emulators):
    """The redo finds the attempt still "submitting" and Replicate's prediction for it: it waits on that one."""
    emu = emulators.replicate
    _DiesAfterCreating.died = False
    async with animabot(tmp_path, emulators, "replicate", make={"replicate": _DiesAfterCreating}) as s:
        job_id = s.submit()
        await s.finish(job_id, poll=False)

        [attempt] = s.attempts(job_id)
        assert _DiesAfterCreating.died and s.worker.stats.crashes == 1
        assert attempt.verdict == "accepted" and len(emu.predictions) == 1
        assert_charged(s, job_id, PROVIDERS["replicate"])
        assert_settled(s, job_id)


async def test_a_hung_prediction_times_out_is_canceled_and_retried(tmp_path, emulators):
    """A prediction still processing after generation_timeout is canceled at Replicate and tried again."""
    emu = emulators.replicate
    emu.script("hang")
    async with animabot(tmp_path, emulators, "replicate", webhooks=False, generation_timeout=1.0) as s:
        job_id = s.submit()
        await s.finish(job_id)

        hung, ok = s.attempts(job_id)
        assert (hung.verdict, hung.error_code, ok.verdict) == ("error", "timeout", "accepted")
        assert emu.predictions[hung.provider_id].canceled_at is not None
        assert_charged(s, job_id, PROVIDERS["replicate"])
        assert_settled(s, job_id)


@pytest.mark.parametrize("provider", ["replicate", "fal", "cog"])
async def test_a_moderation_refusal_fails_the_job_at_once_with_a_refund(tmp_path, emulators, provider):
    """The provider's safety filter refuses: no retry, the member is told why and gets every credit back."""
    prompt = "a gentle smile"
    if provider == "replicate":
        emulators.replicate.script("refuse")
    elif provider == "fal":
        emulators.fal.script("refuse")
    else:
        prompt += " [nsfw]"  # the Cog "model" fails this one with its safety checker's message
    async with animabot(tmp_path, emulators, provider) as s:
        job_id = s.submit(prompt, provider=provider)
        gpu = asyncio.create_task(_play_fal(emulators.fal)) if provider == "fal" else None
        try:
            [job] = await s.finish(job_id, poll=False)
        finally:
            if gpu is not None:
                gpu.cancel()

        assert (job.state, job.error_code) == ("failed", "content_refused")
        assert job.error_message.startswith("the model refused this picture or prompt")
        assert job.error_message.endswith("nothing was charged")
        [attempt] = s.attempts(job_id)
        assert (attempt.verdict, attempt.error_code) == ("error", "content_refused")
        kinds = s.kinds(job_id)
        assert kinds[-1] == "failed" and "retrying" not in kinds
        assert (s.account().available, s.account().held) == (GRANT, 0)
        assert job.cost_usd == 0
        assert_settled(s, job_id)


async def test_output_that_is_not_a_video_is_retried(tmp_path, emulators):
    """Bytes that are no video, then a picture instead of a video: each attempt is retried, then a clip."""
    emu = emulators.replicate
    emu.script("garbage", "image")
    async with animabot(tmp_path, emulators, "replicate", webhooks=False) as s:
        job_id = s.submit()
        await s.finish(job_id)

        garbage, image, ok = s.attempts(job_id)
        assert (garbage.verdict, garbage.error_code) == ("error", "unavailable")
        assert "not a video" in garbage.error_message
        assert image.verdict in ("error", "rejected") and ok.verdict == "accepted"
        assert_charged(s, job_id, PROVIDERS["replicate"], generations=1 + (image.verdict == "rejected"))
        assert_settled(s, job_id)


async def test_frozen_and_flickering_clips_are_rejected_by_the_gate_and_retried_silently(tmp_path, emulators):
    """The gate turns down a frozen and a flickering clip; the member sees "retrying" with why, then the clip."""
    emu = emulators.replicate
    emu.script("frozen", "flicker")
    async with animabot(tmp_path, emulators, "replicate") as s:
        job_id = s.submit()
        await s.finish(job_id, poll=False)

        frozen, flicker, ok = s.attempts(job_id)
        assert frozen.verdict == flicker.verdict == "rejected" and ok.verdict == "accepted"
        assert "frozen" in frozen.reasons and "flicker" in flicker.reasons
        retries = [e.payload for e in events.history(s.db, job_id) if e.kind == "retrying"]
        assert [r["reasons"] for r in retries] == [frozen.reasons, flicker.reasons]
        assert all(r["reason"].startswith("that one ") for r in retries)
        assert "failed" not in s.kinds(job_id)
        # The member pays for one clip; the three generations Replicate billed are on the job's cost.
        assert_charged(s, job_id, PROVIDERS["replicate"], generations=3)
        assert_settled(s, job_id)


async def test_repeated_outages_cool_a_backend_down_and_the_next_route_skips_it(tmp_path, emulators):
    """Three failures in a row: the job falls back to local, and the next job's route passes Replicate over."""
    emu = emulators.replicate
    emu.script("fail", "fail", "fail")
    guild = ("guild-routed", "user-1")
    async with animabot(tmp_path, emulators, "replicate") as s:
        with Session(s.db) as session:
            overrides = {"portrait": [{"backend": "replicate", "model": KLING}, {"backend": "local"}]}
            session.add(GuildSettings(guild_id=guild[0], routing_overrides=overrides))
            session.commit()
        first = s.submit(routed=True, member=guild)
        await s.finish(first)  # local, the fallback, is polled
        creates = len(emu.creates)
        second = s.submit(routed=True, member=guild)
        await s.finish(second)

        assert [(a.backend, a.verdict) for a in s.attempts(first)] == [("replicate", "error")] * 3 + [
            ("local", "accepted")]
        assert [a.backend for a in s.attempts(second)] == ["local"]
        assert len(emu.creates) == creates  # the cooling backend was not asked
        route = s.job(second).detail["plan"]["route"]
        assert [step["backend"] for step in route["steps"]] == ["local"]
        assert "cooling down" in route["skipped"][0]["why"]
        for job_id in (first, second):  # local is free: the reservation is given back
            assert (s.job(job_id).state, s.job(job_id).backend, s.job(job_id).price_credits) == ("succeeded",
                                                                                                 "local", 0)
        assert s.job(first).cost_usd == 0  # failed predictions bill nothing
        assert s.account(guild).available == GRANT
        assert_settled(s, first, second)


async def _post(url: str, headers: dict[str, str], body: bytes) -> int:
    async with aiohttp.ClientSession() as http, http.post(url, data=body, headers=headers) as response:
        return response.status


async def test_forged_stale_and_replayed_webhooks_are_refused_and_a_duplicate_is_harmless(tmp_path, emulators):
    """At the web endpoint: a forged signature 401, a stale one 401, a wrong URL token 403, a replay 409."""
    emu = emulators.replicate
    emu.script(Outcome("ok", latency=1.5))
    emu.duplicate_webhooks = True  # the completed event twice under one webhook-id
    async with animabot(tmp_path, emulators, "replicate") as s:
        job_id = s.submit()
        await s.run(s.running(job_id), poll=False)
        [attempt] = s.attempts(job_id)
        url = emu.predictions[attempt.provider_id].webhook
        done = json.dumps({**emu.prediction_json(attempt.provider_id), "status": "succeeded"}).encode()
        forged = await _post(url, *emu.webhook_for(attempt.provider_id, forge=True, body=done))
        stale = await _post(url, *emu.webhook_for(attempt.provider_id, stale=True))
        wrong_token = await _post(url.rsplit("/", 1)[0] + "/0123456789abcdef0123456789abcdef",
                                  *emu.webhook_for(attempt.provider_id))
        assert (forged, stale, wrong_token) == (401, 401, 403)
        assert s.attempts(job_id)[0].state == "running"
        assert s.kinds(job_id) == ["queued", "started", "generating"]

        await s.finish(job_id, poll=False)
        deliveries = [d for d in emu.deliveries if d.prediction_id == attempt.provider_id]
        # The duplicate is known by its webhook-id: refused each time Replicate retries it, changing nothing.
        assert deliveries[0].status == 200 and {d.status for d in deliveries[1:]} == {409}
        before = (s.kinds(job_id), s.job(job_id).updated_at)
        assert await emu.replay(deliveries[0]) == 409
        fresh_copy = await _post(url, *emu.webhook_for(attempt.provider_id))  # validly signed, new id
        assert fresh_copy == 200
        assert (s.kinds(job_id), s.job(job_id).updated_at) == before
        assert_charged(s, job_id, PROVIDERS["replicate"])
        assert_settled(s, job_id)


async def test_a_busy_cog_server_makes_the_next_job_wait_then_run(tmp_path, emulators):
    """One slot, two jobs: the second is turned away with 409 while the first runs, waits, and then runs.

    Each job may make one attempt: waiting for a busy server is back-pressure and must not spend it.
    """
    emu = emulators.cog
    quick = dataclasses.replace(load_catalogue(), busy_retry_after=0.3)
    async with animabot(tmp_path, emulators, "cog", make={"cog": lambda st: CogBackend(st, catalogue=quick)},
                        max_attempts=1, attempts_per_backend=1) as s:
        first = s.submit("a gentle smile [slow=1]", provider="cog")
        second = s.submit(provider="cog")
        await s.finish(first, second, poll=False)

        busy = [a for a in s.attempts(second) if a.error_code == "rate_limited"]
        assert busy and all(a.provider_id is None for a in busy)
        assert [a.verdict for a in s.attempts(first)] == ["accepted"]
        assert s.attempts(second)[-1].verdict == "accepted"
        assert any(status == 409 for method, _, status in emu.requests if method == "PUT")
        with Session(s.db) as session:
            assert all(session.get(Job, j).state == "succeeded" for j in (first, second))
        assert s.account().available == GRANT - 2 * PROVIDERS["cog"].credits
        assert_settled(s, first, second)


# -- prompt-only jobs (the picture painted first) and end frames -----------------------------------------


FLUX = "black-forest-labs/flux-schnell"


def _decoded(uri: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(uri.partition(",")[2])))


async def test_a_prompt_only_job_is_painted_by_flux_then_animated_by_kling(tmp_path, emulators):
    """No picture: FLUX.1 [schnell] paints one, Kling animates it; the member pays for both, once."""
    emu = emulators.replicate
    async with animabot(tmp_path, emulators, "replicate") as s:
        mark = emu.mark()
        receipt = submit(s.db, s.settings, image=None, member=MEMBER,
                         params=JobParams(prompt="a lighthouse at dusk", duration=5.0, aspect="1:1",
                                          backend="replicate", model=KLING))
        assert receipt.price_credits == PROVIDERS["replicate"].credits + 1  # the clip and the still
        await s.finish(receipt.job_id, poll=False)

        paint, animate = [c for c in emu.calls_since(mark) if c.method == "POST" and c.path.endswith("/predictions")]
        assert paint.path == f"/v1/models/{FLUX}/predictions" and paint.json["input"]["aspect_ratio"] == "1:1"
        assert animate.path == f"/v1/models/{KLING}/predictions"
        started = _decoded(animate.json["input"]["start_image"])  # the painted picture, fitted
        assert started.size == (256, 256) and np.asarray(started).std() > 20
        job = s.job(receipt.job_id)
        assert (job.state, job.price_credits) == ("succeeded", 26)
        assert s.kinds(receipt.job_id) == ["queued", "started", "painting", "generating", "post-processing",
                                           "succeeded"]
        assert job.cost_usd == pytest.approx(0.25 + 0.003)
        assert s.account().available == GRANT - 26
        assert_settled(s, receipt.job_id)


async def test_a_prompt_only_job_on_fal_is_painted_by_flux_dev(tmp_path, emulators):
    """fal alone configured: FLUX.1 dev paints at the clip's shape through fal's queue, then Kling animates."""
    emu = emulators.fal
    async with animabot(tmp_path, emulators, "fal") as s:
        receipt = submit(s.db, s.settings, image=None, member=MEMBER,
                         params=JobParams(prompt="a lighthouse at dusk", duration=5.0, aspect="1:1", backend="fal",
                                          model=FAL_KLING))
        gpu = asyncio.create_task(_play_fal(emu))
        try:
            await s.finish(receipt.job_id, poll=False)
        finally:
            gpu.cancel()
        [still] = [j for j in emu.jobs.values() if j.app == "fal-ai/flux/dev"]
        assert still.arguments["image_size"] == {"width": 512, "height": 512}
        job = s.job(receipt.job_id)
        assert (job.state, job.price_credits) == ("succeeded", PROVIDERS["fal"].credits + 3)
        assert job.cost_usd == pytest.approx(0.28 + 0.025)
        assert_settled(s, receipt.job_id)


async def test_a_refused_painting_fails_the_job_with_a_refund_and_no_clip_is_asked_for(tmp_path, emulators):
    """The painter's moderation refuses the prompt: the job ends at once, nothing is charged, Kling never runs."""
    emu = emulators.replicate
    emu.script("refuse")
    async with animabot(tmp_path, emulators, "replicate") as s:
        mark = emu.mark()
        receipt = submit(s.db, s.settings, image=None, member=MEMBER,
                         params=JobParams(prompt="something flagged", duration=5.0, backend="replicate", model=KLING))
        [job] = await s.finish(receipt.job_id, poll=False)

        assert (job.state, job.error_code) == ("failed", "content_refused")
        assert [c.path for c in emu.calls_since(mark) if c.method == "POST"] == [f"/v1/models/{FLUX}/predictions"]
        assert s.attempts(receipt.job_id) == []
        assert (s.account().available, s.account().held) == (GRANT, 0)
        assert_settled(s, receipt.job_id)


async def test_an_end_frame_reaches_kling_and_is_charged_at_its_pro_price(tmp_path, emulators):
    """The end frame, fitted like the picture, arrives as Kling's end_image in pro mode; the price is pro's."""
    emu = emulators.replicate
    buf = io.BytesIO()
    Image.new("RGB", (640, 360), (30, 160, 90)).save(buf, "PNG")
    async with animabot(tmp_path, emulators, "replicate") as s:
        mark = emu.mark()
        receipt = submit(s.db, s.settings, image=PICTURE, member=MEMBER, end_image=buf.getvalue(),
                         params=JobParams(prompt="a gentle smile", duration=5.0, backend="replicate", model=KLING))
        assert receipt.price_credits == 45
        await s.finish(receipt.job_id, poll=False)

        [create] = [c for c in emu.calls_since(mark) if c.method == "POST"]
        sent = create.json["input"]
        assert sent["mode"] == "pro"
        end = _decoded(sent["end_image"])
        assert end.size == (256, 256) and end.convert("RGB").getpixel((128, 128)) == (30, 160, 90)  # fitted, cropped
        assert _decoded(sent["start_image"]).size == (256, 256)
        job = s.job(receipt.job_id)
        assert (job.state, job.price_credits, job.cost_usd) == ("succeeded", 45, pytest.approx(0.45))
        assert s.account().available == GRANT - 45
        assert_settled(s, receipt.job_id)
