"""The worker: units of work that never wait on a provider, polls that find answers, cancels, recovery.

These run the real job system in this process (the embedded transport) on SQLite and PostgreSQL; the
same Worker methods are what Celery tasks call (tests/reliability runs them in real Celery workers).
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
from datetime import timedelta
from pathlib import Path

import pytest
from PIL import Image
from sqlmodel import Session, select

from backends.fake import FakeBackend
from worker import events, health, ledger, scheduler
from worker.errors import InvalidParameters
from worker.jobs import JobParams
from worker.models import Attempt, Clip, GuildSettings, Job, JobStage, Transfer, utcnow
from worker.runner import CancelRefused, Worker, drain
from worker.settings import Settings
from worker.submit import submit

SAMPLE = Path(__file__).resolve().parents[2] / "bot" / "assets" / "astronaut.png"
PICTURE = SAMPLE.read_bytes()


@pytest.fixture
def settings(tmp_path, db_url):
    return Settings(data_dir=tmp_path, database_url=db_url, output_long_side=256, retry_backoff=0.0,
                    daily_free_credits=0, lease_seconds=2, max_active_per_user=50)


def _member(engine, credits, user="u1"):
    with Session(engine) as s:
        account = ledger.member_account(s, "g1", user)
        if credits:
            ledger.grant(s, account.id, credits, key=f"welcome-{user}")
        return account.id


def _job(engine, job_id):
    with Session(engine) as s:
        return s.get(Job, job_id)


def _finished(engine, *job_ids):
    return lambda: all(_job(engine, j).job_state.terminal for j in job_ids)


def _kinds(engine, job_id):
    return [e.kind for e in events.history(engine, job_id)]


def _submit(engine, settings, model="ok", *, duration=1, user="u1", **kw):
    params = JobParams(prompt="p", duration=duration, backend="fake", model=model, **kw)
    return submit(engine, settings, image=PICTURE, params=params, member=("g1", user)).job_id


async def test_a_job_goes_from_submit_to_a_clip_with_every_event_on_the_stream(engine, settings):
    """Queued, started, generating, post-processing, succeeded: in order, the last with the clip and charge."""
    account = _member(engine, 5)
    worker = Worker(engine, settings)
    job_id = _submit(engine, settings)
    await drain(worker, until=_finished(engine, job_id))

    assert _job(engine, job_id).state == "succeeded"
    assert _kinds(engine, job_id) == ["queued", "started", "generating", "post-processing", "succeeded"]
    done = events.history(engine, job_id)[-1].payload
    assert done["clip"]["duration"] == pytest.approx(1.0) and Path(done["clip"]["path"]).is_file()
    assert (done["backend"], done["credits"]) == ("fake", 1)
    with Session(engine) as s:
        assert ledger.balance(s, account).available == 4 and ledger.audit(s) == []


async def test_a_rejected_output_and_an_outage_are_retried_and_announced(engine, settings):
    """The member hears 'that one came out frozen, trying again'; only the delivered clip is charged."""
    account = _member(engine, 5)
    job_id = _submit(engine, settings, model="frozen,fail,ok")
    await drain(Worker(engine, settings), until=_finished(engine, job_id))

    retries = [e.payload for e in events.history(engine, job_id) if e.kind == "retrying"]
    assert [r["reason"] for r in retries] == ["that one came out frozen", "the fake provider had an outage"]
    assert _kinds(engine, job_id).count("generating") == 3
    with Session(engine) as s:
        assert ledger.balance(s, account).available == 4


async def test_no_unit_of_work_waits_for_the_provider(engine, settings):
    """While a generation runs the job is released (next_run_at NULL): a unit returns at once."""
    _member(engine, 5)
    slow = Settings(**{**settings.model_dump(), "fake_latency": 30.0})
    worker = Worker(engine, slow)
    job_id = _submit(engine, slow)
    assert await asyncio.wait_for(worker.work_once(), timeout=20) == job_id
    job = _job(engine, job_id)
    assert (job.state, job.next_run_at, job.lease_owner) == ("generating", None, None)
    with Session(engine) as s:
        (attempt,) = s.exec(select(Attempt).where(Attempt.job_id == job_id)).all()
    assert attempt.state == "running" and attempt.handle["id"]
    assert await worker.poll_due() == 0  # still running: rescheduled, nothing ready
    assert await worker.work_once() is None


def _small_picture() -> bytes:
    buf = io.BytesIO()
    with Image.open(SAMPLE) as im:
        im.convert("RGB").resize((192, 192)).save(buf, "PNG")
    return buf.getvalue()


async def test_one_worker_holds_many_generations_in_flight(engine, settings):
    """Twenty 30-second generations are in flight at once in one process; polling them all is one round.

    (bench/inflight.py holds thousands.)
    """
    _member(engine, 100)
    slow = Settings(**{**settings.model_dump(), "fake_latency": 30.0})
    worker = Worker(engine, slow)
    small = _small_picture()
    params = JobParams(prompt="p", duration=1, backend="fake")
    jobs = [submit(engine, slow, image=small, params=params, member=("g1", "u1")).job_id for _ in range(20)]
    while await worker.work_once() is not None:
        pass
    with Session(engine) as s:
        running = s.exec(select(Attempt).where(Attempt.state == "running")).all()
    assert len(running) == len(jobs)
    with Session(engine) as s:  # make every check due now
        for attempt in running:
            attempt.next_poll_at = utcnow()
            s.add(attempt)
        s.commit()
    assert await worker.poll_due() == 0 and worker.stats.polls == 20


async def test_a_backend_that_hangs_is_timed_out_retried_and_finally_refunded(engine, settings):
    """A generation past generation_timeout is canceled at the provider and counts as a failed attempt."""
    account = _member(engine, 5)
    quick = Settings(**{**settings.model_dump(), "generation_timeout": 0.3, "max_attempts": 2})
    fake = FakeBackend(quick)
    worker = Worker(engine, quick, backends={"fake": fake})
    job_id = _submit(engine, quick, model="hang")
    await drain(worker, until=_finished(engine, job_id), timeout=30)

    job = _job(engine, job_id)
    assert job.state == "failed" and "no usable clip after 2 attempts" in job.error_message
    assert len(fake.canceled) == 2
    with Session(engine) as s:
        assert (ledger.balance(s, account).available, ledger.balance(s, account).held) == (5, 0)


async def test_a_permanent_error_falls_back_along_the_route(engine, settings):
    """The guild routes portraits to a fake model that rejects requests, then to local: local makes the clip."""
    _member(engine, 0)
    with Session(engine) as s:
        s.add(GuildSettings(guild_id="g1", routing_overrides={
            "portrait": [{"backend": "fake", "model": "invalid"}, {"backend": "local"}]}))
        s.commit()
    job_id = submit(engine, settings, image=PICTURE, params=JobParams(prompt="p", duration=1),
                    member=("g1", "u1")).job_id
    await drain(Worker(engine, settings), until=_finished(engine, job_id), timeout=60)
    with Session(engine) as s:
        attempts = s.exec(select(Attempt).where(Attempt.job_id == job_id).order_by(Attempt.number)).all()
    assert [(a.backend, a.verdict) for a in attempts] == [("fake", "error"), ("local", "accepted")]
    assert _job(engine, job_id).state == "succeeded"


async def test_the_owner_cancels_a_queued_job_and_gets_the_credits_back(engine, settings):
    """Cancel ends it at once; nobody else may cancel it; a finished job cannot be canceled."""
    account = _member(engine, 5)
    _member(engine, 0, user="intruder")
    job_id = _submit(engine, settings)
    worker = Worker(engine, settings)
    with Session(engine) as s:
        intruder = ledger.member_account(s, "g1", "intruder").id
    with pytest.raises(CancelRefused, match="not your job"):
        await worker.cancel(job_id, account_id=intruder)

    assert await worker.cancel(job_id, account_id=account) is True
    assert _job(engine, job_id).state == "canceled" and _kinds(engine, job_id)[-1] == "canceled"
    with pytest.raises(CancelRefused, match="already canceled"):
        await worker.cancel(job_id, account_id=account)
    with Session(engine) as s:
        assert ledger.balance(s, account).available == 5


async def test_canceling_a_running_job_cancels_the_provider_request(engine, settings):
    """The generation in flight is canceled at the provider, then the job ends with a refund."""
    account = _member(engine, 5)
    slow = Settings(**{**settings.model_dump(), "fake_latency": 30.0})
    fake = FakeBackend(slow)
    worker = Worker(engine, slow, backends={"fake": fake})
    job_id = _submit(engine, slow)
    await worker.work_once()
    assert await worker.cancel(job_id, account_id=account) is True
    assert len(fake.canceled) == 1
    with Session(engine) as s:
        (attempt,) = s.exec(select(Attempt).where(Attempt.job_id == job_id)).all()
        assert (attempt.state, attempt.verdict) == ("finished", "canceled")
        assert ledger.balance(s, account).available == 5


async def test_a_cancel_while_a_worker_holds_the_job_lands_when_the_unit_ends(engine, settings):
    """The flag is honoured by the next unit: the job ends canceled, not generated."""
    account = _member(engine, 5)
    worker = Worker(engine, settings)
    job_id = _submit(engine, settings)
    scheduler.claim(engine, "someone-else", 30)
    assert await worker.cancel(job_id, account_id=account) is False
    scheduler.release(engine, job_id, "someone-else", utcnow())
    await drain(worker, until=_finished(engine, job_id))
    assert _job(engine, job_id).state == "canceled"
    with Session(engine) as s:
        assert ledger.balance(s, account).available == 5


async def test_a_job_whose_worker_died_mid_unit_is_taken_over_after_its_lease(engine, settings):
    """The dead worker's lease runs out; another worker redoes the unit; one clip, one charge."""
    account = _member(engine, 5)
    job_id = _submit(engine, settings)
    assert scheduler.claim(engine, "died", 0.2) == job_id  # ... and never renews or releases
    worker = Worker(engine, settings)
    assert await worker.work_once() is None
    await asyncio.sleep(0.3)
    await drain(worker, until=_finished(engine, job_id))
    job = _job(engine, job_id)
    assert (job.state, job.recoveries) == ("succeeded", 1)
    with Session(engine) as s:
        assert len(s.exec(select(Clip).where(Clip.job_id == job_id)).all()) == 1
        captures = s.exec(select(Transfer).where(Transfer.job_id == job_id, Transfer.kind == "capture")).all()
        assert len(captures) == 1 and ledger.balance(s, account).available == 4


