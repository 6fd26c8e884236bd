"""The credit ledger, as a member and the job system see it, on SQLite and on PostgreSQL."""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import date

import pytest
import sqlalchemy as sa
from sqlmodel import Session, select

from worker import ledger
from worker.db import make_engine
from worker.errors import InsufficientCredits
from worker.ledger import AlreadyResolved, Balance, IdempotencyConflict, UnknownAccount
from worker.models import Account, AccountKind, Job, JobState, Transfer


@pytest.fixture
def session(engine):
    with Session(engine) as session:
        yield session


def new_job(session: Session) -> int:
    job = Job()
    session.add(job)
    session.commit()
    return job.id


def member(session: Session, credits: int = 0, user: str = "u1", guild: str = "g1") -> int:
    """A member account holding ``credits``."""
    account = ledger.member_account(session, guild, user)
    if credits:
        ledger.grant(session, account.id, credits, key=f"seed-{guild}-{user}")
    return account.id


def revenue(session: Session) -> Balance:
    return ledger.balance(session, ledger.system_account(session, AccountKind.REVENUE).id)


def transfers(session: Session) -> list[str]:
    return sorted(session.scalars(select(Transfer.id)).all())


@pytest.fixture(autouse=True)
def audit_after(engine):
    """Whatever a test does, the ledger's invariants hold at the end."""
    yield
    with Session(engine) as session:
        assert ledger.audit(session) == []


# Accounts.


def test_new_member_has_no_credits(session):
    """A member's account is created on first use, empty, and found again afterwards."""
    account = ledger.member_account(session, "g1", "u1")
    assert ledger.balance(session, account.id) == Balance(available=0, held=0)
    assert ledger.member_account(session, "g1", "u1").id == account.id


def test_accounts_are_per_guild_and_accept_int_snowflakes(session):
    """The same user in two guilds has two accounts; snowflakes may be given as ints."""
    a = ledger.member_account(session, "1", "42")
    b = ledger.member_account(session, "2", "42")
    assert a.id != b.id
    assert ledger.member_account(session, 1, 42).id == a.id  # type: ignore[arg-type]


def test_unknown_account_is_refused(session):
    """Reading or paying from an account that does not exist names it."""
    with pytest.raises(UnknownAccount, match="404"):
        ledger.balance(session, 404)
    with pytest.raises(UnknownAccount, match="404"):
        ledger.reserve(session, 404, 5, job_id=new_job(session))


# Grants.


def test_grant_adds_credits_once_per_key(session):
    """An admin grant replayed with its key (a retried command) grants once."""
    account = member(session)
    first = ledger.grant(session, account, 50, key="interaction-1", memo="welcome")
    again = ledger.grant(session, account, 50, key="interaction-1", memo="welcome")
    assert again.id == first.id
    assert ledger.balance(session, account) == Balance(50, 0)
    issuer = ledger.system_account(session, AccountKind.ISSUER)
    assert ledger.balance(session, issuer.id) == Balance(-50, 0)


def test_grant_key_reused_for_another_amount_is_refused(session):
    """A key names one grant: reusing it for a different one is a bug, not a second grant."""
    account = member(session)
    ledger.grant(session, account, 50, key="k")
    with pytest.raises(IdempotencyConflict, match="grant:k"):
        ledger.grant(session, account, 60, key="k")
    assert ledger.balance(session, account) == Balance(50, 0)


@pytest.mark.parametrize("amount", [0, -5, 2.5, True])
def test_grant_amount_must_be_a_positive_whole_number(session, amount):
    """Grants move a positive whole number of credits."""
    with pytest.raises(ValueError, match="positive whole number"):
        ledger.grant(session, member(session), amount, key="k")


def test_daily_grant_once_per_day(session):
    """The daily credits come once per UTC day, however often the member asks."""
    account = member(session)
    # Given a grant on the 1st
    assert ledger.daily_grant(session, account, 20, day=date(2025, 1, 1)) is not None
    # When the member asks again that day, even after the daily amount changed
    assert ledger.daily_grant(session, account, 20, day=date(2025, 1, 1)) is None
    assert ledger.daily_grant(session, account, 30, day=date(2025, 1, 1)) is None
    # Then nothing more comes until the 2nd
    assert ledger.daily_grant(session, account, 20, day=date(2025, 1, 2)) is not None
    assert ledger.balance(session, account) == Balance(40, 0)


