"""The event stream is the outbox: nothing is dropped, a job's events stay in order, replays are visible."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlmodel import Session

from worker import events
from worker.jobs import JobParams, create_job
from worker.models import Job

SAMPLE = Path(__file__).resolve().parents[2] / "bot" / "assets" / "astronaut.png"


def _publish(engine, job_id, kind, **payload):
    with Session(engine) as s:
        events.publish(s, s.get(Job, job_id), kind, payload)
        s.commit()


@pytest.fixture
def two_jobs(engine):
    ids = [create_job(engine, JobParams(prompt="p"), source_path=SAMPLE, key=f"k{i}").id for i in range(2)]
    for job_id in ids:
        _publish(engine, job_id, "queued", position=1)
        _publish(engine, job_id, "succeeded", clip={"path": "x"})
    return ids


def test_events_carry_the_job_and_where_to_answer(engine, two_jobs):
    """Every payload names the job, its idempotency key and channel; results are marked final."""
    first = events.pending(engine, job_id=two_jobs[0])
    assert [e.kind for e in first] == ["queued", "succeeded"]
    assert first[0].payload | {"position": 1} == first[0].payload
    assert {"job_id", "key", "guild_id", "channel_id", "state"} <= set(first[1].payload)
    assert first[1].final and not first[0].final


def test_acknowledged_events_are_not_offered_again_and_acks_are_idempotent(engine, two_jobs):
    """ack() counts only newly confirmed events."""
    ids = [e.id for e in events.pending(engine)]
    assert events.ack(engine, ids[:2]) == 2
    assert events.ack(engine, ids[:2]) == 0
    assert [e.id for e in events.pending(engine)] == ids[2:]


async def test_a_front_end_that_was_down_gets_everything_in_order(engine, two_jobs):
    """consume() delivers the backlog oldest first and confirms each."""
    got, stop = [], asyncio.Event()

    async def front_end(event):
        got.append((event.job_id, event.kind))
        if len(got) == 4:
            stop.set()

    await asyncio.wait_for(events.consume(engine, front_end, stop=stop, every=0.01), 5)
    assert got == [(two_jobs[0], "queued"), (two_jobs[0], "succeeded"), (two_jobs[1], "queued"),
                   (two_jobs[1], "succeeded")]
    assert events.pending(engine) == []


async def test_an_event_the_front_end_fails_to_deliver_is_retried_and_holds_back_its_job(engine, two_jobs):
    """A failed delivery stays pending; that job's later events wait, other jobs' events go on."""
    got, attempts, stop = [], [], asyncio.Event()

    async def flaky(event):
        attempts.append(event.id)
        if event.job_id == two_jobs[0] and event.kind == "queued" and attempts.count(event.id) == 1:
            raise ConnectionError("discord is down")
        got.append((event.job_id, event.kind))
        if len(got) == 4:
            stop.set()

    await asyncio.wait_for(events.consume(engine, flaky, stop=stop, every=0.01), 5)
    assert got[:2] == [(two_jobs[1], "queued"), (two_jobs[1], "succeeded")]
    assert got[2:] == [(two_jobs[0], "queued"), (two_jobs[0], "succeeded")]