async def test_a_unit_redone_after_a_crash_never_submits_the_same_attempt_twice(engine, settings):
    """An attempt whose handle was stored is waited on; one left 'submitting' is counted lost and redone."""
    _member(engine, 5)
    slow = Settings(**{**settings.model_dump(), "fake_latency": 0.2})
    fake = FakeBackend(slow)
    worker = Worker(engine, slow, backends={"fake": fake})
    job_id = _submit(engine, slow)
    await worker.work_once()
    with Session(engine) as s:  # pretend the worker died after submitting, before releasing the job
        job = s.get(Job, job_id)
        job.next_run_at = utcnow()
        s.add(job)
        s.commit()
    await worker.work_once()
    assert len(fake.submitted) == 1
    await drain(worker, until=_finished(engine, job_id))
    assert len(fake.submitted) == 1 and _job(engine, job_id).state == "succeeded"


async def test_a_job_that_keeps_killing_its_worker_is_failed_with_a_refund(engine, settings):
    """After max_recoveries takeovers the job is poisonous: it ends failed, credits returned."""
    account = _member(engine, 5)
    job_id = _submit(engine, settings)
    with Session(engine) as s:
        job = s.get(Job, job_id)
        job.recoveries = settings.max_recoveries + 1
        s.add(job)
        s.commit()
    await Worker(engine, settings).work_once()
    job = _job(engine, job_id)
    assert (job.state, job.error_code) == ("failed", "worker_crashed")
    with Session(engine) as s:
        assert ledger.balance(s, account).available == 5


