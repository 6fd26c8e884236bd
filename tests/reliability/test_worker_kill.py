"""A worker killed with ``kill -9`` in the middle of a job costs nothing but time.

Two Celery workers and beat run against PostgreSQL and a private Redis. Ten times in a row, a worker
is killed (SIGKILL to its whole process group, pool children included) at a moment when it holds a
job mid-generation (fetching the provider's output, judging it, or making the delivered clip from
it), and a new worker is started in its place. The dead worker's lease runs out, the reaper wakes
the job, and another worker carries on from what the database says. Jobs under way are claimed
first, so the same job is often hit several times in a row. At the end every job has succeeded with
exactly one clip, one result event and one capture of its price, and the books balance.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import pytest
from sqlmodel import Session, select

from worker.models import Job, utcnow

KILLS = 10
BACKLOG = 4
DURATION = 1.0
PRICE = 1  # the fake backend charges 1 credit per second of clip
GRANT = 10_000
MEMBER = ("guild-kill", "user-kill")
#: States in which a worker holding the job is in the middle of generating its clip: fetching the
#: provider's output, judging it, making the delivered clip from it. The kills take turns among them.
MID_GENERATION = ("generating", "checking", "post-processing")


def _held(deployment, belongs: Callable[[int], bool], states=MID_GENERATION) -> list[tuple[int, str]]:
    """Jobs in ``states`` under a live lease of a process for which ``belongs(pid)`` is true."""
    with Session(deployment.db) as session:
        rows = session.exec(select(Job.id, Job.state, Job.lease_owner).where(
            Job.lease_owner.is_not(None), Job.lease_expires_at > utcnow(),  # type: ignore[union-attr,operator]
            Job.state.in_(states),  # type: ignore[attr-defined]
        )).all()
    held = []
    for job_id, state, owner in rows:
        pid = int(owner.rsplit(":", 2)[1])  # scheduler.worker_id(): host:pid:random
        if belongs(pid):
            held.append((job_id, state))
    return held


@pytest.mark.slow
@pytest.mark.postgres
def test_every_job_finishes_once_when_workers_are_killed_mid_generation_ten_times(deploy):
    """Ten kill -9s of a worker holding a job mid-generation: every job succeeds with one clip, charged once."""
    deployment = deploy(fake_latency=0.5)
    deployment.fund(MEMBER, GRANT)
    deployment.start_beat()
    workers = [deployment.start_worker(), deployment.start_worker(wait=False)]
    rng = random.Random(20240611)
    submitted: list[int] = []
    died_holding: dict[int, list[str]] = {}  # job id → the states it was in when its worker died
    kills = 0
    for cycle in range(3 * KILLS):
        if kills == KILLS:
            break
        target = MID_GENERATION[cycle % len(MID_GENERATION)]

        def holding(state: str = target):
            for _ in range(BACKLOG - len(deployment.unfinished())):  # keep the workers busy
                submitted.append(deployment.submit("ok", member=MEMBER, duration=DURATION).job_id)
            return next((w for w in workers if _held(deployment, w.owns, (state,))), None)

        victim = deployment.wait_until(holding, timeout=60, what=f"a worker to hold a job in state {target}",
                                       every=0.02)
        workers.remove(victim)
        time.sleep(rng.uniform(0.0, 0.05))  # land somewhere inside that step
        group = victim.group()
        victim.kill()
        workers.append(deployment.start_worker(wait=False))
        # The dead processes wrote nothing more: what they still lease is what they died holding.
        lost = _held(deployment, group.__contains__)
        kills += bool(lost)
        for job_id, state in lost:
            died_holding.setdefault(job_id, []).append(state)
    assert kills == KILLS, f"only {kills} of the kills caught a job in hand"

    jobs = deployment.wait_finished(submitted, timeout=120)
    assert {job.id: job.state for job in jobs} == dict.fromkeys(submitted, "succeeded")
    recovered = {job.id: job.recoveries for job in jobs if job.id in died_holding}
    assert all(recovered.values()), f"jobs not taken back from their dead worker: {recovered}"
    deployment.check_clips(jobs)
    deployment.check_results_published_once(jobs)
    assert deployment.check_books(MEMBER, GRANT) == dict.fromkeys(submitted, PRICE)
