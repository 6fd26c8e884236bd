"""Fifty submits at once by a member who can afford three: three are accepted, never a fourth.

Fifty threads submit together (a barrier releases them at once) through ``worker.submit.submit`` on
PostgreSQL, each with its own idempotency key, as fifty clicks would arrive from Discord. The member's
cap on unfinished jobs is set far above fifty so that only the credits decide. The reservation is a
conditional update of the balance, so exactly three go through and the other forty-seven are refused
with :class:`~worker.errors.InsufficientCredits`, saying the price and the balance; a refused submit
writes no job and moves no credit.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlmodel import Session, func, select

from worker import ledger
from worker.db import init_db
from worker.errors import InsufficientCredits
from worker.jobs import JobParams
from worker.models import Job, Transfer
from worker.settings import Settings
from worker.submit import Receipt, submit

PICTURE = Path(__file__).resolve().parents[2] / "bot" / "assets" / "astronaut.png"
SUBMITS = 50
AFFORDABLE = 3
PRICE = 5  # fake backend, 5 s at 1 credit per second
MEMBER = ("guild-rush", "user-rush")


@pytest.mark.postgres
def test_fifty_concurrent_submits_by_a_member_who_can_afford_three_accept_exactly_three(postgres_url, tmp_path):
    """50 simultaneous submits, credits for 3: exactly 3 accepted, 47 refused naming the balance and the price."""
    settings = Settings(database_url=postgres_url, data_dir=tmp_path, daily_free_credits=0,
                        max_active_per_user=10 * SUBMITS)
    db = init_db(settings)
    with Session(db) as session:
        account = ledger.member_account(session, *MEMBER)
        assert account.id is not None
        account_id = account.id
        ledger.grant(session, account_id, AFFORDABLE * PRICE, key="rush")
    image = PICTURE.read_bytes()
    params = JobParams(prompt="a slow smile", backend="fake", duration=5.0)
    start = threading.Barrier(SUBMITS)

    def attempt(n: int) -> Receipt | Exception:
        start.wait()
        try:
            return submit(db, settings, image=image, params=params, member=MEMBER, key=f"click-{n}")
        except Exception as exc:  # what each click gets back, refusals included
            return exc

    try:
        with ThreadPoolExecutor(SUBMITS) as pool:
            outcomes = list(pool.map(attempt, range(SUBMITS)))
        accepted = [o for o in outcomes if isinstance(o, Receipt)]
        refused = [o for o in outcomes if not isinstance(o, Receipt)]

        assert len(accepted) == AFFORDABLE
        assert all(r.price_credits == PRICE and not r.duplicate for r in accepted)
        assert len({r.job_id for r in accepted}) == AFFORDABLE
        assert len(refused) == SUBMITS - AFFORDABLE
        assert all(type(exc) is InsufficientCredits for exc in refused), {repr(exc) for exc in refused}
        assert {(exc.price, exc.balance) for exc in refused} == {(PRICE, 0)}
        assert {exc.message.split(";")[0] for exc in refused} == {f"this costs {PRICE} credits but you have 0"}
        with Session(db) as session:
            assert ledger.audit(session) == []
            assert ledger.balance(session, account_id) == ledger.Balance(available=0, held=AFFORDABLE * PRICE)
            jobs = session.exec(select(Job.id).where(Job.account_id == account_id)).all()
            assert sorted(jobs) == sorted(r.job_id for r in accepted)
            reserves = session.scalar(select(func.count()).select_from(Transfer).where(Transfer.kind == "reserve"))
            assert reserves == AFFORDABLE
    finally:
        db.dispose()



@pytest.mark.postgres
def test_concurrent_submits_of_one_new_picture_are_all_accepted(postgres_url, tmp_path):
    """Twenty members sending the same new picture at once: every submit stores it and is accepted."""
    db = init_db(Settings(database_url=postgres_url, data_dir=tmp_path))
    params = JobParams(prompt="a slow smile", backend="fake", duration=1.0)
    image = PICTURE.read_bytes()

    def attempt(settings: Settings, member: tuple[str, str], start: threading.Barrier) -> Receipt | Exception:
        start.wait()
        try:
            return submit(db, settings, image=image, params=params, member=member)
        except Exception as exc:
            return exc

    try:
        for round_ in range(5):  # each round with an empty media folder, so the picture is new to it
            settings = Settings(database_url=postgres_url, data_dir=tmp_path / f"round{round_}", daily_free_credits=5)
            start = threading.Barrier(20)
            members = [(f"guild-{round_}", f"user-{n}") for n in range(20)]
            with ThreadPoolExecutor(20) as pool:
                outcomes = list(pool.map(lambda m, s=settings, b=start: attempt(s, m, b), members))
            assert [o for o in outcomes if not isinstance(o, Receipt)] == []
            stored = list((tmp_path / f"round{round_}" / "media" / "uploads").iterdir())
            assert len(stored) == 1 and stored[0].read_bytes() == image  # whole, and no stray temporary files
    finally:
        db.dispose()
