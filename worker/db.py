"""Engines, sessions and schema upgrades for SQLite and PostgreSQL.

Every process calls :func:`init_db` once at start: it builds the engine and runs the Alembic migrations
to head, so a fresh install needs no separate setup step and no ``alembic.ini``::

    engine = init_db(get_settings())
    with session_scope(engine) as session:
        ledger.reserve(session, account.id, 12, job_id=job.id)

SQLite is the zero-configuration default and is shared by the bot and worker threads, so every
connection gets WAL (readers never block the writer), enforced foreign keys and a busy timeout, and
transactions behave much like PostgreSQL's READ COMMITTED:

- Reads before a transaction's first write run on their own and each sees the latest commit; they
  take no lock, so a session that only read blocks nobody, however long it stays open.
- The first write (or SAVEPOINT) starts ``BEGIN IMMEDIATE``: it waits for the single write lock (up to
  :data:`SQLITE_BUSY_TIMEOUT_MS`) and keeps it until commit or rollback. A deferred ``BEGIN`` would
  instead hold a read snapshot and fail at once with "database is locked" when it tries to write after
  another connection committed; and the sqlite3 module's own transaction handling breaks SAVEPOINTs.

So writers are serialised (as SQLite always does) and wait their turn rather than fail, and the
ledger's savepoints and conditional updates work as they do on PostgreSQL. Keep write transactions
short: one left open holds every other writer back.
"""

from __future__ import annotations

import time
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

#: A pooled PostgreSQL connection unused for this long is pinged before its next use, seconds.
PING_AFTER_IDLE = 1.0
#: Pooled PostgreSQL connections are replaced once they are this old, seconds.
POOL_RECYCLE = 1800
_IDLE_SINCE = "animabot_idle_since"

#: Execution option: take SQLite's write lock at the transaction's first statement, even a read, for a
#: transaction whose reads must not change before it writes (``conn.execution_options(**{...: True})``).
SQLITE_LOCK_AT_START = "animabot_sqlite_lock_at_start"

_READS = ("SELECT", "PRAGMA", "EXPLAIN", "VALUES")


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
    engine_kwargs.setdefault("pool_recycle", POOL_RECYCLE)
    engine = sa.create_engine(parsed, **engine_kwargs)
    if not engine_kwargs.get("pool_pre_ping"):
        _ping_when_idle(engine)
    return engine


def _ping_when_idle(engine: Engine) -> None:
    """Check a pooled connection before use only if it sat idle for :data:`PING_AFTER_IDLE` seconds or more.

    ``pool_pre_ping`` pays a round trip on every checkout (about 50 per job); a connection in steady use
    needs none. One that waited in the pool (a quiet spell, or across a database restart, which takes
    longer than that) is pinged, and if the server dropped it, it and every older pooled connection are
    replaced before anyone uses them. A connection that dies while in use raises in its unit of work,
    which is retried (``worker.runner``), and the pool is replaced the same way.
    """

    @sa.event.listens_for(engine, "checkin")
    def _idle_from(_dbapi_connection: Any, record: Any) -> None:
        record.info[_IDLE_SINCE] = time.monotonic()

    @sa.event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        since = record.info.pop(_IDLE_SINCE, None)
        idle = time.monotonic() - since if since is not None else 0.0
        if idle < PING_AFTER_IDLE:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:  # the server closed it meanwhile: the pool reconnects, once for all
            raise sa.exc.InvalidatePoolError(f"pooled connection found dead after {idle:.0f} s idle") from exc


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
        # Let us, not the sqlite3 module, decide where transactions begin (_begin_before_first_write).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        if not in_memory:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.close()

    @sa.event.listens_for(engine, "before_cursor_execute")
    def _begin_before_first_write(connection: sa.Connection, _cursor: Any, statement: str, *_: Any) -> None:
        driver_connection = connection.connection.driver_connection
        if driver_connection is None or driver_connection.in_transaction or not connection.in_transaction():
            return
        read = statement.lstrip()[:8].upper().startswith(_READS)
        if read and not connection.get_execution_options().get(SQLITE_LOCK_AT_START):
            return
        driver_connection.execute("BEGIN IMMEDIATE")

    return engine


def alembic_config(engine: Engine | None = None) -> Config:
    """An Alembic config for the packaged ``migrations`` that runs on ``engine``.

    For the rare manual step::

        from alembic import command
        command.downgrade(alembic_config(engine), "-1")
    """
    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    if engine is not None:
        config.attributes["engine"] = engine
    return config


def upgrade(engine_or_url: Engine | str | URL, revision: str = "head") -> None:
    """Migrate the database to ``revision`` (the newest by default); a no-op when it is already there.

    Safe to run from several processes at once: the migration holds the database's write lock
    (SQLite) or an advisory lock (PostgreSQL), and the others find the work done. Not from several
    threads of one process: Alembic keeps its migration context in module globals.
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
