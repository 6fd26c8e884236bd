"""Fixtures for the reliability tests: animabot in scale-out mode, made of real processes.

Each test builds its own :class:`Deployment`: a fresh PostgreSQL database (``postgres_url`` from
``tests/conftest.py``), a private ``redis-server`` on a free port that the test may kill and restart
(the shared one on 6379 is never touched), Celery worker processes started as ``celery -A worker
worker`` and one beat process, all configured through ``ANIMABOT_*`` variables as in production.
Every worker runs in its own process group, so a kill takes its prefork children down with it, as
when a machine dies. Timings are shrunk (5 s leases, sub-second reaper and poll periods, 256 px
clips) so that recovery takes seconds; the code paths are the production ones.

Without ``redis-server`` or PostgreSQL the tests skip, or fail when ``ANIMABOT_REQUIRE_SERVICES=1``.
They run on Linux (process groups, ``/proc``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis
from celery import Celery
from sqlmodel import Session, select

from backends import video
from worker import ledger
from worker.celery import WORK, celery_config
from worker.db import init_db
from worker.jobs import JobParams
from worker.models import Attempt, Clip, Event, Job, Transfer
from worker.settings import Settings
from worker.submit import Receipt, submit

REPO = Path(__file__).resolve().parents[2]
PICTURE = REPO / "bot" / "assets" / "astronaut.png"
#: The redis-server binary the tests start (``ANIMABOT_TEST_REDIS_SERVER`` overrides the one on PATH).
REDIS_SERVER = os.environ.get("ANIMABOT_TEST_REDIS_SERVER") or shutil.which("redis-server") or "/usr/bin/redis-server"
MEMBER = ("guild-1", "user-1")

#: What every deployment runs with unless a test says otherwise: small clips, short leases, a quick
#: reaper and poller, no daily grant (so balances are exact) and a per-member cap that never binds.
#: The lease (renewed every third of it) is short enough for quick recoveries and leaves a loaded
#: machine seconds of slack: a worker that misses its renewals is not fenced off, so a takeover while it
#: still works means two workers writing one job at once (seen with 2 s leases under heavy load).
BASE_SETTINGS: dict[str, Any] = {
    "output_long_side": 256,
    "lease_seconds": 5.0,
    "reap_interval": 0.5,
    "poll_tick": 0.2,
    "fake_latency": 0.5,
    "retry_backoff": 0.5,
    "daily_free_credits": 0,
    "max_active_per_user": 1000,
    "worker_concurrency": 2,
}


def _shared_conftest() -> ModuleType:
    """``tests/conftest.py`` as a module (two conftest files cannot both be imported as ``conftest``)."""
    name = "animabot_tests_shared_conftest"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "conftest.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


service_unavailable = _shared_conftest().service_unavailable


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], Any], *, timeout: float, what: str, every: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned); fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


class RedisServer:
    """A private ``redis-server`` without persistence: a kill loses everything it held, like a crash."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *, timeout: float = 10.0) -> None:
        """Start the server (again, on the same port) and wait until it answers."""
        argv = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.workdir), "--daemonize", "no"]
        with (self.workdir / "redis.log").open("ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(self.ping, timeout=timeout, what=f"redis-server on port {self.port}")

    def ping(self) -> bool:
        """Whether the server answers."""
        try:
            with redis.Redis(port=self.port, socket_timeout=1) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def kill(self) -> None:
        """SIGKILL the server: queued and unacknowledged messages are gone."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def queued(self, queue: str = "animabot") -> int:
        """Messages waiting in ``queue`` (not those a worker has taken)."""
        with redis.Redis(port=self.port, socket_timeout=1) as client:
            return int(client.llen(queue))


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private Redis on a free port, started; the test may kill and restart it."""
    if not Path(REDIS_SERVER).is_file():
        service_unavailable(f"redis-server is not installed (looked for {REDIS_SERVER})")
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = RedisServer(workdir)
    server.start()
    yield server
    server.kill()


class Proc:
    """A worker or beat process, in its own process group, logging to a file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.popen = subprocess.Popen(argv, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        self.pid = self.popen.pid  # also the process group id

    @property
    def alive(self) -> bool:
        """Whether the main process is still running."""
        return self.popen.poll() is None

    def log(self) -> str:
        """Everything the process wrote so far."""
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 40) -> str:
        """The end of the log, for failure messages."""
        return "\n".join(self.log().splitlines()[-lines:])

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until a Celery worker says it is ready to take tasks."""
        def ready() -> bool:
            if not self.alive:
                pytest.fail(f"{self.name} exited with {self.popen.returncode}:\n{self.tail()}")
            return " ready." in self.log()

        wait_until(ready, timeout=timeout, what=f"{self.name} to be ready", every=0.1)

    def owns(self, pid: int) -> bool:
        """Whether process ``pid`` belongs to this process's group (the worker or a pool child)."""
        try:
            return os.getpgid(pid) == self.pid
        except OSError:
            return False

    def group(self) -> set[int]:
        """The live processes of the group: the main process and its pool children."""
        return {int(entry) for entry in os.listdir("/proc") if entry.isdigit() and self.owns(int(entry))}

    def kill(self) -> None:
        """``kill -9`` the whole process group, pool children included."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)


class Deployment:
    """animabot in scale-out mode for one test: its settings, database, broker and processes.

    ``overrides`` change :data:`BASE_SETTINGS`; the test process submits with the same settings the
    workers read from their environment, and wakes them through its own Celery client of the same
    broker (what ``worker.celery.kick`` does).
    """

    def __init__(self, root: Path, database_url: str, broker: RedisServer, **overrides: Any) -> None:
        self.root = root
        self.broker = broker
        values = {**BASE_SETTINGS, "data_dir": root / "data", "database_url": database_url,
                  "redis_url": broker.url, **overrides}
        self.settings = Settings(**values)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1",
                    **{f"ANIMABOT_{name.upper()}": str(value) for name, value in values.items()}}
        self.db = init_db(self.settings)
        self.client = Celery("animabot-test-client", set_as_current=False)
        self.client.conf.update(celery_config(self.settings))
        self.processes: list[Proc] = []
        self._accounts: dict[tuple[str, str], int] = {}

    # -- processes -----------------------------------------------------------------------------

    def start_worker(self, *, concurrency: int | None = None, wait: bool = True) -> Proc:
        """Start a Celery worker process as ``animabot worker`` does; by default wait until it is ready.

        Without mingle (the start-up exchange with other workers, which waits a second for answers) so
        that the many restarts stay quick; it plays no part in delivery.
        """
        number = sum(p.name.startswith("worker") for p in self.processes) + 1
        name = f"worker{number}"
        argv = [sys.executable, "-m", "celery", "-A", "worker", "worker", "-l", "info",
                "-Q", "animabot,animabot.periodic",
                "-c", str(concurrency or self.settings.worker_concurrency), "-n", f"{name}@%h", "--without-mingle"]
        proc = Proc(name, argv, self.env, self.root / f"{name}.log")
        self.processes.append(proc)
        if wait:
            proc.wait_ready()
        return proc

    def start_beat(self) -> Proc:
        """Start the one beat process (polls and the reaper)."""
        argv = [sys.executable, "-m", "celery", "-A", "worker", "beat", "-l", "info",
                "-s", str(self.root / "celerybeat-schedule")]
        proc = Proc("beat", argv, self.env, self.root / "beat.log")
        self.processes.append(proc)
        return proc

    def kick(self, n: int = 1) -> None:
        """Tell the workers ``n`` jobs need attention (one ``animabot.work`` message each)."""
        with self.client.producer_or_acquire() as producer:
            for _ in range(n):
                self.client.send_task(WORK, producer=producer)

    def close(self) -> None:
        """Kill every process this deployment started and close its connections."""
        for proc in self.processes:
            proc.kill()  # the whole group: pool children outlive a main process that died on its own
        self.client.close()
        self.db.dispose()

    def wait_until(self, predicate: Callable[[], Any], *, timeout: float, what: str, every: float = 0.05) -> Any:
        """:func:`wait_until`, with every process's log in the failure message."""
        deadline = time.monotonic() + timeout
        while not (value := predicate()):
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout:g} s waiting for {what}\n{self.logs()}")
            time.sleep(every)
        return value

    def logs(self) -> str:
        """The end of every process's log, for failure messages."""
        return "\n\n".join(f"--- {p.name} (pid {p.pid}) ---\n{p.tail()}" for p in self.processes)

    # -- members and jobs ----------------------------------------------------------------------

    def fund(self, member: tuple[str, str], credits: int) -> int:
        """Grant ``credits`` to ``member``; their account id."""
        with Session(self.db) as session:
            account = ledger.member_account(session, *member)
            assert account.id is not None
            if credits:
                ledger.grant(session, account.id, credits, key=f"test:{member[0]}:{member[1]}")
            self._accounts[member] = account.id
            return account.id

    def submit(self, model: str | None = "ok", *, backend: str | None = "fake", duration: float = 2.0,
               member: tuple[str, str] = MEMBER, key: str | None = None) -> Receipt:
        """Submit the astronaut portrait as ``member``, the way a front end does."""
        params = JobParams(prompt="a slow smile", backend=backend, model=model, duration=duration)
        return submit(self.db, self.settings, image=PICTURE.read_bytes(), params=params, member=member,
                      key=key, kick=self.kick)

    def submit_cli(self, model: str = "ok", *, backend: str = "fake", duration: float = 2.0,
                   member: tuple[str, str] = MEMBER) -> subprocess.CompletedProcess[str]:
        """Submit with ``animabot submit --json`` in a process of its own (the production ``kick`` included)."""
        argv = [sys.executable, "-m", "bot.cli", "submit", str(PICTURE), "--prompt", "a slow smile",
                "--backend", backend, "--model", model, "--duration", str(duration), "--member", ":".join(member),
                "--json"]
        return subprocess.run(argv, env=self.env, cwd=REPO, capture_output=True, text=True, timeout=120)

    def jobs(self, ids: Iterable[int] | None = None) -> list[Job]:
        """Job rows, by id."""
        with Session(self.db) as session:
            query = select(Job).order_by(Job.id)  # type: ignore[arg-type]
            if ids is not None:
                query = query.where(Job.id.in_(list(ids)))  # type: ignore[union-attr]
            return list(session.exec(query).all())

    def attempts(self, job_id: int) -> list[Attempt]:
        """A job's attempts, in order."""
        with Session(self.db) as session:
            return list(session.exec(select(Attempt).where(Attempt.job_id == job_id).order_by(Attempt.number)).all())

    def unfinished(self) -> list[Job]:
        """Jobs not in a final state."""
        return [job for job in self.jobs() if not job.job_state.terminal]

    def wait_finished(self, ids: Iterable[int], *, timeout: float) -> list[Job]:
        """Wait until every job in ``ids`` is final; the rows."""
        ids = sorted(ids)
        deadline = time.monotonic() + timeout
        while True:
            jobs = self.jobs(ids)
            if all(job.job_state.terminal for job in jobs):
                return jobs
            if time.monotonic() > deadline:
                stuck = [(job.id, job.state, job.lease_owner, job.next_run_at) for job in jobs
                         if not job.job_state.terminal]
                pytest.fail(f"jobs not finished after {timeout:g} s: {stuck}\n{self.logs()}")
            time.sleep(0.1)

    # -- what the tests check ------------------------------------------------------------------

    def check_clips(self, jobs: Iterable[Job]) -> None:
        """Every succeeded job has exactly one clip, a playable file; other jobs have none."""
        with Session(self.db) as session:
            clips = session.exec(select(Clip)).all()
        per_job: dict[int, list[Clip]] = defaultdict(list)
        for clip in clips:
            per_job[clip.job_id].append(clip)
        for job in jobs:
            assert job.id is not None
            if job.state == "succeeded":
                assert len(per_job[job.id]) == 1, f"job {job.id} has {len(per_job[job.id])} clips"
                info = video.probe(per_job[job.id][0].path)
                assert info.frames > 0 and abs(info.duration - job.duration) < 0.2
            else:
                assert per_job[job.id] == [], f"{job.state} job {job.id} has a clip"

    def check_results_published_once(self, jobs: Iterable[Job]) -> None:
        """Every final job has exactly one final event (its result), the same kind as its state."""
        with Session(self.db) as session:
            finals = session.exec(select(Event).where(Event.kind.in_(("succeeded", "failed", "canceled")))).all()  # type: ignore[attr-defined]
        per_job: dict[int, list[str]] = defaultdict(list)
        for event in finals:
            per_job[event.job_id].append(event.kind)
        for job in jobs:
            assert job.id is not None
            assert per_job[job.id] == [job.state], f"job {job.id} ({job.state}) has final events {per_job[job.id]}"

    def check_books(self, member: tuple[str, str], granted: int) -> dict[int, int]:
        """The ledger is consistent and every job was charged exactly once or refunded exactly once.

        A succeeded job that cost credits has one ``reserve`` and one ``capture`` (none for a free
        one, a ``void`` when its clip came out free); a job that did not succeed has its reservation
        voided, never captured; nothing is left held and the member's balance is what was granted
        minus the captures. Returns the credits captured per job.
        """
        account_id = self._accounts[member]
        with Session(self.db) as session:
            assert ledger.audit(session) == []
            jobs = session.exec(select(Job).where(Job.account_id == account_id)).all()
            transfers = session.exec(
                select(Transfer).where(Transfer.job_id.in_([job.id for job in jobs]))  # type: ignore[union-attr]
            ).all()
            balance = ledger.balance(session, account_id)
        kinds: dict[int, list[str]] = defaultdict(list)
        captured: dict[int, int] = {}
        for transfer in transfers:
            assert transfer.job_id is not None
            kinds[transfer.job_id].append(transfer.kind)
            if transfer.kind == "capture":
                captured[transfer.job_id] = transfer.amount
        for job in jobs:
            assert job.id is not None
            assert job.job_state.terminal, f"job {job.id} is still {job.state}"
            done = sorted(kinds[job.id])
            if not done:
                continue  # a free job: nothing reserved, nothing to resolve
            if job.state == "succeeded" and job.id in captured:
                assert done == ["capture", "reserve"], f"job {job.id}: transfers {done}"
                assert captured[job.id] == job.price_credits
            else:
                assert done == ["reserve", "void"], f"{job.state} job {job.id}: transfers {done}"
        assert balance.held == 0
        assert balance.available == granted - sum(captured.values())
        return captured


@pytest.fixture
def deploy(tmp_path: Path, postgres_url: str, redis_server: RedisServer) -> Iterator[Callable[..., Deployment]]:
    """Builds the test's deployment (settings overrides as keywords); kills its processes afterwards."""
    made: list[Deployment] = []

    def make(**overrides: Any) -> Deployment:
        root = tmp_path / f"deployment{len(made) + 1}"
        root.mkdir()
        deployment = Deployment(root, postgres_url, redis_server, **overrides)
        made.append(deployment)
        return deployment

    yield make
    for deployment in made:
        deployment.close()
