"""The database schema: jobs and their attempts and stages, accounts, the credit ledger, clips, guilds.

The job row is the source of truth for a generation; everything else (queues, events, messages) only
points at it. Its ``state`` follows :data:`TRANSITIONS`; :meth:`Job.advance` refuses any other move.

Discord ids are snowflakes up to 2**64, stored as strings so SQLite and PostgreSQL agree.
Enumerations are stored as short strings, not database enums, so adding a value needs no migration.
Alembic migrations in ``migrations/`` create exactly this schema; a test compares the two.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

#: Constraint names are part of the schema: migrations must name what they later drop or alter (SQLite
#: can only do that by name, in batch mode), and both databases must agree on them. Explicit names in
#: ``__table_args__`` win; check constraints are always named by hand.
SQLModel.metadata.naming_convention = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Now, timezone-aware in UTC."""
    return datetime.now(UTC)


def _time(**kw: Any) -> Any:
    return Field(default_factory=utcnow, sa_type=sa.DateTime(timezone=True), **kw)


def _json(**kw: Any) -> Any:
    return Field(default_factory=dict, sa_type=sa.JSON, **kw)


class JobState(StrEnum):
    """Where a job stands; ``succeeded``, ``failed`` and ``canceled`` are final."""

    QUEUED = "queued"
    VALIDATING = "validating"
    GENERATING = "generating"
    CHECKING = "checking"
    POST_PROCESSING = "post-processing"
    DELIVERING = "delivering"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        """Whether the job is finished for good."""
        return self in FINAL_STATES


FINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED})

#: Legal moves of the job state machine. Any state may fail or be canceled; ``checking`` may go back
#: to ``generating`` when the check rejects an output and the job retries, and ``generating`` may go
#: straight to ``post-processing`` when an attempt errs after an earlier one was accepted (best-of-N).
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.VALIDATING}),
    JobState.VALIDATING: frozenset({JobState.GENERATING}),
    JobState.GENERATING: frozenset({JobState.CHECKING, JobState.POST_PROCESSING}),
    JobState.CHECKING: frozenset({JobState.GENERATING, JobState.POST_PROCESSING}),
    JobState.POST_PROCESSING: frozenset({JobState.DELIVERING}),
    JobState.DELIVERING: frozenset({JobState.SUCCEEDED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELED: frozenset(),
}
for _state, _next in TRANSITIONS.items():
    if not _state.terminal:
        TRANSITIONS[_state] = _next | {JobState.FAILED, JobState.CANCELED}


class IllegalTransition(ValueError):
    """A job was asked to move to a state its current state cannot reach."""


class Job(SQLModel, table=True):
    """One request to animate one image, from submission to a stored clip or a clear failure."""

    __tablename__ = "jobs"

    id: int | None = Field(default=None, primary_key=True)
    key: str | None = Field(default=None, max_length=100, unique=True, description="Idempotency key.")
    state: str = Field(default=JobState.QUEUED.value, max_length=20, index=True)
    account_id: int | None = Field(default=None, foreign_key="accounts.id", index=True)
    guild_id: str | None = Field(default=None, max_length=32)
    channel_id: str | None = Field(default=None, max_length=32)
    parent_job_id: int | None = Field(default=None, foreign_key="jobs.id")

    prompt: str = Field(default="", max_length=2000)
    negative_prompt: str = Field(default="", max_length=2000)
    camera: str = Field(default="zoom-in", max_length=20)
    motion: int = 2
    duration: float = 5.0
    aspect: str = Field(default="auto", max_length=8)
    seed: int = 0
    requested_backend: str | None = Field(default=None, max_length=64)
    model: str | None = Field(default=None, max_length=200)

    subject: str | None = Field(default=None, max_length=32)
    backend: str | None = Field(default=None, max_length=64)
    source_path: str | None = Field(default=None, max_length=1000)
    output_path: str | None = Field(default=None, max_length=1000)
    price_credits: int = 0
    cost_usd: float = 0.0
    error_code: str | None = Field(default=None, max_length=64)
    error_message: str | None = Field(default=None, max_length=2000)
    detail: dict[str, Any] = _json()

    # Scheduling (worker.engine): when the job next needs a worker (NULL while it waits on a provider
    # or once it is final), and who holds it now, until when.
    next_run_at: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True), index=True)
    lease_owner: str | None = Field(default=None, max_length=100)
    lease_expires_at: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))
    claims: int = Field(default=0, description="Times a worker took the job.")
    recoveries: int = Field(default=0, description="Times the job was taken back from a worker that died.")
    cancel_requested: bool = False

    created_at: datetime = _time()
    updated_at: datetime = _time()
    started_at: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))
    finished_at: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))

    @property
    def job_state(self) -> JobState:
        """``state`` as an enum."""
        return JobState(self.state)

    def advance(self, new: JobState) -> None:
        """Move to ``new``; raise :class:`IllegalTransition` if the state machine forbids it."""
        current = self.job_state
        if new == current:
            return
        if new not in TRANSITIONS[current]:
            raise IllegalTransition(f"job {self.id}: cannot go from {current.value} to {new.value}")
        self.state = new.value
        self.updated_at = utcnow()
        if new.terminal:
            self.finished_at = self.updated_at