def test_daily_grant_defaults_to_today_and_is_per_account(session):
    """Each member gets today's grant once; two members each get theirs."""
    a, b = member(session, user="a"), member(session, user="b")
    assert ledger.daily_grant(session, a, 20) is not None
    assert ledger.daily_grant(session, a, 20) is None
    assert ledger.daily_grant(session, b, 20) is not None
    assert ledger.balance(session, a) == ledger.balance(session, b) == Balance(20, 0)


def test_daily_grant_of_zero_does_nothing(session):
    """A guild that turned daily credits off posts no transfer."""
    assert ledger.daily_grant(session, member(session), 0) is None
    assert [t for t in transfers(session) if t.startswith("daily")] == []


# Reserve, capture, void.


def test_reserve_holds_the_price(session):
    """On submit, the price moves from available to held."""
    account, job = member(session, 50), new_job(session)
    reservation = ledger.reserve(session, account, 12, job_id=job)
    assert (reservation.kind, reservation.amount, reservation.job_id) == ("reserve", 12, job)
    assert ledger.balance(session, account) == Balance(38, 12)


def test_capture_charges_the_reservation(session):
    """On success, the held credits go to revenue."""
    account, job = member(session, 50), new_job(session)
    ledger.reserve(session, account, 12, job_id=job)
    captured = ledger.capture(session, job)
    assert (captured.kind, captured.amount, captured.pending_id) == ("capture", 12, f"reserve:job:{job}")
    assert ledger.balance(session, account) == Balance(38, 0)
    assert revenue(session) == Balance(12, 0)


def test_partial_capture_refunds_the_rest(session):
    """A job that delivered less than it reserved charges less; the rest comes back."""
    account, job = member(session, 50), new_job(session)
    ledger.reserve(session, account, 12, job_id=job)
    ledger.capture(session, job, amount=5)
    assert ledger.balance(session, account) == Balance(45, 0)
    assert revenue(session) == Balance(5, 0)


@pytest.mark.parametrize("amount", [0, 13])
def test_capture_outside_the_reservation_is_refused(session, amount):
    """A capture charges between 1 credit and what was reserved."""
    account, job = member(session, 50), new_job(session)
    ledger.reserve(session, account, 12, job_id=job)
    with pytest.raises(ValueError, match="capture 1 to 12"):
        ledger.capture(session, job, amount=amount)
    assert ledger.balance(session, account) == Balance(38, 12)


def test_void_returns_the_reservation(session):
    """On failure, rejection or cancel, the held credits come back."""
    account, job = member(session, 50), new_job(session)
    ledger.reserve(session, account, 12, job_id=job)
    voided = ledger.void(session, job)
    assert (voided.kind, voided.amount) == ("void", 12)
    assert ledger.balance(session, account) == Balance(50, 0)
    assert revenue(session) == Balance(0, 0)


def test_refusal_names_balance_and_price(session):
    """A member who cannot pay is told the price and their balance, and nothing changes."""
    account, job = member(session, 20), new_job(session)
    with pytest.raises(InsufficientCredits) as refused:
        ledger.reserve(session, account, 30, job_id=job)
    assert (refused.value.balance, refused.value.price) == (20, 30)
    assert "costs 30 credits but you have 20" in refused.value.message
    assert ledger.balance(session, account) == Balance(20, 0)
    assert f"reserve:job:{job}" not in transfers(session)
    # The session is still usable, and a cheaper job goes through.
    assert ledger.reserve(session, account, 20, job_id=job) is not None
    assert ledger.balance(session, account) == Balance(0, 20)


def test_refusal_counts_only_available_credits(session):
    """Credits held by a running job cannot pay for another."""
    account = member(session, 20)
    ledger.reserve(session, account, 15, job_id=new_job(session))
    with pytest.raises(InsufficientCredits) as refused:
        ledger.reserve(session, account, 10, job_id=new_job(session))
    assert (refused.value.balance, refused.value.price) == (5, 10)


def test_reserve_is_idempotent_by_job(session):
    """A redelivered submit reserves once, even after the job finished."""
    account, job = member(session, 50), new_job(session)
    first = ledger.reserve(session, account, 12, job_id=job)
    assert ledger.reserve(session, account, 12, job_id=job).id == first.id
    ledger.capture(session, job)
    assert ledger.reserve(session, account, 12, job_id=job).id == first.id
    assert ledger.balance(session, account) == Balance(38, 0)


