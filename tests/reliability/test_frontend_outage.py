"""Results that finish while the front end is down are delivered when it is back, and shown once.

Jobs run to their end on a Celery worker while no front end is running. Then a front end process
(``frontend.py``) comes back, posts results, and dies right after posting one of them and before
confirming it; a second one takes over. What the system promises, and what is checked:

- The event stream is **at-least-once**: nothing that finished while the front end was away is lost,
  and an event that was handled but not confirmed is handed out again, with the same event id.
- Delivery **once** comes from deduplicating by that id: the front end sends the event id as the
  message nonce, so a channel that keeps one message per nonce (as Discord does with
  ``enforce_nonce``) shows every result exactly once although one was posted twice.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from worker import events

FRONTEND = Path(__file__).with_name("frontend.py")
CRASH_EXIT = 17  # frontend.CRASH_EXIT
GRANT = 100
MEMBER = ("guild-front", "user-front")
SCRIPTS = ["ok", "ok", "refuse", "ok", "ok"]  # four clips and one refusal: every kind of result


def _frontend(deployment, posts: Path, *extra: str) -> list[str]:
    return [sys.executable, str(FRONTEND), deployment.settings.database_url, str(posts), *extra]


def _read(posts: Path) -> list[dict]:
    return [json.loads(line) for line in posts.read_text().splitlines()]


@pytest.mark.postgres
def test_results_finished_while_the_front_end_was_down_are_all_shown_once_when_it_is_back(deploy):
    """Results wait for a front end that is down; one handled but unconfirmed comes again with the same id."""
    deployment = deploy(fake_latency=0.3)
    deployment.fund(MEMBER, GRANT)
    deployment.start_beat()
    deployment.start_worker()
    submitted = [deployment.submit(script, member=MEMBER, duration=1.0).job_id for script in SCRIPTS]
    jobs = deployment.wait_finished(submitted, timeout=90)
    state = {job.id: job.state for job in jobs}
    assert sorted(state.values()) == ["failed", "succeeded", "succeeded", "succeeded", "succeeded"]

    # The front end was down the whole time: every event, every result among them, is still waiting.
    waiting = events.pending(deployment.db, limit=1000)
    assert waiting and all(e.job_id in state for e in waiting)
    results = {e.job_id: e for e in waiting if e.final}
    assert {job_id: e.kind for job_id, e in results.items()} == state

    # Back, it posts results, and dies after posting the second one, before confirming it.
    posts = deployment.root / "posts.jsonl"
    crashed = subprocess.run(_frontend(deployment, posts, "--crash-after", "2"), env=deployment.env,
                             capture_output=True, text=True, timeout=60)
    assert crashed.returncode == CRASH_EXIT, crashed.stderr
    before = _read(posts)
    lost = [p for p in before if p["final"]][-1]  # posted, never confirmed
    assert lost["nonce"] in {e.id for e in events.pending(deployment.db, limit=1000)}

    # A new front end takes over and runs until everything is confirmed.
    with (deployment.root / "frontend.log").open("wb") as log:
        frontend = subprocess.Popen(_frontend(deployment, posts), env=deployment.env, stdout=log,
                                    stderr=subprocess.STDOUT)
    try:
        deployment.wait_until(lambda: not events.pending(deployment.db), timeout=60,
                              what="the front end to confirm every event")
    finally:
        frontend.kill()
        frontend.wait(timeout=10)
    after = _read(posts)[len(before):]

    # At least once: every event was posted, and only the unconfirmed one twice, with the same id.
    posted = Counter(p["nonce"] for p in before + after)
    assert set(posted) == {e.id for e in waiting}
    assert {nonce: n for nonce, n in posted.items() if n > 1} == {lost["nonce"]: 2}
    assert after[0] == lost  # handed out again first, same event id, same job, same result
    # Once, by nonce: the channel keeps one message per nonce, so every job shows its result once.
    channel = {p["nonce"]: p for p in before + after}
    shown = Counter(p["job_id"] for p in channel.values() if p["final"])
    assert shown == dict.fromkeys(submitted, 1)
    assert {p["job_id"]: p["kind"] for p in channel.values() if p["final"]} == state
    # And in order: each job's events arrive oldest first, its result last.
    for job_id in submitted:
        mine = [p["nonce"] for p in channel.values() if p["job_id"] == job_id]
        assert mine == sorted(mine) and mine[-1] == results[job_id].id
    deployment.check_books(MEMBER, GRANT)
