"""Backend health: providers that keep failing are put on cooldown, and routing passes them over.

Only failures that are the provider's doing count (outage, timeout, rate limit; not a refused picture
or a bad request), and only for backends that need the network. ``FAILURES_BEFORE_COOLDOWN``
consecutive ones put a backend and model on cooldown for ``COOLDOWN`` seconds, doubling with every
further failure up to ``MAX_COOLDOWN``; a rate limit puts it on cooldown at once for as long as the
provider asked. One success clears it. The state is a table, so every worker process and machine
sees the same health.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session, select

from backends.base import BackendError, RateLimited
from worker.models import BackendHealth, utcnow

FAILURES_BEFORE_COOLDOWN = 3
COOLDOWN = 60.0
MAX_COOLDOWN = 30 * 60.0


def _row(session: Session, backend: str, model: str | None) -> BackendHealth:
    row = session.get(BackendHealth, (backend, model or ""))
    return row or BackendHealth(backend=backend, model=model or "")


def record_failure(db: Engine, backend: str, model: str | None, error: BackendError) -> None:
    """Count a failure that was the provider's doing (a transient error) against ``backend``/``model``."""
    if not error.transient:
        return
    with Session(db) as session:
        row = _row(session, backend, model)
        now = utcnow()
        row.consecutive_failures += 1
        row.last_error, row.last_error_at = f"{error.code}: {error.message}"[:500], now
        wait = 0.0
        if row.consecutive_failures >= FAILURES_BEFORE_COOLDOWN:
            wait = min(COOLDOWN * 2 ** (row.consecutive_failures - FAILURES_BEFORE_COOLDOWN), MAX_COOLDOWN)
        if isinstance(error, RateLimited):
            wait = max(wait, error.retry_after)
        if wait:
            row.cooldown_until = max(_aware(row.cooldown_until) or now, now + timedelta(seconds=wait))
        session.add(row)
        session.commit()


def record_success(db: Engine, backend: str, model: str | None) -> None:
    """The provider delivered: clear its failures and cooldown."""
    with Session(db) as session:
        row = session.get(BackendHealth, (backend, model or ""))
        if row is None:
            row = BackendHealth(backend=backend, model=model or "")
        elif not row.consecutive_failures and row.cooldown_until is None:
            row.last_ok_at = utcnow()
            session.add(row)
            session.commit()
            return
        row.consecutive_failures, row.cooldown_until, row.last_ok_at = 0, None, utcnow()
        session.add(row)
        session.commit()


def checker(db: Engine) -> Callable[[str, str | None], str | None]:
    """``healthy(backend, model)`` for routing: why it is cooling down, or None (one query, then memory)."""
    now = utcnow()
    with Session(db) as session:
        cooling = {
            (row.backend, row.model): row
            for row in session.exec(select(BackendHealth).where(BackendHealth.cooldown_until > now))  # type: ignore[operator]
        }

    def healthy(backend: str, model: str | None) -> str | None:
        row = cooling.get((backend, model or "")) or cooling.get((backend, ""))
        if row is None:
            return None
        left = (_aware(row.cooldown_until) - now).total_seconds()  # type: ignore[operator]
        return (f"cooling down for {left:.0f} s after {row.consecutive_failures} failure(s) "
                f"({row.last_error[:120]})")

    return healthy


def report(db: Engine) -> list[dict[str, Any]]:
    """Every backend/model with a health record, for ``animabot backends``."""
    now = utcnow()
    with Session(db) as session:
        rows = session.exec(select(BackendHealth).order_by(BackendHealth.backend, BackendHealth.model)).all()
    return [
        {
            "backend": r.backend, "model": r.model or None, "consecutive_failures": r.consecutive_failures,
            "cooldown_seconds": max(0.0, round((_aware(r.cooldown_until) - now).total_seconds(), 1))
            if r.cooldown_until else 0.0,
            "last_error": r.last_error or None,
        }
        for r in rows
    ]


def _aware(when: datetime | None) -> datetime | None:
    return when if when is None or when.tzinfo else when.replace(tzinfo=UTC)