@pytest.mark.parametrize(("amount", "user"), [(13, "u1"), (12, "u2")])
def test_reserve_replayed_differently_is_refused(session, amount, user):
    """A job reserves one price from one member; another price or payer for it is a bug."""
    account, job = member(session, 50), new_job(session)
    other = member(session, 50, user="u2")
    ledger.reserve(session, account, 12, job_id=job)
    with pytest.raises(IdempotencyConflict, match=f"reserve:job:{job}"):
        ledger.reserve(session, account if user == "u1" else other, amount, job_id=job)
    assert ledger.balance(session, account) == Balance(38, 12)
    assert ledger.balance(session, other) == Balance(50, 0)


def test_free_job_posts_nothing(session):
    """A price of 0 reserves nothing, and capture and void are then no-ops."""
    account, job = member(session, 5), new_job(session)
    before = transfers(session)
    assert ledger.reserve(session, account, 0, job_id=job) is None
    assert ledger.capture(session, job) is None
    assert ledger.void(session, job) is None
    assert transfers(session) == before
    assert ledger.balance(session, account) == Balance(5, 0)


@pytest.mark.parametrize("resolve", [ledger.capture, ledger.void])
def test_resolving_twice_is_a_no_op(session, resolve):
    """A redelivered success or failure resolves the reservation once."""
    account, job = member(session, 50), new_job(session)
    ledger.reserve(session, account, 12, job_id=job)
    first = resolve(session, job)
    after_first = ledger.balance(session, account)
    assert resolve(session, job).id == first.id
    assert ledger.balance(session, account) == after_first


@pytest.mark.parametrize(
    ("first", "then", "message"),
    [
        (ledger.capture, ledger.void, "cannot void job .*: its reservation was already captured"),
        (ledger.void, ledger.capture, "cannot capture job .*: its reservation was already voided"),
    ],
)
def test_reservation_resolves_one_way_only(session, first, then, message):
    """Once captured it cannot be voided, and once voided it cannot be captured."""
    account, job = member(session, 50), new_job(session)
    ledger.reserve(session, account, 12, job_id=job)
    first(session, job)
    before = (ledger.balance(session, account), revenue(session))
    with pytest.raises(AlreadyResolved, match=message):
        then(session, job)
    assert (ledger.balance(session, account), revenue(session)) == before


def test_capture_replayed_for_another_amount_is_refused(session):
    """A job is charged one amount; a second capture cannot change it."""
    account, job = member(session, 50), new_job(session)
    ledger.reserve(session, account, 12, job_id=job)
    ledger.capture(session, job, amount=5)
    with pytest.raises(IdempotencyConflict, match="captured for 5 credits, not 12"):
        ledger.capture(session, job)


def test_capture_or_void_without_reservation_is_a_no_op(session):
    """A job that never reserved (free, or refused before paying) has nothing to resolve."""
    job = new_job(session)
    assert ledger.capture(session, job) is None
    assert ledger.void(session, job) is None


# Transactions.


def test_reserve_commits_with_the_callers_job(engine, session):
    """Creating a job and reserving its price commit together."""
    account = member(session, 50)
    job = Job(price_credits=12)
    session.add(job)
    session.flush()
    ledger.reserve(session, account, 12, job_id=job.id)
    with Session(engine) as other:
        assert other.get(Job, job.id) is not None
        assert ledger.balance(other, account) == Balance(38, 12)


def test_refused_reserve_commits_nothing(engine, session):
    """When the member cannot pay, neither the reservation nor the caller's job is committed."""
    account = member(session, 5)
    job = Job(price_credits=12)
    session.add(job)
    session.flush()
    job_id = job.id
    with pytest.raises(InsufficientCredits):
        ledger.reserve(session, account, 12, job_id=job_id)
    session.rollback()
    with Session(engine) as other:
        assert other.get(Job, job_id) is None
        assert ledger.balance(other, account) == Balance(5, 0)


def test_cached_account_objects_are_refreshed(engine):
    """An Account loaded before a transfer shows the new balance, even when commits do not expire."""
    with Session(engine, expire_on_commit=False) as session:
        account = ledger.member_account(session, "g1", "u1")
        ledger.grant(session, account.id, 10, key="k")
        assert (account.available, account.held) == (10, 0)


# Reading.


def test_history_lists_changes_newest_first(session):
    """The /credits history shows each transfer with what it changed for this member."""
    account, job = member(session, 50), new_job(session)
    ledger.reserve(session, account, 12, job_id=job)
    ledger.capture(session, job, amount=10)
    entries = ledger.history(session, account, limit=10)
    assert [(e.transfer.kind, e.available, e.held) for e in entries] == [
        ("capture", 2, -12),
        ("reserve", -12, 12),
        ("grant", 50, 0),
    ]
    assert len(ledger.history(session, account, limit=2)) == 2