async def test_the_reaper_fails_overdue_jobs_with_a_refund_and_wakes_ready_ones(engine, settings):
    """A job older than job_deadline is stopped and refunded; the reaper kicks the rest."""
    account = _member(engine, 5)
    kicks = []
    worker = Worker(engine, settings, kick=kicks.append)
    stuck, fresh = _submit(engine, settings), _submit(engine, settings)
    with Session(engine) as s:
        job = s.get(Job, stuck)
        job.created_at = utcnow() - timedelta(seconds=settings.job_deadline + 5)
        job.state, job.next_run_at = "generating", None
        s.add(job)
        s.commit()
    assert await worker.reap() == 1
    assert _job(engine, stuck).error_code == "deadline" and _job(engine, fresh).state == "queued"
    assert kicks == [1]
    with Session(engine) as s:
        assert ledger.balance(s, account) == ledger.Balance(available=4, held=1)


async def test_a_webhook_resume_checks_the_provider_at_once(engine, settings):
    """resume() polls one attempt now instead of at its scheduled time, and wakes the job."""
    _member(engine, 5)
    kicks = []
    quick = Settings(**{**settings.model_dump(), "fake_latency": 0.3})  # not done at once: the unit ends waiting
    worker = Worker(engine, quick, kick=kicks.append)
    job_id = _submit(engine, quick)
    await worker.work_once()
    with Session(engine) as s:
        (attempt,) = s.exec(select(Attempt).where(Attempt.job_id == job_id)).all()
        attempt_id = attempt.id
        attempt.next_poll_at = utcnow() + timedelta(hours=1)
        s.add(attempt)
        s.commit()
    assert await worker.poll_due() == 0
    await asyncio.sleep(0.3)  # the generation ends; its check is not due for an hour
    assert await worker.resume(attempt_id) is True and kicks == [1]
    assert await worker.resume(attempt_id) is False  # a replayed webhook changes nothing
    await drain(worker, until=_finished(engine, job_id))
    assert _job(engine, job_id).state == "succeeded"


