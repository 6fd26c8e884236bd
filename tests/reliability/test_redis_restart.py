"""Redis going away and coming back loses no job, and the workers carry on by themselves.

The private Redis runs without persistence and is killed with SIGKILL while jobs are queued (their
wake-up messages wait in Redis) and running (generations in flight, units of work in hand), so every
message it held is gone, and one more job is submitted while it is down. It comes back empty a few
seconds later on the same port (Celery retries the broker after 2, 4, 6 ... s). Nothing is restarted
but Redis: the same worker and beat processes reconnect, the reaper finds the ready jobs in the
database and wakes them again, and every job succeeds, once, charged once.

One known exception, outside animabot: rarely (once in about seventy restarts here), Celery 5.7
acknowledges a late-acknowledged task on the broker channel that the reconnect has just closed, and
the ``AttributeError`` raised in kombu stops that worker's main process (like celery/celery#9250, on
the cancel-on-connection-loss path). The other worker still finishes every job, but the dead one did
not resume by itself, so the test then ends as an expected failure naming the race instead of
passing; a worker dying of anything else fails it.
"""

from __future__ import annotations

import json
import time

import pytest
from sqlmodel import Session, func, select

from worker.models import Attempt, Job

JOBS = 8
DOWNTIME = 1.0  # beyond the few seconds the late submit takes
GRANT = 1_000
DURATION = 1.0
PRICE = 1  # 1 s clips at 1 credit per second
MEMBER = ("guild-redis", "user-redis")
#: How the Celery race (module docstring) shows in a dead worker's log.
CELERY_ACK_RACE = ("in ack_log_error", "AttributeError: 'NoneType' object has no attribute")


def _counts(deployment) -> tuple[int, int]:
    """Jobs still queued, and generations running at the provider."""
    with Session(deployment.db) as session:
        queued = session.scalar(select(func.count()).select_from(Job).where(Job.state == "queued"))
        running = session.scalar(select(func.count()).select_from(Attempt).where(Attempt.state == "running"))
    return int(queued or 0), int(running or 0)


@pytest.mark.slow
@pytest.mark.postgres
def test_no_job_is_lost_and_workers_resume_by_themselves_when_redis_restarts(deploy, redis_server):
    """Redis killed with jobs queued and running comes back empty: the same workers finish every job once."""
    deployment = deploy(fake_latency=1.5)
    deployment.fund(MEMBER, GRANT)
    beat = deployment.start_beat()
    workers = [deployment.start_worker(), deployment.start_worker()]
    submitted = [deployment.submit("ok", member=MEMBER, duration=DURATION).job_id for _ in range(JOBS)]

    def queued_and_running() -> bool:
        queued, running = _counts(deployment)
        return queued > 0 and running > 0 and redis_server.queued() > 0

    deployment.wait_until(queued_and_running, timeout=60, what="jobs both queued and running", every=0.02)
    redis_server.kill()
    waiting = [job.id for job in deployment.jobs(submitted) if job.state == "queued"]
    # Submitted while the broker is down, by `animabot submit` (the production kick): accepted, because
    # the job is in the database; only its wake-up message is lost, and the reaper makes up for it.
    late = deployment.submit_cli("ok", member=MEMBER, duration=DURATION)
    assert late.returncode == 0, late.stderr
    submitted.append(json.loads(late.stdout)["job_id"])
    waiting.append(submitted[-1])
    time.sleep(DOWNTIME)
    redis_server.start()
    back = time.time()

    jobs = deployment.wait_finished(submitted, timeout=90)
    assert beat.alive, beat.tail()
    survivors = [worker for worker in workers if worker.alive]
    for worker in survivors:
        assert worker.log().count("Connected to redis://") >= 2, f"{worker.name} did not reconnect:\n{worker.tail()}"
    assert {job.id: job.state for job in jobs} == dict.fromkeys(submitted, "succeeded")
    # Jobs that were waiting for a worker could not move without Redis: the same workers did them after.
    assert all(job.finished_at.timestamp() > back for job in jobs if job.id in waiting)
    deployment.check_clips(jobs)
    deployment.check_results_published_once(jobs)
    assert deployment.check_books(MEMBER, GRANT) == dict.fromkeys(submitted, PRICE)
    for worker in workers:
        if not worker.alive:
            assert all(sign in worker.log() for sign in CELERY_ACK_RACE), f"{worker.name} died:\n{worker.tail()}"
            pytest.xfail(f"{worker.name} died of Celery's ack-after-reconnect race (see the module docstring)")
