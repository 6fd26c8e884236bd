"""Fair claims under leases: one holder per job, dead holders' jobs come back, nobody's batch starves others."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlmodel import Session, select

from worker import scheduler
from worker.jobs import JobParams, create_job
from worker.models import Job, utcnow
from worker.settings import Settings

SAMPLE = Path(__file__).resolve().parents[2] / "bot" / "assets" / "astronaut.png"


def _job(engine, account_id=None, **fields):
    job = create_job(engine, JobParams(prompt="p", backend="fake"), source_path=SAMPLE)
    with Session(engine) as s:
        row = s.get(Job, job.id)
        row.account_id = account_id
        for name, value in fields.items():
            setattr(row, name, value)
        s.add(row)
        s.commit()
    return job.id


def _accounts(engine, n):
    from worker import ledger

    with Session(engine) as s:
        return [ledger.member_account(s, "g", f"user{i}").id for i in range(n)]


def test_round_robin_puts_every_members_first_job_before_anyones_second():
    """A batch of five from A does not hold back B's and C's single jobs."""
    rows = [(1, 10), (2, 10), (3, 10), (4, 10), (5, 10), (6, 20), (7, 30), (8, 20)]
    assert scheduler.fair_order(rows) == [1, 6, 7, 2, 8, 3, 4, 5]


def test_operator_jobs_without_an_account_each_count_as_their_own_member():
    """Free CLI jobs are not lumped together behind one another."""
    assert scheduler.fair_order([(1, None), (2, None), (3, 7), (4, 7)]) == [1, 2, 3, 4]


def test_claims_follow_the_fair_order_and_jobs_under_way_go_first(engine):
    """Started work is finished first; then queued jobs round-robin across members."""
    a, b, c = _accounts(engine, 3)
    first_a, second_a, only_b = _job(engine, a), _job(engine, a), _job(engine, b)
    under_way = _job(engine, c, state="generating")
    claimed = [scheduler.claim(engine, "w", 30) for _ in range(4)]
    assert claimed == [under_way, first_a, only_b, second_a]
    assert scheduler.claim(engine, "w", 30) is None


def test_a_leased_job_is_not_claimed_twice_until_its_lease_runs_out(engine):
    """The lease keeps others off; when its holder stops renewing, the job comes back as a recovery."""
    job_id = _job(engine)
    assert scheduler.claim(engine, "alive", 0.5) == job_id
    assert scheduler.claim(engine, "other", 30) is None
    time.sleep(0.6)
    assert scheduler.claim(engine, "other", 30) == job_id
    with Session(engine) as s:
        job = s.get(Job, job_id)
    assert (job.lease_owner, job.claims, job.recoveries) == ("other", 2, 1)


def test_a_member_with_jobs_running_goes_after_members_with_none(engine):
    """Round-robin counts what each member already has under way, not only what waits."""
    a, b = _accounts(engine, 2)
    _job(engine, a, state="generating", next_run_at=None)  # both waiting on a provider
    _job(engine, a, state="generating", next_run_at=None)
    waiting_a, waiting_b = _job(engine, a), _job(engine, b)
    assert scheduler.claim(engine, "w", 30) == waiting_b
    assert scheduler.claim(engine, "w", 30) == waiting_a


def test_renewing_keeps_the_lease_and_a_lost_lease_cannot_be_renewed(engine):
    """Only the holder renews; after losing the job it learns so."""
    job_id = _job(engine)
    scheduler.claim(engine, "w1", 30)
    assert scheduler.renew(engine, job_id, "w1", 30)
    assert not scheduler.renew(engine, job_id, "w2", 30)


def test_release_schedules_the_next_look_and_a_waiting_job_is_not_ready(engine):
    """A job waiting on a provider (next_run_at NULL) is left alone; a retry time is honoured."""
    job_id = _job(engine)
    scheduler.claim(engine, "w", 30)
    assert scheduler.release(engine, job_id, "w", None) is False
    assert scheduler.ready_count(engine) == 0
    _job(engine, next_run_at=utcnow() + timedelta(hours=1))
    assert scheduler.ready_count(engine) == 0 and scheduler.claim(engine, "w", 30) is None


def test_a_cancel_request_made_during_a_unit_makes_the_job_ready_on_release(engine):
    """The holder sees the flag when it gives the job back, so the cancel is not lost."""
    job_id = _job(engine)
    scheduler.claim(engine, "w", 30)
    with Session(engine) as s:
        job = s.get(Job, job_id)
        job.cancel_requested = True
        s.add(job)
        s.commit()
    assert scheduler.release(engine, job_id, "w", None) is True
    assert scheduler.claim(engine, "w", 30) == job_id


@pytest.mark.parametrize("members", [1, 3])
def test_queue_position_counts_the_jobs_that_start_first(engine, tmp_path, members):
    """Position 1 is next; with several members a newcomer does not wait behind a batch."""
    settings = Settings(data_dir=tmp_path, worker_concurrency=2)
    accounts = _accounts(engine, members)
    batch = [_job(engine, accounts[0]) for _ in range(4)]
    assert [scheduler.position(engine, settings, j)[0] for j in batch] == [1, 2, 3, 4]
    if members > 1:
        newcomer = _job(engine, accounts[1])
        assert scheduler.position(engine, settings, newcomer)[0] == 2
    position, eta = scheduler.position(engine, settings, batch[3])
    assert eta == pytest.approx(scheduler.DEFAULT_RUN_SECONDS * (1 + (position - 1) / 2))


def test_overdue_finds_old_unfinished_jobs_nobody_holds(engine, tmp_path):
    """The reaper's list: past the deadline and not in a live worker's hands."""
    settings = Settings(data_dir=tmp_path, job_deadline=60)
    old = _job(engine, created_at=utcnow() - timedelta(minutes=5), state="generating")
    _job(engine, created_at=utcnow() - timedelta(minutes=5), state="succeeded")
    _job(engine)
    held = _job(engine, created_at=utcnow() - timedelta(minutes=5), lease_owner="w",
                lease_expires_at=utcnow() + timedelta(minutes=1))
    assert scheduler.overdue(engine, settings) == [old]
    assert held not in scheduler.overdue(engine, settings)


def test_queue_position_matches_the_fair_order_of_the_whole_queue(engine, tmp_path):
    """The database's count of jobs ahead agrees with fair_order over every queued job, whatever the mix."""
    import random

    rng = random.Random(7)
    settings = Settings(data_dir=tmp_path)
    accounts = _accounts(engine, 4)
    for _ in range(40):  # queued, started, leased and finished jobs of four members and the operator
        owner = rng.choice([*accounts, None])
        kind = rng.choice(["queued", "queued", "queued", "started", "leased", "finished"])
        fields = {"started": {"state": "generating"}, "finished": {"state": "succeeded"},
                  "leased": {"lease_owner": "w", "lease_expires_at": utcnow() + timedelta(minutes=1)}}
        _job(engine, owner, **fields.get(kind, {}))
    with Session(engine) as s:
        jobs = s.exec(select(Job).order_by(Job.id)).all()
    waiting = [(j.id, j.account_id) for j in jobs if j.state == "queued" and j.lease_owner is None]
    started: dict[int, int] = {}
    for j in jobs:
        if j.account_id is not None and j.state != "succeeded" and (j.state != "queued" or j.lease_owner):
            started[j.account_id] = started.get(j.account_id, 0) + 1
    expected = scheduler.fair_order(waiting, started)
    assert [scheduler.position(engine, settings, job_id)[0] for job_id in expected] == list(
        range(1, len(expected) + 1))


