"""A backend that errs, hangs, times out or returns garbage never leaves a job stuck or a member charged.

Each job scripts the fake backend through its model (``"fail,hang,ok"``: attempt *n* gets the *n*-th
outcome, the last one repeats) and runs on real Celery workers with beat. Transient trouble (an
outage, a generation that hangs past ``generation_timeout``, an undecodable or frozen clip) is
retried with a new seed after a growing backoff; a backend that cannot do the job hands it to the
next one on its route (a guild's override ending in ``local``); what cannot succeed fails with its
credits given back. At the end every job is final, nothing is held, and the books balance.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
from sqlmodel import Session

from worker.models import GuildSettings

BACKOFF = 0.5
TIMEOUT = 1.5
GRANT = 100
MEMBER = ("guild-flaky", "user-flaky")
ROUTED = ("guild-routed", "user-routed")


@dataclass(frozen=True)
class Case:
    """One scripted backend behaviour and how its job must end."""

    script: str | None
    state: str
    attempts: list[tuple[str, str | None]]  # (verdict, error code or gate reason) per attempt
    error: str | None = None


CASES = [
    Case("fail,ok", "succeeded", [("error", "unavailable"), ("accepted", None)]),
    Case("fail,fail,ok", "succeeded", [("error", "unavailable")] * 2 + [("accepted", None)]),
    Case("hang,ok", "succeeded", [("error", "timeout"), ("accepted", None)]),
    Case("garbage,ok", "succeeded", [("rejected", "undecodable"), ("accepted", None)]),
    Case("frozen,ok", "succeeded", [("rejected", "frozen"), ("accepted", None)]),
    Case("fail", "failed", [("error", "unavailable")] * 3, "generation_failed"),
    Case("hang", "failed", [("error", "timeout")] * 3, "generation_failed"),
    Case("garbage", "failed", [("rejected", "undecodable")] * 3, "generation_failed"),
    Case("refuse", "failed", [("error", "content_refused")], "content_refused"),
    Case("invalid", "failed", [("error", "invalid_request")], "generation_failed"),
]


def _summary(attempt) -> tuple[str, str | None]:
    return attempt.verdict, attempt.error_code or (attempt.reasons[0] if attempt.reasons else None)


@pytest.mark.postgres
def test_misbehaving_backends_retry_with_backoff_fall_back_or_fail_with_a_refund(deploy):
    """Errors, hangs, timeouts and garbage: retried with backoff, routed onwards, or failed and refunded."""
    deployment = deploy(fake_latency=0.3, generation_timeout=TIMEOUT, retry_backoff=BACKOFF)
    deployment.fund(MEMBER, GRANT)
    deployment.fund(ROUTED, 0)
    with Session(deployment.db) as session:  # the astronaut is a portrait: try fake first, then local
        overrides = {"portrait": [{"backend": "fake", "model": "invalid"}, {"backend": "local"}]}
        session.add(GuildSettings(guild_id=ROUTED[0], routing_overrides=overrides))
        session.commit()
    deployment.start_beat()
    deployment.start_worker()
    deployment.start_worker()
    jobs = {deployment.submit(case.script, member=MEMBER, duration=1.0).job_id: case for case in CASES}
    routed = deployment.submit(None, backend=None, member=ROUTED, duration=1.0).job_id

    finished = {job.id: job for job in deployment.wait_finished([*jobs, routed], timeout=120)}
    for job_id, case in jobs.items():
        job, attempts = finished[job_id], deployment.attempts(job_id)
        assert (job.state, job.error_code) == (case.state, case.error), f"{case.script}: {job.error_message}"
        assert [_summary(a) for a in attempts] == case.attempts, case.script
        assert all(a.state == "finished" for a in attempts)
        assert len({a.seed for a in attempts}) == len(attempts)  # every retry tries a new seed
        for n, (done, retry) in enumerate(itertools.pairwise(attempts)):
            waited = (retry.started_at - done.finished_at).total_seconds()
            if done.verdict == "error":  # an error waits out a doubling backoff; a rejected clip does not
                assert waited >= BACKOFF * 2**n * 0.95, f"{case.script}: attempt {retry.number} after {waited:.2f} s"
        if case.attempts[0][1] == "timeout":
            first = attempts[0]
            assert (first.finished_at - first.started_at).total_seconds() >= TIMEOUT
    job, attempts = finished[routed], deployment.attempts(routed)
    assert (job.state, job.backend) == ("succeeded", "local")
    assert [(a.backend, *_summary(a)) for a in attempts] == [
        ("fake", "error", "invalid_request"), ("local", "accepted", None)]

    # Nothing stuck: no job waits for a worker again, and each lease is given back just after the job ends.
    deployment.wait_until(lambda: all(job.next_run_at is None and job.lease_owner is None
                                      for job in deployment.jobs(finished)), timeout=10, what="every lease released")
    deployment.check_clips(finished.values())
    deployment.check_results_published_once(finished.values())
    charged = deployment.check_books(MEMBER, GRANT)
    assert charged == {job_id: 1 for job_id, case in jobs.items() if case.state == "succeeded"}
    assert deployment.check_books(ROUTED, 0) == {}  # the route was quoted at its dearest first choice: local, free
