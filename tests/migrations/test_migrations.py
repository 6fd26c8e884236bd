"""The migrations build exactly the models' schema on SQLite and PostgreSQL, and can be undone."""

from __future__ import annotations

import subprocess
import sys

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlmodel import SQLModel

import worker.models  # noqa: F401  (registers the tables)
from worker.db import alembic_config, make_engine, upgrade


def schema_diff(engine: sa.Engine) -> list:
    """What autogenerate would change to make the database match the models (types included)."""
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return compare_metadata(context, SQLModel.metadata)


def current_revision(engine: sa.Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def test_single_head():
    """The revisions form one line: no branch waiting to be merged."""
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    assert len(heads) == 1, heads


def test_upgrade_from_empty_builds_the_models_schema(db_url):
    """An empty database upgraded to head has every table, column, type, index and key of the models."""
    engine = make_engine(db_url)
    upgrade(engine)
    assert schema_diff(engine) == []
    assert current_revision(engine) == ScriptDirectory.from_config(alembic_config()).get_current_head()
    engine.dispose()


def test_upgrade_twice_is_a_no_op(engine):
    """Every process runs the upgrade on start; at head it changes nothing."""
    upgrade(engine)
    assert schema_diff(engine) == []


def test_concurrent_upgrades_take_turns(db_url):
    """Bot and workers starting together on an empty database: one migrates, the others find it done."""
    code = "import sys; from worker.db import upgrade; upgrade(sys.argv[1])"
    processes = [
        subprocess.Popen([sys.executable, "-c", code, db_url], stderr=subprocess.PIPE, text=True) for _ in range(4)
    ]
    errors = [p.communicate(timeout=120)[1] for p in processes]
    assert [p.returncode for p in processes] == [0] * 4, errors
    engine = make_engine(db_url)
    assert schema_diff(engine) == []
    engine.dispose()


def test_comparison_sees_drift(engine):
    """The empty diff above means something: a stray column shows up in it."""
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE guild_settings ADD COLUMN stray INTEGER")
    assert [d[0] for d in schema_diff(engine)] == ["remove_column"]


@pytest.mark.postgres
def test_comparison_sees_type_drift(postgres_url):
    """Types are compared too (checked on PostgreSQL, where a column's type can be altered in place)."""
    engine = make_engine(postgres_url)
    upgrade(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE jobs ALTER COLUMN camera TYPE VARCHAR(30)")
    diff = schema_diff(engine)
    assert len(diff) == 1 and diff[0][0][0] == "modify_type"
    engine.dispose()


def test_constraint_names_match_the_models(engine):
    """Every key, check, unique constraint and index has the model's name, so later migrations can drop it."""
    inspector = sa.inspect(engine)
    for table in SQLModel.metadata.sorted_tables:
        expected = {
            "pk": {table.primary_key.name},
            "fk": {c.name for c in table.foreign_key_constraints},
            "uq": {c.name for c in table.constraints if isinstance(c, sa.UniqueConstraint)},
            "ck": {c.name for c in table.constraints if isinstance(c, sa.CheckConstraint)},
            "ix": {i.name for i in table.indexes},
        }
        found = {
            "pk": {inspector.get_pk_constraint(table.name)["name"]},
            "fk": {c["name"] for c in inspector.get_foreign_keys(table.name)},
            "uq": {c["name"] for c in inspector.get_unique_constraints(table.name)},
            "ck": {c["name"] for c in inspector.get_check_constraints(table.name)},
            # PostgreSQL also lists the index behind each unique constraint.
            "ix": {i["name"] for i in inspector.get_indexes(table.name) if "duplicates_constraint" not in i},
        }
        assert found == expected, table.name


def test_every_revision_downgrades_and_upgrades_again(db_url):
    """Walking up one revision at a time, each step can be undone and redone; then all the way down."""
    engine = make_engine(db_url)
    config = alembic_config(engine)
    revisions = list(reversed(list(ScriptDirectory.from_config(config).walk_revisions())))
    for revision in revisions:
        command.upgrade(config, revision.revision)
        command.downgrade(config, revision.down_revision or "base")
        command.upgrade(config, revision.revision)
    assert schema_diff(engine) == []

    command.downgrade(config, "base")
    assert set(sa.inspect(engine).get_table_names()) == {"alembic_version"}
    assert current_revision(engine) is None
    command.upgrade(config, "head")
    assert schema_diff(engine) == []
    engine.dispose()


def _one_transfer(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO accounts (id, kind, guild_id, user_id, available, held, created_at) VALUES"
            " (1, 'issuer', '', '', -5, 0, CURRENT_TIMESTAMP),"
            " (2, 'member', 'g', 'u', 5, 0, CURRENT_TIMESTAMP)"
        )
        conn.exec_driver_sql(
            "INSERT INTO transfers (id, kind, debit_account_id, credit_account_id, amount, memo, created_at) "
            "VALUES ('grant:x', 'grant', 1, 2, 5, '', CURRENT_TIMESTAMP)"
        )


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE transfers SET amount = 500",
        "UPDATE transfers SET memo = 'edited'",
        "DELETE FROM transfers",
    ],
)
def test_transfers_are_append_only(engine, statement):
    """The database itself refuses to change or remove a transfer, whatever the code does."""
    _one_transfer(engine)
    with pytest.raises(sa.exc.IntegrityError, match="append-only"), engine.begin() as conn:
        conn.exec_driver_sql(statement)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT amount, memo FROM transfers").all() == [(5, "")]


