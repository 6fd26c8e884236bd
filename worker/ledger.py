"""The credit ledger: append-only, double-entry transfers with two-phase charges for jobs.

Credits only ever move in :class:`~worker.models.Transfer` rows, which are never updated or deleted
(database triggers refuse it); a member's balance is what its transfers add up to. Each account caches
that sum in ``available`` and ``held``, and every function here changes the cache with a conditional
``UPDATE ... SET available = available + :delta WHERE ... available + :delta >= 0`` in the same
transaction as the transfer, never by reading a balance and writing it back (which loses updates when
two requests race, and is how bots end up printing credits).

A job pays in two phases, keyed by its id, so retries and redeliveries are harmless::

    reserve(session, account.id, 12, job_id=job.id)   # on submit: 12 move from available to held
    capture(session, job.id)                           # delivered: the held 12 go to revenue
    void(session, job.id)                              # failed, rejected or canceled: they come back

What each kind of transfer does to the cached balances (``a`` is its amount, ``r`` the amount of the
reservation a capture or void resolves)::

    kind      debit account                  credit account
    grant     available -a                   available +a     (from the issuer, which may go negative)
    reserve   available -a, held +a          -                (to revenue, once captured)
    capture   available +(r-a), held -r      available +a     (a <= r: a partial capture refunds r-a)
    void      available +r, held -r          -

Rules, each backed by a constraint so that no code path can break it:

- A transfer's id is its idempotency key (``grant:<key>``, ``daily:<account>:<day>``,
  ``reserve:job:<id>``, ``capture:job:<id>``, ``void:job:<id>``). Posting the same id twice posts it
  once: the second call returns the first transfer, or raises :class:`IdempotencyConflict` if it asks
  for something different.
- A reservation is resolved at most once: ``pending_id`` is unique, so after a capture a void is
  refused with :class:`AlreadyResolved`, and the other way round.
- A member's ``available`` never goes below zero; :func:`reserve` raises
  :class:`~worker.errors.InsufficientCredits` instead.

**Transactions.** Every function that writes (:func:`member_account`, :func:`grant`,
:func:`daily_grant`, :func:`reserve`, :func:`capture`, :func:`void`) commits the session when it returns,
together with whatever the caller added to the session before: add the job row, flush it for its id,
then reserve, and the two commit at once. When it raises, none of its work is kept (it ran in a
SAVEPOINT), nothing is committed, and the caller's transaction is still usable, with the caller's own
pending work, for the caller to roll back or carry on. Readers (:func:`balance`, :func:`history`,
:func:`audit`) never commit.

**Concurrency.** Keys are claimed with ``INSERT ... ON CONFLICT DO NOTHING``: on PostgreSQL a second
transaction with the same key waits for the first, then sees its row and replays it. Balances change
only through the conditional UPDATE, which PostgreSQL re-checks against the newest row after waiting
for its lock, so concurrent reservations can never overdraw; accounts are updated in id order, so two
transfers never deadlock on each other's rows. On SQLite, :mod:`worker.db` takes the database's write
lock (``BEGIN IMMEDIATE``) at the SAVEPOINT that opens every writing function, so writers take turns.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from functools import wraps
from typing import Any, ParamSpec, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, aliased
from sqlalchemy.orm.util import identity_key

from worker.errors import InsufficientCredits
from worker.models import FINAL_STATES, Account, AccountKind, Job, Transfer, TransferKind, utcnow

__all__ = [
    "AlreadyResolved",
    "Balance",
    "Entry",
    "IdempotencyConflict",
    "LedgerError",
    "UnknownAccount",
    "audit",
    "balance",
    "capture",
    "daily_grant",
    "grant",
    "history",
    "member_account",
    "reserve",
    "system_account",
    "void",
]

_ACCOUNTS: sa.Table = Account.__table__  # type: ignore[attr-defined]
_TRANSFERS: sa.Table = Transfer.__table__  # type: ignore[attr-defined]
_KEY_LENGTH = 100
_OWNER_LENGTH = 32

GRANT = TransferKind.GRANT.value
RESERVE = TransferKind.RESERVE.value
CAPTURE = TransferKind.CAPTURE.value
VOID = TransferKind.VOID.value
MEMBER = AccountKind.MEMBER.value


class LedgerError(Exception):
    """A ledger operation was refused for a reason other than the member's balance."""