def test_audit_notices_a_tampered_balance(engine, session):
    """An account whose cache disagrees with its transfers is reported, and so is the lost total."""
    account = member(session, 50)
    session.execute(sa.update(Account).where(Account.id == account).values(available=Account.available + 5))
    session.commit()
    problems = ledger.audit(session)
    assert any(f"account {account}: cached available=55" in p for p in problems)
    assert any("cached balances sum to 5" in p for p in problems)
    session.execute(sa.update(Account).where(Account.id == account).values(available=Account.available - 5))
    session.commit()


def test_audit_notices_a_finished_job_still_holding_credits(session):
    """A job that ended without capture or void is reported."""
    account, job = member(session, 50), new_job(session)
    ledger.reserve(session, account, 12, job_id=job)
    session.get(Job, job).state = JobState.FAILED.value
    session.commit()
    assert ledger.audit(session) == [f"reserve:job:{job} is still held but its job has failed"]
    ledger.void(session, job)


# Concurrency.


def run_at_once(count: int, fn) -> list:
    """Call ``fn(i)`` from ``count`` threads released together; their results, or the exceptions raised."""
    start = threading.Barrier(count)

    def call(i):
        start.wait(timeout=30)
        try:
            return fn(i)
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(call, range(count)))


@pytest.fixture
def wide_engine(engine, db_url):
    """A second engine on the same database with a connection per thread."""
    wide = make_engine(db_url, pool_size=50, max_overflow=0)
    yield wide
    wide.dispose()


def test_concurrent_reserves_never_overdraw(wide_engine, session):
    """50 simultaneous submits from a member who can afford exactly 3: exactly 3 go through."""
    account = member(session, 30)
    jobs = [new_job(session) for _ in range(50)]

    def submit(i):
        with Session(wide_engine) as s:
            return ledger.reserve(s, account, 10, job_id=jobs[i]).id

    results = run_at_once(50, submit)
    outcomes = Counter(type(r).__name__ for r in results)
    assert outcomes == {"str": 3, "InsufficientCredits": 47}, results
    assert ledger.balance(session, account) == Balance(0, 30)


def test_concurrent_replays_of_one_submit_charge_once(wide_engine, session):
    """A submit delivered 20 times at once reserves once; every delivery sees the same transfer."""
    account, job = member(session, 30), new_job(session)

    def submit(_):
        with Session(wide_engine) as s:
            return ledger.reserve(s, account, 10, job_id=job).id

    assert set(run_at_once(20, submit)) == {f"reserve:job:{job}"}
    assert ledger.balance(session, account) == Balance(20, 10)


def test_concurrent_capture_and_void_resolve_once(wide_engine, session):
    """Racing success and failure reports: one wins, replays of it are no-ops, the other is refused."""
    account, job = member(session, 30), new_job(session)
    ledger.reserve(session, account, 10, job_id=job)

    def resolve(i):
        with Session(wide_engine) as s:
            return (ledger.capture if i % 2 else ledger.void)(s, job).kind

    results = run_at_once(20, resolve)
    winners = {r for r in results if isinstance(r, str)}
    assert len(winners) == 1, results
    assert all(isinstance(r, str | AlreadyResolved) for r in results), results
    assert sum(isinstance(r, AlreadyResolved) for r in results) == 10
    expected = Balance(20, 0) if winners == {"capture"} else Balance(30, 0)
    assert ledger.balance(session, account) == expected


def test_concurrent_first_use_creates_one_account(wide_engine, session):
    """Twenty commands from a new member at once share one account."""

    def first_use(_):
        with Session(wide_engine) as s:
            return ledger.member_account(s, "g9", "new").id

    ids = run_at_once(20, first_use)
    assert len(set(ids)) == 1 and isinstance(ids[0], int), ids


def test_concurrent_grants_to_many_members(wide_engine, session):
    """Grants to different members all go through the one issuer account without losing any."""
    accounts = [member(session, user=f"m{i}") for i in range(20)]

    def give(i):
        with Session(wide_engine) as s:
            return ledger.grant(s, accounts[i], 7, key=f"bulk-{i}").amount

    assert run_at_once(20, give) == [7] * 20
    issuer = ledger.system_account(session, AccountKind.ISSUER)
    assert ledger.balance(session, issuer.id) == Balance(-140, 0)