async def test_extending_a_clip_continues_from_its_last_frame_and_joins_the_two(engine, settings):
    """The extension job starts on the parent's last frame; its clip is the parent's plus the new seconds."""
    _member(engine, 10)
    worker = Worker(engine, settings)
    parent = _submit(engine, settings, duration=2)
    await drain(worker, until=_finished(engine, parent))
    params = JobParams(prompt="p", duration=2, backend="fake")
    child = submit(engine, settings, image=b"", params=params, member=("g1", "u1"), extends=parent).job_id
    await drain(worker, until=_finished(engine, child), timeout=90)

    job = _job(engine, child)
    assert (job.state, job.parent_job_id) == ("succeeded", parent)
    with Session(engine) as s:
        clip = s.exec(select(Clip).where(Clip.job_id == child)).one()
    assert clip.duration == pytest.approx(2 + 2 - settings.stitch_overlap, abs=0.05)
    with pytest.raises(InvalidParameters, match="another server"):
        submit(engine, settings, image=b"", params=params, member=("g2", "u1"), extends=parent)


class _RemoteFake(FakeBackend):
    """The fake, declared as a network backend so its health counts."""

    name = "remote-fake"
    capabilities = dataclasses.replace(FakeBackend.capabilities, needs_network=True)


async def test_a_backend_that_keeps_failing_cools_down_and_jobs_go_down_their_route(engine, settings):
    """Outages put it on cooldown: the next job skips it (and says why) and the fallback makes the clip."""
    _member(engine, 0)
    with Session(engine) as s:
        s.add(GuildSettings(guild_id="g1", routing_overrides={
            "portrait": [{"backend": "remote-fake", "model": "fail"}, {"backend": "local"}]}))
        s.commit()
    worker = Worker(engine, settings, backends={"remote-fake": _RemoteFake(settings)})
    first = submit(engine, settings, image=PICTURE, params=JobParams(prompt="p", duration=1),
                   member=("g1", "u1")).job_id
    await drain(worker, until=_finished(engine, first), timeout=60)
    assert "cooling down" in (health.checker(engine)("remote-fake", "fail") or "")

    second = submit(engine, settings, image=PICTURE, params=JobParams(prompt="p", duration=1),
                    member=("g1", "u1")).job_id
    await drain(worker, until=_finished(engine, second), timeout=60)
    with Session(engine) as s:
        attempts = s.exec(select(Attempt).where(Attempt.job_id == second)).all()
        route = s.exec(select(JobStage).where(JobStage.job_id == second, JobStage.stage == "route")).one()
    assert [a.backend for a in attempts] == ["local"] and _job(engine, second).state == "succeeded"
    assert "cooling down" in route.detail["skipped"][0]["why"]


