"""Front ends: where a job's messages are (deliveries), deleted clips, per-server prices.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_WHEN = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "deliveries",
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.String(length=32), nullable=False),
        sa.Column("channel_id", sa.String(length=32), nullable=False),
        sa.Column("application_id", sa.String(length=32), nullable=False),
        sa.Column("reply_token", sa.String(length=500), nullable=False),
        sa.Column("token_expires_at", _WHEN, nullable=True),
        sa.Column("upload_limit", sa.Integer(), nullable=False),
        sa.Column("private", sa.Boolean(), nullable=False),
        sa.Column("status_message_id", sa.String(length=32), nullable=True),
        sa.Column("result_message_id", sa.String(length=32), nullable=True),
        sa.Column("gallery_message_id", sa.String(length=32), nullable=True),
        sa.Column("created_at", _WHEN, nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_deliveries_job_id_jobs"),
        sa.PrimaryKeyConstraint("job_id", name="pk_deliveries"),
    )
    op.create_index("ix_deliveries_gallery_message_id", "deliveries", ["gallery_message_id"], unique=False)
    with op.batch_alter_table("clips") as batch:
        batch.add_column(sa.Column("deleted", sa.Boolean(), nullable=False, server_default=sa.false()))
    with op.batch_alter_table("guild_settings") as batch:
        batch.add_column(sa.Column("prices", sa.JSON(), nullable=False, server_default="{}"))


def downgrade() -> None:
    with op.batch_alter_table("guild_settings") as batch:
        batch.drop_column("prices")
    with op.batch_alter_table("clips") as batch:
        batch.drop_column("deleted")
    op.drop_index("ix_deliveries_gallery_message_id", table_name="deliveries")
    op.drop_table("deliveries")