def test_candidates_are_jobs_under_way_then_the_fair_order_of_the_ready_queue(engine):
    """The one query claims use agrees with fair_order on a mix of members, leases and states."""
    import random

    rng = random.Random(11)
    accounts = _accounts(engine, 3)
    for _ in range(30):
        owner = rng.choice([*accounts, None])
        kind = rng.choice(["queued", "queued", "queued", "under way", "waiting", "leased"])
        fields = {"under way": {"state": "checking"}, "waiting": {"state": "generating", "next_run_at": None},
                  "leased": {"lease_owner": "w", "lease_expires_at": utcnow() + timedelta(minutes=1)}}
        _job(engine, owner, **fields.get(kind, {}))
    with Session(engine) as s:
        jobs = s.exec(select(Job).order_by(Job.id)).all()
    free = [j for j in jobs if j.lease_owner is None and j.next_run_at is not None]
    under_way = [j.id for j in sorted(free, key=lambda j: (j.next_run_at, j.id)) if j.state != "queued"]
    started: dict[int, int] = {}
    for j in jobs:
        if j.account_id is not None and (j.state != "queued" or j.lease_owner):
            started[j.account_id] = started.get(j.account_id, 0) + 1
    fair = scheduler.fair_order([(j.id, j.account_id) for j in free if j.state == "queued"], started)
    assert scheduler.candidates(engine, limit=100) == under_way + fair