class JobStage(SQLModel, table=True):
    """One run of one pipeline stage for a job: its outcome, timing and what it found."""

    __tablename__ = "job_stages"

    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(foreign_key="jobs.id", index=True)
    stage: str = Field(max_length=32)
    outcome: str = Field(max_length=16, description="ok, skipped or failed")
    seconds: float = 0.0
    detail: dict[str, Any] = _json()
    started_at: datetime = _time()


class Attempt(SQLModel, table=True):
    """One generation attempt of a job on one backend, with the check's verdict."""

    __tablename__ = "attempts"
    __table_args__ = (sa.UniqueConstraint("job_id", "number", name="uq_attempts_job_number"),)

    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(foreign_key="jobs.id", index=True)
    number: int
    backend: str = Field(max_length=64)
    model: str | None = Field(default=None, max_length=200)
    seed: int = 0
    motion: int = 2
    segment: int = Field(default=0, description="Which segment of an extended clip this attempt makes.")
    provider_id: str | None = Field(default=None, max_length=200, index=True,
                                    description="The provider's id of the generation (the handle's id).")
    handle: dict[str, Any] = _json()
    state: str = Field(default="submitting", max_length=20, description="submitting, running, ready, finished")
    next_poll_at: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True), index=True)
    report: dict[str, Any] = _json(description="How the provider says the generation ended.")
    result: dict[str, Any] = _json(description="The generated file, as the backend described it.")
    verdict: str | None = Field(default=None, max_length=16, description="accepted, rejected or error")
    reasons: list[str] = Field(default_factory=list, sa_type=sa.JSON)
    error_code: str | None = Field(default=None, max_length=64)
    error_message: str | None = Field(default=None, max_length=2000)
    output_path: str | None = Field(default=None, max_length=1000)
    cost_usd: float = 0.0
    started_at: datetime = _time()
    finished_at: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))


class Event(SQLModel, table=True):
    """One thing that happened to a job, kept until a front end confirms it handled it.

    The table is both the event stream and the outbox: front ends read undelivered events in order and
    set ``delivered_at`` once handled, so a front end that was down gets what it missed, and a finished
    result is never dropped.
    """

    __tablename__ = "events"

    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(foreign_key="jobs.id", index=True)
    kind: str = Field(max_length=32)
    payload: dict[str, Any] = _json()
    created_at: datetime = _time()
    delivered_at: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True), index=True)


class Delivery(SQLModel, table=True):
    """Where a chat front end told a member about a job, so it can keep the conversation going.

    The reply token answers the member's own request until it expires (Discord: 15 minutes); after
    that the front end posts with its own credentials in ``channel_id``. Message ids are the front
    end's: the status message it edits, the result it posted, the copy in the server's gallery.
    """

    __tablename__ = "deliveries"

    job_id: int = Field(primary_key=True, foreign_key="jobs.id")
    user_id: str = Field(max_length=32)
    channel_id: str = Field(max_length=32)
    application_id: str = Field(default="", max_length=32)
    reply_token: str = Field(default="", max_length=500)
    token_expires_at: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))
    upload_limit: int = Field(default=10 * 1024 * 1024, description="Largest file the reply may carry, bytes.")
    private: bool = False
    status_message_id: str | None = Field(default=None, max_length=32)
    result_message_id: str | None = Field(default=None, max_length=32)
    gallery_message_id: str | None = Field(default=None, max_length=32, index=True)
    created_at: datetime = _time()