@pytest.mark.postgres
def test_transfers_cannot_be_truncated(postgres_url):
    """On PostgreSQL, TRUNCATE (which skips row triggers) is refused as well."""
    engine = make_engine(postgres_url)
    upgrade(engine)
    _one_transfer(engine)
    with pytest.raises(sa.exc.IntegrityError, match="append-only"), engine.begin() as conn:
        conn.exec_driver_sql("TRUNCATE transfers CASCADE")
    engine.dispose()


@pytest.mark.parametrize(
    ("statement", "constraint"),
    [
        ("UPDATE accounts SET available = -1 WHERE kind = 'member'", "ck_accounts_member_not_negative"),
        ("UPDATE accounts SET held = -1", "ck_accounts_held_not_negative"),
        (
            "INSERT INTO transfers (id, kind, debit_account_id, credit_account_id, amount, memo, created_at) "
            "VALUES ('t', 'grant', 1, 2, 0, '', CURRENT_TIMESTAMP)",
            "ck_transfers_amount_positive",
        ),
        (
            "INSERT INTO transfers (id, kind, debit_account_id, credit_account_id, amount, memo, created_at) "
            "VALUES ('t', 'grant', 2, 2, 1, '', CURRENT_TIMESTAMP)",
            "ck_transfers_distinct_accounts",
        ),
        (
            "INSERT INTO transfers (id, kind, debit_account_id, credit_account_id, amount, memo, created_at) "
            "VALUES ('t', 'capture', 1, 2, 1, '', CURRENT_TIMESTAMP)",
            "ck_transfers_pending_only_on_resolutions",
        ),
        (
            "INSERT INTO transfers (id, kind, debit_account_id, credit_account_id, amount, pending_id, memo, "
            "created_at) VALUES ('t', 'grant', 1, 2, 1, 'grant:x', '', CURRENT_TIMESTAMP)",
            "ck_transfers_pending_only_on_resolutions",
        ),
    ],
)
def test_check_constraints_hold(engine, statement, constraint):
    """The ledger's rules are CHECK constraints the migration created, not only code."""
    _one_transfer(engine)
    with pytest.raises(sa.exc.IntegrityError, match=constraint), engine.begin() as conn:
        conn.exec_driver_sql(statement)