class UnknownAccount(LedgerError, LookupError):
    """No account has this id."""


class IdempotencyConflict(LedgerError):
    """An idempotency key was reused for a different transfer (other account or amount)."""


class AlreadyResolved(LedgerError):
    """A reservation was already resolved the other way (capture after void, or void after capture)."""


@dataclass(frozen=True)
class Balance:
    """An account's spendable credits and those held by reservations of unfinished jobs."""

    available: int
    held: int


@dataclass(frozen=True)
class Entry:
    """One line of an account's history: a transfer and what it changed for that account."""

    transfer: Transfer
    available: int
    held: int


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _commits(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``fn(session, ...)`` in a SAVEPOINT and commit the session when it returns.

    The returned row is loaded again after the commit, so it stays readable once the session closes.
    """

    @wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        session = args[0]
        assert isinstance(session, Session)
        with session.begin_nested():
            result = fn(*args, **kwargs)
        session.commit()
        if isinstance(result, Account | Transfer) and session.expire_on_commit:
            session.refresh(result)
        return result

    return wrapper


# Accounts.


@_commits
def member_account(session: Session, guild_id: str, user_id: str) -> Account:
    """The account of a Discord user in a guild, created (with no credits) on first use.

    Ids are Discord snowflakes; ints are accepted and stored as strings. Safe when two requests create
    the same account at once: both get the one row. Commits.
    """
    guild_id, user_id = str(guild_id), str(user_id)
    for value in (guild_id, user_id):
        if not value or len(value) > _OWNER_LENGTH:
            raise ValueError(f"guild and user ids must be 1 to {_OWNER_LENGTH} characters, not {value!r}")
    return _get_or_create(session, MEMBER, guild_id, user_id)


@_commits
def system_account(session: Session, kind: AccountKind | str) -> Account:
    """The ``issuer`` (where grants come from) or ``revenue`` (where charges go) account. Commits."""
    return _system_account(session, kind)


def _system_account(session: Session, kind: AccountKind | str) -> Account:
    kind = AccountKind(kind)
    if kind is AccountKind.MEMBER:
        raise ValueError("members have one account per guild: use member_account()")
    return _get_or_create(session, kind.value, "", "")


def _get_or_create(session: Session, kind: str, guild_id: str, user_id: str) -> Account:
    query = sa.select(Account).where(Account.kind == kind, Account.guild_id == guild_id, Account.user_id == user_id)
    account = session.scalars(query).one_or_none()
    if account is None:
        # A concurrent creator makes this a no-op (after it commits), and then the query finds its row.
        row = dict(kind=kind, guild_id=guild_id, user_id=user_id, available=0, held=0, created_at=utcnow())
        session.execute(_insert(session, _ACCOUNTS, row))
        account = session.scalars(query).one()
    return account


# Grants.


@_commits
def grant(session: Session, account_id: int, amount: int, *, key: str, memo: str = "") -> Transfer:
    """Give ``amount`` credits from the issuer, once per ``key`` (an admin command's interaction id).

    Replaying a key returns the first transfer and grants nothing more. Commits.
    """
    if not key or len(key) > _KEY_LENGTH - len("grant:"):
        raise ValueError(f"a grant key is 1 to {_KEY_LENGTH - len('grant:')} characters, not {key!r}")
    transfer, _ = _grant(session, f"grant:{key}", account_id, amount, memo, same_amount=True)
    return transfer


@_commits
def daily_grant(session: Session, account_id: int, amount: int, *, day: date | None = None) -> Transfer | None:
    """Give the daily free credits, at most once per account and UTC day (today by default).

    Returns the new transfer, or None when that day's grant was already given, whatever its amount
    (the daily amount may have changed since), or when ``amount`` is 0. Commits.
    """
    if amount == 0:
        return None
    day = day or datetime.now(UTC).date()
    key = f"daily:{account_id}:{day.isoformat()}"
    transfer, created = _grant(session, key, account_id, amount, "", same_amount=False)
    return transfer if created else None


def _grant(
    session: Session, key: str, account_id: int, amount: int, memo: str, *, same_amount: bool
) -> tuple[Transfer, bool]:
    _require_positive(amount)
    _account(session, account_id)
    issuer = _system_account(session, AccountKind.ISSUER)
    if account_id == issuer.id:
        raise ValueError("the issuer cannot grant credits to itself")
    transfer = dict(id=key, kind=GRANT, debit_account_id=issuer.id, credit_account_id=account_id)
    if not _post(session, transfer | dict(amount=amount, memo=memo)):
        expected = dict(credit_account_id=account_id) | (dict(amount=amount) if same_amount else {})
        return _replayed(session, key, **expected), False
    if not _move(session, _effects(GRANT, issuer.id, account_id, amount)):
        raise LedgerError(f"account {account_id} cannot receive {amount} credits; run ledger.audit()")
    return _transfer(session, key), True


# Charges.


@_commits
def reserve(session: Session, account_id: int, amount: int, *, job_id: int, memo: str = "") -> Transfer | None:
    """Hold ``amount`` credits of a member for a job, on submit; returns the ``reserve`` transfer.

    Raises :class:`~worker.errors.InsufficientCredits` (with the balance and the price) when the
    member's available credits are fewer. A job reserves once: calling again returns the same
    transfer and charges nothing more, even after the job was captured or voided. A price of 0 is a
    free job: no transfer, returns None, and :func:`capture` and :func:`void` are then no-ops.
    ``job_id`` must name a job row (a foreign key). Commits (with the job row, if the caller added it
    to this session).
    """
    if amount == 0:
        return None
    _require_positive(amount)
    key = _job_key(RESERVE, job_id)
    if _account(session, account_id).kind != MEMBER:
        raise ValueError(f"account {account_id} is a system account; only members pay for jobs")
    revenue = _system_account(session, AccountKind.REVENUE)
    transfer = dict(id=key, kind=RESERVE, debit_account_id=account_id, credit_account_id=revenue.id)
    if not _post(session, transfer | dict(amount=amount, job_id=job_id, memo=memo)):
        return _replayed(session, key, debit_account_id=account_id, amount=amount)
    if not _move(session, _effects(RESERVE, account_id, revenue.id, amount)):
        raise InsufficientCredits(balance=balance(session, account_id).available, price=amount)
    return _transfer(session, key)


@_commits
def capture(session: Session, job_id: int, *, amount: int | None = None) -> Transfer | None:
    """Charge a job's reservation, on success; returns the ``capture`` transfer.

    ``amount`` (default: all of it) may be less than was reserved, e.g. when fewer seconds were
    delivered; the rest goes back to the member. Replaying returns the same transfer. Raises
    :class:`AlreadyResolved` if the reservation was voided. A no-op returning None when the job
    reserved nothing (a free job). Commits (with the job's final state, if the caller set it).
    """
    return _resolve(session, job_id, CAPTURE, amount)


@_commits
def void(session: Session, job_id: int) -> Transfer | None:
    """Release a job's reservation back to the member, on failure, rejection or cancel.

    Replaying returns the same transfer. Raises :class:`AlreadyResolved` if the reservation was
    captured. A no-op returning None when the job reserved nothing (a free job). Commits.
    """
    return _resolve(session, job_id, VOID, None)


def _resolve(session: Session, job_id: int, kind: str, amount: int | None) -> Transfer | None:
    pending = session.get(Transfer, _job_key(RESERVE, job_id))
    if pending is None:
        return None
    if amount is None or kind == VOID:
        amount = pending.amount
    if not 0 < amount <= pending.amount:
        raise ValueError(
            f"job {job_id} reserved {pending.amount} credits; capture 1 to {pending.amount}, "
            f"not {amount} (void it to charge nothing)"
        )
    key = _job_key(kind, job_id)
    debit, credit = pending.debit_account_id, pending.credit_account_id
    transfer = dict(id=key, kind=kind, debit_account_id=debit, credit_account_id=credit)
    # The unique pending_id makes a capture and a void of one reservation collide like replays do.
    if not _post(session, transfer | dict(amount=amount, pending_id=pending.id, job_id=job_id)):
        return _resolution(session, pending, kind, amount)
    if not _move(session, _effects(kind, debit, credit, amount, pending.amount)):
        raise LedgerError(f"job {job_id}: its held credits are missing; run ledger.audit()")
    return _transfer(session, key)


def _resolution(session: Session, pending: Transfer, kind: str, amount: int) -> Transfer:
    """The transfer that already resolved ``pending``, if it is the one asked for again."""
    done = session.scalars(sa.select(Transfer).where(Transfer.pending_id == pending.id)).one()
    if done.kind != kind:
        past = "captured" if done.kind == CAPTURE else "voided"
        raise AlreadyResolved(f"cannot {kind} job {pending.job_id}: its reservation was already {past}")
    if done.amount != amount:
        raise IdempotencyConflict(f"job {pending.job_id} was already captured for {done.amount} credits, not {amount}")
    return done


# Reading.


def balance(session: Session, account_id: int) -> Balance:
    """The account's available and held credits, as committed plus this transaction's changes."""
    row = session.execute(
        sa.select(_ACCOUNTS.c.available, _ACCOUNTS.c.held).where(_ACCOUNTS.c.id == account_id)
    ).one_or_none()
    if row is None:
        raise UnknownAccount(f"no account {account_id}")
    return Balance(available=row.available, held=row.held)


def history(session: Session, account_id: int, limit: int = 20) -> list[Entry]:
    """The account's latest transfers, newest first, each with its change to this account."""
    pending = aliased(Transfer)
    rows = session.execute(
        sa.select(Transfer, pending.amount)
        .outerjoin(pending, pending.id == Transfer.pending_id)
        .where(sa.or_(Transfer.debit_account_id == account_id, Transfer.credit_account_id == account_id))
        .order_by(Transfer.created_at.desc(), Transfer.id.desc())
        .limit(limit)
    ).all()
    entries = []
    for transfer, reserved in rows:
        effects = _effects(
            transfer.kind, transfer.debit_account_id, transfer.credit_account_id, transfer.amount, reserved
        )
        available = sum(d for a, d, _ in effects if a == account_id)
        held = sum(h for a, _, h in effects if a == account_id)
        entries.append(Entry(transfer=transfer, available=available, held=held))
    return entries


def audit(session: Session) -> list[str]:
    """Check the ledger's invariants; returns one line per violation (empty when all hold).

    1. Credits are conserved: every transfer debits what it credits, so all balances sum to zero.
    2. Each account's cached ``available`` and ``held`` equal the sum of its transfers.
    3. No member's ``available`` (and no account's ``held``) is below zero.
    4. Each reservation is resolved at most once, by a capture of at most the reserved amount or a void
       of all of it, between the same accounts and for the same job.
    5. No finished job still holds credits.

    Reads everything; for a consistent result while others write to PostgreSQL, run it in a
    REPEATABLE READ transaction.
    """
    problems: list[str] = []
    derived: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    t, p = _TRANSFERS.alias("t"), _TRANSFERS.alias("p")
    rows = session.execute(
        sa.select(
            t.c.id, t.c.kind, t.c.debit_account_id, t.c.credit_account_id, t.c.amount, t.c.job_id,
            t.c.pending_id, p.c.kind.label("p_kind"), p.c.amount.label("p_amount"),
            p.c.debit_account_id.label("p_debit"), p.c.credit_account_id.label("p_credit"),
            p.c.job_id.label("p_job_id"),
        ).outerjoin(p, p.c.id == t.c.pending_id)
    )  # fmt: skip
    for row in rows:
        if row.pending_id is not None:
            problems.extend(_check_resolution(row))
        try:
            effects = _effects(row.kind, row.debit_account_id, row.credit_account_id, row.amount, row.p_amount)
        except LedgerError as exc:
            problems.append(f"transfer {row.id}: {exc}")
            continue
        for account_id, available, held in effects:
            derived[account_id][0] += available
            derived[account_id][1] += held

    twice = session.execute(
        sa.select(_TRANSFERS.c.pending_id, sa.func.count())
        .where(_TRANSFERS.c.pending_id.is_not(None))
        .group_by(_TRANSFERS.c.pending_id)
        .having(sa.func.count() > 1)
    )
    problems.extend(f"reservation {pid} resolved {n} times" for pid, n in twice)

    if sum(a + h for a, h in derived.values()) != 0:
        problems.append("transfers do not sum to zero: credits were created or destroyed")
    cached_total = 0
    c = _ACCOUNTS.c
    for account in session.execute(sa.select(c.id, c.kind, c.available, c.held)):
        cached_total += account.available + account.held
        available, held = derived.pop(account.id, (0, 0))
        if (account.available, account.held) != (available, held):
            problems.append(
                f"account {account.id}: cached available={account.available} held={account.held}, "
                f"but its transfers add up to available={available} held={held}"
            )
        if account.kind == MEMBER and account.available < 0:
            problems.append(f"member account {account.id} has {account.available} available")
        if account.held < 0:
            problems.append(f"account {account.id} holds {account.held}")
    if cached_total != 0:
        problems.append(f"cached balances sum to {cached_total}, not 0")
    problems.extend(f"transfers name account {account_id}, which does not exist" for account_id in derived)

    resolved = sa.select(_TRANSFERS.c.pending_id).where(_TRANSFERS.c.pending_id.is_not(None))
    stuck = session.execute(
        sa.select(_TRANSFERS.c.id, Job.state)
        .join(Job, Job.id == _TRANSFERS.c.job_id)
        .where(_TRANSFERS.c.kind == RESERVE, _TRANSFERS.c.id.not_in(resolved))
        .where(Job.state.in_([s.value for s in FINAL_STATES]))
    )
    problems.extend(f"{tid} is still held but its job has {state}" for tid, state in stuck)
    return problems


def _check_resolution(row: Any) -> Iterable[str]:
    if row.p_kind != RESERVE:
        yield f"{row.id} resolves {row.pending_id}, which is a {row.p_kind}, not a reserve"
        return
    if (row.debit_account_id, row.credit_account_id, row.job_id) != (row.p_debit, row.p_credit, row.p_job_id):
        yield f"{row.id} moves between other accounts or for another job than {row.pending_id}"
    if row.kind == CAPTURE and row.amount > row.p_amount:
        yield f"{row.id} captures {row.amount}, more than the {row.p_amount} reserved"
    if row.kind == VOID and row.amount != row.p_amount:
        yield f"{row.id} voids {row.amount}, not the {row.p_amount} reserved"


# Internals.


def _effects(
    kind: str, debit: int, credit: int, amount: int, reserved: int | None = None
) -> list[tuple[int, int, int]]:
    """``(account_id, available change, held change)`` for one transfer: the table in the docstring."""
    if kind == GRANT:
        return [(debit, -amount, 0), (credit, amount, 0)]
    if kind == RESERVE:
        return [(debit, -amount, amount)]
    if reserved is None and kind in (CAPTURE, VOID):
        raise LedgerError(f"a {kind} must name the reservation it resolves")
    if kind == CAPTURE:
        return [(debit, reserved - amount, -reserved), (credit, amount, 0)]
    if kind == VOID:
        return [(debit, reserved, -reserved)]
    raise LedgerError(f"unknown transfer kind {kind!r}")


def _move(session: Session, effects: list[tuple[int, int, int]]) -> bool:
    """Apply balance changes with conditional UPDATEs; False if one would overdraw.

    The WHERE clause repeats the accounts' CHECK constraints, so a refused change is a rowcount of 0
    rather than an error. On False the caller raises, which rolls back the changes already applied
    (every caller runs in :func:`_commits`' SAVEPOINT). Accounts are updated in id order so concurrent
    transfers lock rows in the same order and cannot deadlock.
    """
    changes: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for account_id, available, held in effects:
        changes[account_id][0] += available
        changes[account_id][1] += held
    c = _ACCOUNTS.c
    for account_id, (available, held) in sorted(changes.items()):
        result = session.execute(
            sa.update(_ACCOUNTS)
            .where(c.id == account_id)
            .where(sa.or_(c.kind != MEMBER, c.available + available >= 0), c.held + held >= 0)
            .values(available=c.available + available, held=c.held + held)
        )
        if result.rowcount != 1:
            return False
    for account_id in changes:
        cached = session.identity_map.get(identity_key(Account, account_id))
        if cached is not None:
            session.expire(cached, ["available", "held"])
    return True


def _post(session: Session, transfer: Mapping[str, Any]) -> bool:
    """Insert a transfer unless its id (or the reservation it resolves) is taken; True if inserted."""
    row = dict(transfer)
    row.setdefault("memo", "")
    row.setdefault("created_at", utcnow())
    if len(row["memo"]) > 200:
        raise ValueError("a memo is at most 200 characters")
    return session.execute(_insert(session, _TRANSFERS, row)).first() is not None


def _insert(session: Session, table: sa.Table, row: Mapping[str, Any]) -> Any:
    """``INSERT ... ON CONFLICT DO NOTHING RETURNING id``: a row back means it was inserted.

    Without a conflict target it yields to any unique constraint. (The driver's rowcount cannot tell:
    psycopg reports -1 for these inserts.)
    """
    dialect = session.get_bind().dialect.name
    dialects = {"postgresql": postgresql, "sqlite": sqlite}
    if dialect not in dialects:
        raise LedgerError(f"the ledger supports SQLite and PostgreSQL, not {dialect}")
    return dialects[dialect].insert(table).values(**row).on_conflict_do_nothing().returning(table.c.id)


def _replayed(session: Session, key: str, **expected: Any) -> Transfer:
    """The transfer already posted under ``key``, if it is the one asked for again."""
    existing = _transfer(session, key)
    differs = {name: value for name, value in expected.items() if getattr(existing, name) != value}
    if differs:
        was = {name: getattr(existing, name) for name in differs}
        raise IdempotencyConflict(f"{key} was already posted with {was}; this call asked for {differs}")
    return existing


def _transfer(session: Session, key: str) -> Transfer:
    transfer = session.get(Transfer, key)
    if transfer is None:  # pragma: no cover - the caller has just seen or written it
        raise LedgerError(f"transfer {key} vanished")
    return transfer


def _account(session: Session, account_id: int) -> Account:
    account = session.get(Account, account_id)
    if account is None:
        raise UnknownAccount(f"no account {account_id}")
    return account


def _job_key(kind: str, job_id: int) -> str:
    return f"{kind}:job:{job_id}"


def _require_positive(amount: int) -> None:
    if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
        raise ValueError(f"an amount of credits is a positive whole number, not {amount!r}")