class BackendHealth(SQLModel, table=True):
    """How a backend (and model) has been doing lately, shared by every process.

    Consecutive failures that are the provider's fault (outage, timeout, rate limit) put it on
    cooldown until ``cooldown_until``; routing skips it meanwhile. A success clears the count.
    """

    __tablename__ = "backend_health"

    backend: str = Field(primary_key=True, max_length=64)
    model: str = Field(default="", primary_key=True, max_length=200)
    consecutive_failures: int = 0
    cooldown_until: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))
    last_error: str = Field(default="", max_length=500)
    last_error_at: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))
    last_ok_at: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))


class AccountKind(StrEnum):
    """Members hold credits; the system accounts are where grants come from and charges go to."""

    MEMBER = "member"
    ISSUER = "issuer"
    REVENUE = "revenue"


class Account(SQLModel, table=True):
    """A ledger account: a Discord user in a guild, or one of the system accounts.

    ``available`` and ``held`` are caches of the sums of the account's transfers, updated in the same
    transaction as each transfer; a member's ``available`` can never go below zero (a CHECK enforces it).
    """

    __tablename__ = "accounts"
    __table_args__ = (
        sa.UniqueConstraint("kind", "guild_id", "user_id", name="uq_accounts_owner"),
        sa.CheckConstraint("kind <> 'member' OR available >= 0", name="ck_accounts_member_not_negative"),
        sa.CheckConstraint("held >= 0", name="ck_accounts_held_not_negative"),
    )

    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(default=AccountKind.MEMBER.value, max_length=16)
    guild_id: str = Field(default="", max_length=32)
    user_id: str = Field(default="", max_length=32)
    available: int = 0
    held: int = 0
    created_at: datetime = _time()


class TransferKind(StrEnum):
    """Kinds of ledger transfers."""

    GRANT = "grant"
    RESERVE = "reserve"
    CAPTURE = "capture"
    VOID = "void"


class Transfer(SQLModel, table=True):
    """An immutable movement of credits; the id is its idempotency key.

    A ``reserve`` is pending until exactly one ``capture`` or ``void`` names it in ``pending_id``
    (unique, so a reservation resolves at most once). Rows are never updated or deleted: database
    triggers refuse it.
    """

    __tablename__ = "transfers"
    __table_args__ = (
        sa.CheckConstraint("amount > 0", name="ck_transfers_amount_positive"),
        sa.CheckConstraint("debit_account_id <> credit_account_id", name="ck_transfers_distinct_accounts"),
        sa.CheckConstraint(
            "(kind IN ('capture', 'void')) = (pending_id IS NOT NULL)",
            name="ck_transfers_pending_only_on_resolutions",
        ),
    )

    id: str = Field(primary_key=True, max_length=100)
    kind: str = Field(max_length=16)
    debit_account_id: int = Field(foreign_key="accounts.id", index=True)
    credit_account_id: int = Field(foreign_key="accounts.id", index=True)
    amount: int
    pending_id: str | None = Field(default=None, max_length=100, foreign_key="transfers.id", unique=True)
    job_id: int | None = Field(default=None, foreign_key="jobs.id", index=True)
    memo: str = Field(default="", max_length=200)
    created_at: datetime = _time()


class Clip(SQLModel, table=True):
    """A finished clip, what galleries show."""

    __tablename__ = "clips"

    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(foreign_key="jobs.id", unique=True)
    account_id: int | None = Field(default=None, foreign_key="accounts.id", index=True)
    guild_id: str | None = Field(default=None, max_length=32, index=True)
    path: str = Field(max_length=1000)
    width: int
    height: int
    duration: float
    bytes: int
    backend: str = Field(max_length=64)
    prompt: str = Field(default="", max_length=2000)
    published: bool = False
    deleted: bool = False
    votes: int = 0
    created_at: datetime = _time()


class GuildSettings(SQLModel, table=True):
    """Per-guild configuration set by the guild's admins; empty values fall back to global settings."""

    __tablename__ = "guild_settings"

    guild_id: str = Field(primary_key=True, max_length=32)
    daily_grant: int | None = None
    gallery_channel_id: str | None = Field(default=None, max_length=32)
    allowed_channel_ids: list[str] = Field(default_factory=list, sa_type=sa.JSON)
    routing_overrides: dict[str, Any] = _json()
    prices: dict[str, Any] = _json(description="Per-second prices by backend, over the price table.")
    max_concurrent_per_user: int | None = None
    cooldown_seconds: int | None = None
    updated_at: datetime = _time()
