"""Alembic environment: runs the migrations on the engine :func:`worker.db.upgrade` hands over.

There is no ``alembic.ini``; :func:`worker.db.alembic_config` builds the config in code and puts the
engine in ``config.attributes["engine"]``. Without one (the ``alembic`` command line pointed here with
``-c``), the database comes from ``sqlalchemy.url`` or else from the animabot settings.

On SQLite, foreign keys are switched off while the schema changes (batch mode rebuilds tables by
copying them, which enforced keys would cascade or refuse) and checked before they are switched back
on. Concurrent upgrades (bot and workers starting together) wait for each other instead of racing to
create the same tables: SQLite's write lock is taken before the version is read, and PostgreSQL takes
an advisory lock (DDL there is transactional, and Alembic reads the version after the lock).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, text
from sqlmodel import SQLModel

import worker.models  # noqa: F401  (registers the tables on SQLModel.metadata)
from worker.db import SQLITE_LOCK_AT_START, make_engine, normalize_url
from worker.settings import Settings

config = context.config
target_metadata = SQLModel.metadata

#: Arbitrary, fixed key of the PostgreSQL advisory lock taken while migrating ("anim" in ASCII).
MIGRATION_LOCK_KEY = 0x616E696D


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url") or Settings().database_url
    return normalize_url(url).render_as_string(hide_password=False)


def run_migrations_offline() -> None:
    """Print the SQL instead of running it (``alembic upgrade --sql``)."""
    url = _url()
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=url.startswith("sqlite"),
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _migrate(connection: Connection) -> None:
    sqlite = connection.dialect.name == "sqlite"
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=sqlite,
        compare_type=True,
        # worker.db makes SQLite transactions explicit, so DDL rolls back with everything else.
        transactional_ddl=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        context.run_migrations()
        if sqlite:
            broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            if broken:
                raise RuntimeError(f"migration left rows with dangling foreign keys: {broken[:5]}")


def run_migrations_online() -> None:
    """Run the migrations in one transaction on a connection of our engine."""
    engine = config.attributes.get("engine")
    own_engine = engine is None
    if own_engine:
        engine = make_engine(_url())
    try:
        with engine.connect() as connection:
            sqlite = connection.dialect.name == "sqlite"
            # PRAGMA foreign_keys is ignored inside a transaction, so use the raw connection before
            # SQLAlchemy begins one.
            raw = connection.connection.driver_connection
            if sqlite:
                raw.execute("PRAGMA foreign_keys=OFF")
                # Hold the write lock from the version check on, so concurrent upgrades queue up.
                connection.execution_options(**{SQLITE_LOCK_AT_START: True})
            try:
                _migrate(connection)
            finally:
                if sqlite:
                    raw.execute("PRAGMA foreign_keys=ON")
    finally:
        if own_engine:
            engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
