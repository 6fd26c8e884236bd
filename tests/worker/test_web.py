"""The web endpoint: webhooks resume a job only with a valid token; the health check reports jobs."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from sqlmodel import Session, select

from worker import web
from worker.db import init_db
from worker.jobs import JobParams
from worker.models import Attempt
from worker.runner import Worker
from worker.settings import Settings
from worker.submit import submit

SAMPLE = Path(__file__).resolve().parents[2] / "bot" / "assets" / "astronaut.png"
SECRET = b"test-secret"


@pytest.fixture
async def setup(tmp_path):
    # A generation that takes a moment: one done as soon as submitted is collected in the same unit.
    settings = Settings(data_dir=tmp_path, output_long_side=256, fake_latency=0.2)
    db = init_db(settings)
    kicks: list[int] = []
    worker = Worker(db, settings, kick=kicks.append)
    client = TestClient(TestServer(web.make_app(worker, SECRET)))
    await client.start_server()
    yield settings, db, worker, client, kicks
    await client.close()


async def _running_attempt(settings, db, worker, *, with_id=False):
    submit(db, settings, image=SAMPLE.read_bytes(), params=JobParams(prompt="p", duration=1, backend="fake"))
    await worker.work_once()
    await asyncio.sleep(0.2)  # the generation is done, and nobody has asked yet
    with Session(db) as s:
        attempt = s.exec(select(Attempt)).one()
    return (attempt.id, attempt.provider_id) if with_id else attempt.id


async def test_a_webhook_with_the_right_token_checks_the_attempt_now(setup):
    """The provider's call is a hint: the job system asks the provider and wakes the job."""
    settings, db, worker, client, kicks = setup
    attempt_id, provider_id = await _running_attempt(settings, db, worker, with_id=True)
    response = await client.post(web.webhook_path(SECRET, "fake", attempt_id), json={"id": provider_id})
    assert response.status == 200 and (await response.json())["ended"] is True
    assert kicks == [1]
    again = await client.post(web.webhook_path(SECRET, "fake", attempt_id), json={"id": provider_id})
    assert (await again.json())["outcome"] == "already handled"  # a replay changes nothing


async def test_a_signed_provider_webhook_finds_its_attempt_by_the_providers_id(setup):
    """/webhooks/{backend} without our token: the backend verifies it, the provider id finds the attempt."""
    settings, db, worker, client, kicks = setup
    _, provider_id = await _running_attempt(settings, db, worker, with_id=True)
    unknown = await client.post("/webhooks/fake", json={"id": "nobody-knows-this"})
    assert unknown.status == 404 and kicks == []
    malformed = await client.post("/webhooks/fake", data=b"not json")
    assert malformed.status == 400
    response = await client.post("/webhooks/fake", json={"id": provider_id})
    assert response.status == 200 and (await response.json())["ended"] is True


async def test_a_webhook_for_a_backend_without_webhooks_is_refused(setup):
    """local is never called back; a call claiming to be it is refused."""
    client = setup[3]
    response = await client.post("/webhooks/local", json={"id": "x"})
    assert response.status == 404


async def test_a_webhook_with_a_forged_token_is_refused_and_changes_nothing(setup):
    """403 for a token that was not made with our secret."""
    settings, db, worker, client, kicks = setup
    attempt_id = await _running_attempt(settings, db, worker)
    forged = web.webhook_path(b"someone-else", "fake", attempt_id)
    response = await client.post(forged, json={"id": "x"})
    assert response.status == 403 and kicks == []
    with Session(db) as s:
        assert s.get(Attempt, attempt_id).state == "running"


async def test_an_oversized_webhook_body_is_refused(setup):
    """Bodies over 1 MiB get 413 before anything is done."""
    settings, db, worker, client, _ = setup
    attempt_id = await _running_attempt(settings, db, worker)
    response = await client.post(web.webhook_path(SECRET, "fake", attempt_id), data=b"x" * (web.MAX_BODY + 1))
    assert response.status == 413


async def test_health_reports_the_unfinished_jobs_by_state(setup):
    """A load balancer or an owner can see the system answers and what it holds."""
    settings, db, worker, client, _ = setup
    await _running_attempt(settings, db, worker)
    body = await (await client.get("/health")).json()
    assert body["ok"] is True and body["jobs"] == {"generating": 1}