class _StallingFake(FakeBackend):
    """A fake whose submit stalls, as a worker does under heavy load."""

    name = "fake"

    async def submit(self, request):
        await asyncio.sleep(5)
        return await super().submit(request)


async def test_a_worker_that_loses_its_lease_stops_writing_to_the_job(engine, settings):
    """Another worker took the job while this one stalled: the stalled unit is stopped, not finished."""
    _member(engine, 5)
    worker = Worker(engine, settings, backends={"fake": _StallingFake(settings)})
    job_id = _submit(engine, settings)

    async def steal():
        await asyncio.sleep(0.5)
        with Session(engine) as s:  # what another worker does once it finds the lease run out
            job = s.get(Job, job_id)
            job.lease_owner = "thief"
            s.add(job)
            s.commit()

    thief = asyncio.create_task(steal())
    assert await asyncio.wait_for(worker.work_once(), 10) == job_id
    await thief
    job = _job(engine, job_id)
    assert job.lease_owner == "thief"
    with Session(engine) as s:
        (attempt,) = s.exec(select(Attempt).where(Attempt.job_id == job_id)).all()
    assert attempt.state == "submitting" and not attempt.handle  # the stalled submit never completed


async def test_a_generation_done_as_soon_as_submitted_is_collected_in_the_same_unit(engine, settings):
    """An instant local provider: one unit takes the job from queued to its clip, with no poll in between."""
    _member(engine, 5)
    worker = Worker(engine, settings)
    job_id = _submit(engine, settings)
    assert await worker.work_once() == job_id
    assert _job(engine, job_id).state == "succeeded"
    assert (worker.stats.units, worker.stats.polls) == (1, 0)
    assert _kinds(engine, job_id) == ["queued", "started", "generating", "post-processing", "succeeded"]
    with Session(engine) as s:
        (attempt,) = s.exec(select(Attempt).where(Attempt.job_id == job_id)).all()
        stages = [st.stage for st in s.exec(select(JobStage).where(JobStage.job_id == job_id).order_by(JobStage.id))]
    assert (attempt.state, attempt.verdict, attempt.report["state"]) == ("finished", "accepted", "succeeded")
    assert stages == ["validate", "classify", "enhance", "route", "prompt", "generate", "check", "post-process",
                      "encode", "store"]


async def test_a_unit_working_from_a_stale_row_cannot_move_the_job(engine, settings):
    """Moves are conditional on the state the unit knows: a unit that lost the job to another writes nothing."""
    from worker.jobs import load_job
    from worker.models import IllegalTransition
    from worker.pipeline import Pipeline

    _member(engine, 5)
    job_id = _submit(engine, settings)
    stale = load_job(engine, job_id)
    with Session(engine) as s:  # meanwhile another worker took the job and moved it on
        job = s.get(Job, job_id)
        job.state = "validating"
        s.add(job)
        s.commit()
    with pytest.raises(IllegalTransition, match="another worker"):
        await Pipeline(engine, settings).advance(job_id, job=stale)
    assert _kinds(engine, job_id) == ["queued"]


async def test_a_unit_cut_short_by_a_lost_database_connection_is_retried_without_counting_a_recovery(
        engine, settings, monkeypatch):
    """The database dropping the connection is not the job's fault: retried, and no step nearer max_recoveries."""
    import sqlalchemy as sa

    _member(engine, 5)
    worker = Worker(engine, settings)
    job_id = _submit(engine, settings)

    async def dropped(*args, **kwargs):
        raise sa.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection"),
                                      connection_invalidated=True)

    monkeypatch.setattr(worker.pipeline, "advance", dropped)
    assert await worker.work_once() == job_id
    job = _job(engine, job_id)
    assert (job.state, job.recoveries, job.lease_owner) == ("queued", 0, None) and job.next_run_at is not None
