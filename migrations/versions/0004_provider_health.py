"""Real providers: the provider's id on each attempt (webhooks find their attempt by it), backend health.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-21
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_WHEN = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("attempts") as batch:
        batch.add_column(sa.Column("provider_id", sa.String(length=200), nullable=True))
        batch.create_index("ix_attempts_provider_id", ["provider_id"], unique=False)
    op.create_table(
        "backend_health",
        sa.Column("backend", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("consecutive_failures", sa.Integer(), nullable=False),
        sa.Column("cooldown_until", _WHEN, nullable=True),
        sa.Column("last_error", sa.String(length=500), nullable=False),
        sa.Column("last_error_at", _WHEN, nullable=True),
        sa.Column("last_ok_at", _WHEN, nullable=True),
        sa.PrimaryKeyConstraint("backend", "model", name="pk_backend_health"),
    )


def downgrade() -> None:
    op.drop_table("backend_health")
    with op.batch_alter_table("attempts") as batch:
        batch.drop_index("ix_attempts_provider_id")
        batch.drop_column("provider_id")
