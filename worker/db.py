"""Engines, sessions and schema upgrades for SQLite and PostgreSQL.

Every process calls :func:`init_db` once at start: it builds the engine and runs the Alembic migrations
to head, so a fresh install needs no separate setup step and no ``alembic.ini``::

    engine = init_db(get_settings())
    with session_scope(engine) as session:
        ledger.reserve(session, account.id, 12, job_id=job.id)

SQLite is the zero-configuration default and is shared by the bot and worker threads, so every
connection gets WAL (readers never block the writer), enforced foreign keys and a busy timeout, and
every transaction starts with ``BEGIN IMMEDIATE``: it takes the write lock up front and waits for it,
instead of failing with "database is locked" when a read transaction later tries to write. That
serialises writers, which is what SQLite does anyway, and is what makes the ledger's savepoints and
conditional updates behave as they do on PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.pool import StaticPool
from sqlmodel import Session

import migrations
from worker.settings import Settings

#: How long a SQLite connection waits for the write lock before giving up, in milliseconds.
SQLITE_BUSY_TIMEOUT_MS = 30_000


def normalize_url(url: str | URL) -> URL:
    """``url`` as a SQLAlchemy URL, PostgreSQL ones always on the psycopg 3 driver.

    >>> normalize_url("postgres://bot@db/animabot").render_as_string()
    'postgresql+psycopg://bot@db/animabot'
    """
    parsed = make_url(url)
    if parsed.drivername in ("postgres", "postgresql"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def make_engine(url: str | URL, **engine_kwargs: Any) -> Engine:
    """An engine for ``url`` (SQLite or PostgreSQL), safe to share between threads.

    ``postgres://`` and ``postgresql://`` URLs use psycopg 3. For a SQLite file the parent folder is
    created. ``engine_kwargs`` go to :func:`sqlalchemy.create_engine` (e.g. ``pool_size``).
    """
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(parsed, engine_kwargs)
    engine_kwargs.setdefault("pool_pre_ping", True)
    return sa.create_engine(parsed, **engine_kwargs)


def _sqlite_engine(url: URL, engine_kwargs: dict[str, Any]) -> Engine:
    database = url.database or ""
    in_memory = database in ("", ":memory:") or url.query.get("mode") == "memory"
    connect_args = engine_kwargs.setdefault("connect_args", {})
    # Pooled connections move between threads; each is used by one thread at a time.
    connect_args.setdefault("check_same_thread", False)
    if in_memory:
        # One shared connection, or every checkout would see its own empty database.
        engine_kwargs.setdefault("poolclass", StaticPool)
    else:
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, **engine_kwargs)

    @sa.event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, decide where transactions begin (see "begin").
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        if not in_memory:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(connection: sa.Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def alembic_config(engine: Engine) -> Config:
    """An Alembic config for the packaged ``migrations`` that runs on ``engine``.

    For the rare manual step::

        from alembic import command
        command.downgrade(alembic_config(engine), "-1")
    """
    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.attributes["engine"] = engine
    return config


def upgrade(engine_or_url: Engine | str | URL, revision: str = "head") -> None:
    """Migrate the database to ``revision`` (the newest by default); a no-op when it is already there.

    Safe to run from several processes at once: the migration holds the database's write lock
    (SQLite) or an advisory lock (PostgreSQL), and the losers find the work done.
    """
    if isinstance(engine_or_url, Engine):
        command.upgrade(alembic_config(engine_or_url), revision)
        return
    engine = make_engine(engine_or_url)
    try:
        command.upgrade(alembic_config(engine), revision)
    finally:
        engine.dispose()


def init_db(settings: Settings) -> Engine:
    """The engine for ``settings.database_url``, with the schema migrated to head."""
    engine = make_engine(settings.database_url)
    upgrade(engine)
    return engine


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session whose transaction commits when the block ends, or rolls back if it raises.

    Objects stay readable after the block (``expire_on_commit=False``).
    """
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
