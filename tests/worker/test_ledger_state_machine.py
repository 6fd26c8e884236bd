"""Random sequences of ledger operations, some of them concurrent, keep every invariant.

A Hypothesis state machine drives grants, daily grants, reservations (with job ids reused on purpose),
captures, voids and their replays against a real database, and checks after every step that the ledger
agrees with a plain in-memory model of what the balances should be and that :func:`ledger.audit` finds
nothing wrong. One rule fires several reservations from threads at once, where read-modify-write bugs
would show. Each example gets a fresh database; it runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date
from typing import Any

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)
from sqlmodel import Session, select

from worker import ledger
from worker.errors import InsufficientCredits
from worker.ledger import AlreadyResolved, Balance, IdempotencyConflict
from worker.models import Account, Job

MEMBERS = 3
JOBS = 8
DAYS = [date(2025, 3, d) for d in (1, 2, 3)]
GRANT_KEYS = ["a", "b", "c"]

members = st.integers(0, MEMBERS - 1)
jobs = st.integers(0, JOBS - 1)


@dataclass
class Reservation:
    member: int
    amount: int
    state: str = "held"  # held, captured or voided
    captured: int = 0


class LedgerMachine(RuleBasedStateMachine):
    """The ledger next to a model: member balances, reservations, grants given."""

    reserved = Bundle("reserved")  # job indexes with a reservation, so resolutions often hit one

    def __init__(self, databases: Any) -> None:
        super().__init__()
        self.databases = databases
        self.engine = databases.new(pool_size=8, max_overflow=0)
        with Session(self.engine) as session:
            self.accounts = [ledger.member_account(session, f"g{i % 2}", f"u{i}").id for i in range(MEMBERS)]
            job_rows = [Job() for _ in range(JOBS)]
            session.add_all(job_rows)
            session.commit()
            self.jobs = [job.id for job in job_rows]
        self.available = [0] * MEMBERS
        self.held = [0] * MEMBERS
        self.revenue = 0
        self.granted = 0
        self.grants: dict[str, tuple[int, int]] = {}
        self.dailies: set[tuple[int, date]] = set()
        self.reservations: dict[int, Reservation] = {}

    def teardown(self) -> None:
        self.databases.drop(self.engine)

    def call(self, operation: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one ledger operation in its own session: its result, or the exception it raised."""
        with Session(self.engine) as session:
            try:
                result = operation(session, *args, **kwargs)
            except (ledger.LedgerError, InsufficientCredits, ValueError) as exc:
                result = exc
        if threading.current_thread() is threading.main_thread():  # Hypothesis notes are per thread
            event(f"{operation.__name__} -> {type(result).__name__}")
        return result

    @initialize(credits=st.lists(st.integers(0, 150), min_size=MEMBERS, max_size=MEMBERS))
    def starting_credits(self, credits):
        for member, amount in enumerate(credits):
            if amount:
                self.call(ledger.grant, self.accounts[member], amount, key=f"start-{member}")
                self.available[member] += amount
                self.granted += amount

    # Grants.

    @rule(member=members, amount=st.integers(1, 150), key=st.sampled_from(GRANT_KEYS))
    def grant(self, member, amount, key):
        result = self.call(ledger.grant, self.accounts[member], amount, key=key)
        if key not in self.grants:
            assert result.amount == amount
            self.grants[key] = (member, amount)
            self.available[member] += amount
            self.granted += amount
        elif self.grants[key] == (member, amount):
            assert result.id == f"grant:{key}"
        else:
            assert isinstance(result, IdempotencyConflict), result

    @rule(member=members, day=st.sampled_from(DAYS), amount=st.integers(0, 30))
    def daily_grant(self, member, day, amount):
        result = self.call(ledger.daily_grant, self.accounts[member], amount, day=day)
        if amount == 0 or (member, day) in self.dailies:
            assert result is None
        else:
            assert result.amount == amount
            self.dailies.add((member, day))
            self.available[member] += amount
            self.granted += amount

    # Reserve, capture, void.

    @rule(target=reserved, member=members, job=jobs, amount=st.integers(0, 60))
    def reserve(self, member, job, amount):
        result = self.call(ledger.reserve, self.accounts[member], amount, job_id=self.jobs[job])
        known = self.reservations.get(job)
        if amount == 0:
            assert result is None
        elif known is not None:
            if (known.member, known.amount) == (member, amount):
                assert result.id == f"reserve:job:{self.jobs[job]}"
            else:
                assert isinstance(result, IdempotencyConflict), result
        elif amount <= self.available[member]:
            assert result.amount == amount
            self._reserved(member, job, amount)
        else:
            assert isinstance(result, InsufficientCredits), result
            assert (result.balance, result.price) == (self.available[member], amount)
        return job if job in self.reservations else multiple()

    @rule(job=reserved)
    def replay_reserve(self, job):
        """A redelivered submit: same member, same price; it returns the reservation and changes nothing."""
        known = self.reservations[job]
        result = self.call(ledger.reserve, self.accounts[known.member], known.amount, job_id=self.jobs[job])
        assert result.id == f"reserve:job:{self.jobs[job]}"

    @rule(job=reserved)
    def replay_resolution(self, job):
        """A redelivered success or failure report: it returns the first resolution and changes nothing."""
        known = self.reservations[job]
        if known.state == "captured":
            result = self.call(ledger.capture, self.jobs[job], amount=known.captured)
        else:
            result = self.call(ledger.void, self.jobs[job])
        if known.state == "held":  # nothing to replay yet: this was the first report, a failure
            assert (result.kind, result.amount) == ("void", known.amount)
            self._resolved(job, result)
        else:
            assert result.kind == {"captured": "capture", "voided": "void"}[known.state]

    @rule(job=reserved, amount=st.none() | st.integers(1, 60))
    def capture(self, job, amount):
        result = self.call(ledger.capture, self.jobs[job], amount=amount)
        known = self.reservations.get(job)
        if known is None:
            assert result is None
            return
        charge = known.amount if amount is None else amount
        if charge > known.amount:
            assert isinstance(result, ValueError), result
        elif known.state == "voided":
            assert isinstance(result, AlreadyResolved), result
        elif known.state == "captured":
            if charge == known.captured:
                assert result.id == f"capture:job:{self.jobs[job]}"
            else:
                assert isinstance(result, IdempotencyConflict), result
        else:
            assert result.amount == charge
            self._resolved(job, result)

    @rule(job=reserved | jobs)
    def void(self, job):
        result = self.call(ledger.void, self.jobs[job])
        known = self.reservations.get(job)
        if known is None:
            assert result is None
        elif known.state == "captured":
            assert isinstance(result, AlreadyResolved), result
        elif known.state == "voided":
            assert result.id == f"void:job:{self.jobs[job]}"
        else:
            assert result.amount == known.amount
            self._resolved(job, result)

    @rule(
        member=members,
        batch=st.lists(st.tuples(jobs, st.integers(1, 60), st.integers(1, 3)), min_size=2, max_size=5),
    )
    def concurrent_reserves(self, member, batch):
        """Several submits from one member at once, some delivered more than once."""
        requests = {}
        for job, amount, copies in batch:
            requests.setdefault(job, (amount, copies))
        calls = [(job, amount) for job, (amount, copies) in requests.items() for _ in range(copies)]
        start = threading.Barrier(len(calls))

        def submit(job_amount):
            job, amount = job_amount
            start.wait(timeout=30)
            return self.call(ledger.reserve, self.accounts[member], amount, job_id=self.jobs[job])

        with ThreadPoolExecutor(max_workers=len(calls)) as pool:
            results = list(pool.map(submit, calls))

        outcomes: dict[int, list[Any]] = {}
        for (job, _), result in zip(calls, results, strict=True):
            outcomes.setdefault(job, []).append(result)
        available_before = self.available[member]
        refused = []
        for job, (amount, _) in requests.items():
            known = self.reservations.get(job)
            if known is not None:  # replays of an earlier reservation: as if one at a time
                same = (known.member, known.amount) == (member, amount)
                for result in outcomes[job]:
                    if same:
                        assert result.id == f"reserve:job:{self.jobs[job]}", result
                    else:
                        assert isinstance(result, IdempotencyConflict), result
                continue
            # Available credits only shrink during the batch: once refused, every copy is refused.
            kinds = {type(result).__name__ for result in outcomes[job]}
            assert kinds in ({"Transfer"}, {"InsufficientCredits"}), outcomes[job]
            if kinds == {"Transfer"}:
                self._reserved(member, job, amount)
            else:
                refused.append(amount)
        assert self.available[member] >= 0, "reserved more than the member had"
        event("concurrent_reserves -> " + ("some refused" if refused else "all reserved"))
        # No spurious refusal: each refused price was more than what was left at the end.
        assert all(amount > self.available[member] for amount in refused), (refused, available_before)

    def _reserved(self, member: int, job: int, amount: int) -> None:
        self.reservations[job] = Reservation(member, amount)
        self.available[member] -= amount
        self.held[member] += amount

    def _resolved(self, job: int, transfer: Any) -> None:
        known = self.reservations[job]
        charge = transfer.amount if transfer.kind == "capture" else 0
        known.state, known.captured = ("captured" if charge else "voided"), charge
        self.held[known.member] -= known.amount
        self.available[known.member] += known.amount - charge
        self.revenue += charge

    # Invariants (one session for all of them: they run after every step).

    @invariant()
    def ledger_matches_the_model(self):
        assert min(self.available) >= 0 and min(self.held) >= 0, "the model itself overdrew"
        with Session(self.engine) as session:
            assert ledger.audit(session) == []
            rows = session.execute(select(Account.id, Account.kind, Account.available, Account.held)).all()
        balances = {(kind, id_): Balance(available, held) for id_, kind, available, held in rows}
        members = [balances[("member", account)] for account in self.accounts]
        assert members == [Balance(a, h) for a, h in zip(self.available, self.held, strict=True)]
        system = {kind: balance for (kind, _), balance in balances.items() if kind != "member"}
        assert system.get("issuer", Balance(0, 0)) == Balance(-self.granted, 0)
        assert system.get("revenue", Balance(0, 0)) == Balance(self.revenue, 0)


def test_ledger_state_machine(database_factory):
    """Random operation sequences, with concurrent bursts, never break the ledger."""
    run_state_machine_as_test(
        lambda: LedgerMachine(database_factory),
        settings=settings(
            max_examples=25,
            stateful_step_count=20,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
