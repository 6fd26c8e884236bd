"""Fixtures shared by the whole suite.

Databases: ``db_url`` runs a test once on SQLite and once on PostgreSQL (the ``postgres`` mark), each
time on a fresh, empty database; ``engine`` is that database migrated to head; ``database_factory``
hands out more fresh migrated databases (one per Hypothesis example). PostgreSQL tests use throwaway
databases on ``ANIMABOT_TEST_POSTGRES_URL`` (default: the local server as user ``postgres``) and skip
when it is unreachable, or fail when ``ANIMABOT_REQUIRE_SERVICES=1`` (CI).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine
from sqlalchemy.pool import NullPool

from worker.db import make_engine, normalize_url, upgrade

REQUIRE_SERVICES = os.environ.get("ANIMABOT_REQUIRE_SERVICES") == "1"
POSTGRES_ADMIN_URL = os.environ.get("ANIMABOT_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def service_unavailable(reason: str) -> NoReturn:
    """Skip the test, or fail it when CI says the service must be there."""
    if REQUIRE_SERVICES:
        pytest.fail(f"{reason} (and ANIMABOT_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(reason)


class PostgresServer:
    """Creates and drops uniquely named throwaway databases on one PostgreSQL server."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = normalize_url(admin_url)
        self.admin = make_engine(
            self.admin_url,
            isolation_level="AUTOCOMMIT",
            poolclass=NullPool,
            connect_args={"connect_timeout": 3},
        )

    def create(self, *, template: str | None = None) -> URL:
        """A new database (empty, or a copy of ``template``, which must have no open connections)."""
        name = f"animabot_test_{uuid.uuid4().hex[:12]}"
        clone = f' TEMPLATE "{template}" STRATEGY FILE_COPY' if template else ""
        with self.admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"{clone}')
        return self.admin_url.set(database=name)

    def drop(self, url: URL) -> None:
        """Drop the database, closing any connection still open to it."""
        with self.admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer(POSTGRES_ADMIN_URL)
    try:
        with server.admin.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as exc:
        where = server.admin_url.render_as_string(hide_password=True)
        service_unavailable(f"PostgreSQL is not reachable at {where}: {str(exc.orig).strip()}")
    yield server
    server.admin.dispose()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty PostgreSQL database, dropped after the test."""
    url = postgres_server.create()
    yield url.render_as_string(hide_password=False)
    postgres_server.drop(url)


DATABASES = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
]


@pytest.fixture(params=DATABASES)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database: a SQLite file, then a PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'animabot.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """An engine on ``db_url``, migrated to head."""
    engine = make_engine(db_url)
    upgrade(engine)
    yield engine
    engine.dispose()


class DatabaseFactory:
    """Fresh databases migrated to head, copied from one migrated template (about 0.1 s each)."""

    def __init__(self, template_url: str, tmp_path: Path, server: PostgresServer | None) -> None:
        self.template = normalize_url(template_url)
        self.tmp_path = tmp_path
        self.server = server
        self.engines: list[Engine] = []
        upgrade(template_url)  # disposes its engine: a template must have no open connections

    def new(self, **engine_kwargs: object) -> Engine:
        """An engine on a new migrated database; ``engine_kwargs`` go to ``make_engine``."""
        if self.server is not None:
            url = self.server.create(template=self.template.database)
        else:
            path = self.tmp_path / f"copy-{uuid.uuid4().hex[:12]}.db"
            shutil.copyfile(self.template.database or "", path)
            url = self.template.set(database=str(path))
        engine = make_engine(url, **engine_kwargs)
        self.engines.append(engine)
        return engine

    def drop(self, engine: Engine) -> None:
        """Close the engine and delete its database."""
        engine.dispose()
        self.engines.remove(engine)
        if self.server is not None:
            self.server.drop(engine.url)
        else:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{engine.url.database}{suffix}").unlink(missing_ok=True)

    def close(self) -> None:
        """Drop every database still open."""
        for engine in list(self.engines):
            self.drop(engine)


@pytest.fixture
def database_factory(db_url: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[DatabaseFactory]:
    """Makes as many fresh migrated databases of ``db_url``'s kind as the test asks for."""
    server = request.getfixturevalue("postgres_server") if db_url.startswith("postgresql") else None
    factory = DatabaseFactory(db_url, tmp_path, server)
    yield factory
    factory.close()
