"""Engines and sessions: URLs, SQLite set up for threads, migrations on start."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa
from sqlmodel import Session, SQLModel, select

from worker.db import init_db, make_engine, normalize_url, session_scope, upgrade
from worker.models import GuildSettings
from worker.settings import Settings


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgres://bot:pw@db:5432/animabot", "postgresql+psycopg://bot:pw@db:5432/animabot"),
        ("postgresql://bot@db/animabot", "postgresql+psycopg://bot@db/animabot"),
        ("postgresql+psycopg://bot@db/animabot", "postgresql+psycopg://bot@db/animabot"),
        ("sqlite:////srv/animabot.db", "sqlite:////srv/animabot.db"),
    ],
)
def test_postgresql_urls_use_psycopg(url, expected):
    """Whatever spelling a hosting provider hands out, PostgreSQL goes through psycopg 3."""
    assert normalize_url(url).render_as_string(hide_password=False) == expected


def test_sqlite_file_is_set_up_for_threads(tmp_path):
    """A SQLite file gets its folder, WAL, enforced foreign keys and a busy timeout."""
    engine = make_engine(f"sqlite:///{tmp_path / 'deep' / 'er' / 'animabot.db'}")
    with engine.connect() as conn:
        pragmas = {name: conn.exec_driver_sql(f"PRAGMA {name}").scalar() for name in
                   ("journal_mode", "foreign_keys", "busy_timeout")}  # fmt: skip
    assert pragmas == {"journal_mode": "wal", "foreign_keys": 1, "busy_timeout": 30_000}
    assert (tmp_path / "deep" / "er" / "animabot.db").exists()
    engine.dispose()


def test_in_memory_sqlite_is_one_database(tmp_path):
    """An in-memory URL gives one shared database, so a migrated schema is still there."""
    engine = make_engine("sqlite://")
    upgrade(engine)
    assert "transfers" in sa.inspect(engine).get_table_names()


def test_init_db_migrates_and_is_repeatable(tmp_path):
    """Starting twice on the same data folder is fine; the schema is at head."""
    settings = Settings(data_dir=tmp_path)
    init_db(settings).dispose()
    engine = init_db(settings)
    assert set(SQLModel.metadata.tables) <= set(sa.inspect(engine).get_table_names())
    engine.dispose()


def test_upgrade_accepts_a_url(db_url):
    """Migrations can be run from a URL as well as from an engine."""
    upgrade(db_url)
    engine = make_engine(db_url)
    assert "accounts" in sa.inspect(engine).get_table_names()
    engine.dispose()


def test_session_scope_commits_or_rolls_back(engine):
    """The block's work is kept when it ends normally and dropped when it raises."""
    with session_scope(engine) as session:
        session.add(GuildSettings(guild_id="kept"))
    with pytest.raises(RuntimeError), session_scope(engine) as session:
        session.add(GuildSettings(guild_id="dropped"))
        session.flush()
        raise RuntimeError("boom")
    with Session(engine) as session:
        assert session.exec(select(GuildSettings.guild_id)).all() == ["kept"]


def test_idle_reader_does_not_block_writers(engine):
    """A session that only read holds no lock, however long it stays open (SQLite included)."""
    with Session(engine) as reader:
        reader.get(GuildSettings, "nobody")  # a transaction is open now
        with session_scope(engine) as writer:  # would wait for the busy timeout if the read held a lock
            writer.add(GuildSettings(guild_id="written"))
        assert reader.get(GuildSettings, "written") is not None  # and the reader sees the new commit


def test_concurrent_read_then_write_transactions_all_succeed(engine, db_url):
    """Threads that read, then write in the same transaction, take turns instead of failing."""
    wide = make_engine(db_url, pool_size=20, max_overflow=0)
    start = threading.Barrier(20)

    def read_then_write(i):
        start.wait(timeout=30)
        with session_scope(wide) as session:
            session.get(GuildSettings, "nobody")
            session.add(GuildSettings(guild_id=f"g{i}", daily_grant=i))
        return i

    with ThreadPoolExecutor(max_workers=20) as pool:
        assert sorted(pool.map(read_then_write, range(20))) == list(range(20))
    with Session(wide) as session:
        assert len(session.exec(select(GuildSettings)).all()) == 20
    wide.dispose()


@pytest.mark.postgres
def test_a_connection_dropped_while_idle_in_the_pool_is_replaced_unnoticed(postgres_url, monkeypatch):
    """No ping on every checkout, yet one the server closed while it sat in the pool is never handed out."""
    from worker import db

    monkeypatch.setattr(db, "PING_AFTER_IDLE", 0.0)
    engine = make_engine(postgres_url)
    with engine.connect() as conn:
        victim = conn.scalar(sa.text("SELECT pg_backend_pid()"))
    admin = make_engine(postgres_url)
    with admin.connect() as conn:  # the server drops it (a restart, an admin, a proxy)
        assert conn.scalar(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": victim})
    admin.dispose()
    with engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT pg_backend_pid()")) != victim
    engine.dispose()


@pytest.mark.postgres
def test_a_connection_in_steady_use_is_not_pinged(postgres_url, monkeypatch):
    """Checkouts in quick succession cost no extra round trip."""
    engine = make_engine(postgres_url)
    pings = []
    original = engine.dialect.do_ping
    monkeypatch.setattr(engine.dialect, "do_ping", lambda conn: pings.append(1) or original(conn))
    for _ in range(20):
        with engine.connect() as conn:
            conn.scalar(sa.text("SELECT 1"))
    assert pings == []
    engine.dispose()
