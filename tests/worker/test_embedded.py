"""Embedded mode: the whole job system in one process, and jobs that survive a restart of it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlmodel import Session

from worker import events
from worker.db import init_db
from worker.embedded import EmbeddedRuntime
from worker.jobs import JobParams
from worker.models import Job
from worker.settings import Settings
from worker.submit import submit

SAMPLE = Path(__file__).resolve().parents[2] / "bot" / "assets" / "astronaut.png"


@pytest.fixture
def settings(tmp_path):
    return Settings(data_dir=tmp_path, output_long_side=256, retry_backoff=0.0, poll_tick=0.05, lease_seconds=2)


async def _until(check, timeout=60.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


def _states(db, ids):
    with Session(db) as s:
        return [s.get(Job, i).state for i in ids]


async def test_submitted_jobs_run_to_the_end_in_this_process(settings):
    """Kicked by submit, the runtime's loops claim, generate, poll and finish every job."""
    db = init_db(settings)
    runtime = EmbeddedRuntime(db, settings)
    await runtime.start()
    try:
        params = JobParams(prompt="p", duration=1, backend="fake", model="frozen,ok")
        ids = [submit(db, settings, image=SAMPLE.read_bytes(), params=params, kick=runtime.kick).job_id
               for _ in range(3)]
        await _until(lambda: _states(db, ids) == ["succeeded"] * 3)
    finally:
        await runtime.stop()
    assert sum(e.kind == "succeeded" for e in events.pending(db)) == 3


async def test_jobs_in_progress_survive_a_restart_of_the_process(settings):
    """Stopped mid-generation (a 2 s generation in flight), a new runtime on the same database finishes it."""
    slow = Settings(**{**settings.model_dump(), "fake_latency": 2.0})
    db = init_db(slow)
    first = EmbeddedRuntime(db, slow)
    await first.start()
    params = JobParams(prompt="p", duration=1, backend="fake")
    job_id = submit(db, slow, image=SAMPLE.read_bytes(), params=params, kick=first.kick).job_id
    await _until(lambda: _states(db, [job_id]) == ["generating"])
    await first.stop()
    db.dispose()

    db = init_db(slow)
    second = EmbeddedRuntime(db, slow)
    await second.start()
    try:
        await _until(lambda: _states(db, [job_id]) == ["succeeded"])
    finally:
        await second.stop()
