"""The daily free credits, given once per member and UTC day.

Members get today's grant when they submit (``worker.submit``) and, so that ``/credits`` shows it from
midnight on, Celery beat (or the embedded runtime) grants it to every member active in the last 30
days shortly after midnight UTC. Both go through :func:`worker.ledger.daily_grant`, which grants at
most once per account and day, so the two never add up.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import Engine
from sqlmodel import Session, select

from worker import ledger
from worker.models import Account, AccountKind, GuildSettings, Job, utcnow
from worker.settings import Settings

ACTIVE_DAYS = 30


def grant_daily_to_active_members(db: Engine, settings: Settings) -> int:
    """Grant today's credits to members who submitted in the last ``ACTIVE_DAYS`` days; how many got them."""
    since = utcnow() - timedelta(days=ACTIVE_DAYS)
    with Session(db) as session:
        accounts = session.exec(
            select(Account).where(
                Account.kind == AccountKind.MEMBER.value,
                Account.id.in_(select(Job.account_id).where(Job.created_at >= since)),  # type: ignore[union-attr]
            )
        ).all()
        overrides = {g.guild_id: g.daily_grant for g in session.exec(select(GuildSettings)).all()}
        granted = 0
        for account in accounts:
            amount = overrides.get(account.guild_id)
            amount = settings.daily_free_credits if amount is None else amount
            if account.id is not None and ledger.daily_grant(session, account.id, amount) is not None:
                granted += 1
        return granted
