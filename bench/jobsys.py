"""What the job-system benchmarks share: a throwaway database, Celery processes, /proc accounting.

- :func:`scratch` makes a PostgreSQL database and empties a Redis database number for one run, sets the
  ``ANIMABOT_*`` environment every process of the run reads (this one included), and drops both after.
- :func:`start_worker` / :func:`start_beat` start animabot's own Celery worker and beat as subprocesses
  (``celery -A worker.celery:app``), logging to a file; :func:`stop` ends one by its pid.
- :class:`Proc` reads a process's RSS, peak RSS, PSS and CPU seconds from ``/proc`` (psutil is not a
  dependency); :func:`tree` lists a process and its descendants; :func:`pg_backends` the PostgreSQL
  server processes that serve one database (their title names it); :class:`CpuMeter` sums the CPU of
  groups of processes over a span.
- :func:`picture` is the test upload: a 256×256 JPEG crop of ``bot/assets/astronaut.png``, the
  smallest picture the default settings accept (short side ≥ 128 px) at the smallest output size.
"""

from __future__ import annotations

import io
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
PG_SERVER = "postgresql://postgres@127.0.0.1:5432"
PG_ADMIN_DB = "test"
REDIS_SERVER = "redis://127.0.0.1:6379"
_TICK = os.sysconf("SC_CLK_TCK")
_PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def picture() -> bytes:
    """The upload every benchmark job carries: the centre 256×256 of the astronaut photograph, JPEG q90."""
    from PIL import Image

    with Image.open(ROOT / "bot" / "assets" / "astronaut.png") as im:
        w, h = im.size
        crop = im.convert("RGB").crop(((w - 256) // 2, (h - 256) // 2, (w + 256) // 2, (h + 256) // 2))
    buf = io.BytesIO()
    crop.save(buf, "JPEG", quality=90)
    return buf.getvalue()


@dataclass
class Scratch:
    """One run's database, Redis database and data folder."""

    database: str
    database_url: str
    redis_url: str
    data_dir: Path
    env: dict[str, str]


@contextmanager
def scratch(name: str, *, redis_db: int, **settings: object) -> Iterator[Scratch]:
    """A fresh PostgreSQL database ``bench_<name>_<pid>`` and Redis db ``redis_db`` for one run.

    ``settings`` become ``ANIMABOT_<NAME>`` variables, set in ``os.environ`` (so ``Settings()`` and
    ``worker.celery`` in this process see them when first imported) and in :attr:`Scratch.env` for the
    subprocesses. Everything is removed again at the end, data folder included.
    """
    import shutil

    import redis
    import sqlalchemy as sa

    database = f"bench_{name}_{os.getpid()}"
    admin = sa.create_engine(f"{PG_SERVER}/{PG_ADMIN_DB}", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        conn.execute(sa.text(f'CREATE DATABASE "{database}"'))
    redis_url = f"{REDIS_SERVER}/{redis_db}"
    broker = redis.Redis.from_url(redis_url)
    broker.flushdb()
    data_dir = OUT / name
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    env_vars = {
        "ANIMABOT_DATABASE_URL": f"{PG_SERVER}/{database}",
        "ANIMABOT_REDIS_URL": redis_url,
        "ANIMABOT_DATA_DIR": str(data_dir),
        **{f"ANIMABOT_{key.upper()}": str(value) for key, value in settings.items()},
    }
    os.environ.update(env_vars)
    try:
        yield Scratch(database, env_vars["ANIMABOT_DATABASE_URL"], redis_url, data_dir, {**os.environ})
    finally:
        broker.flushdb()
        broker.close()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        admin.dispose()
        shutil.rmtree(data_dir / "media", ignore_errors=True)  # thousands of clips; the logs stay


def start_worker(env: dict[str, str], log: Path, *, concurrency: int = 2, argv: Sequence[str] | None = None,
                 queues: str = "animabot,animabot.periodic") -> subprocess.Popen[bytes]:
    """animabot's Celery worker (prefork, ``-c concurrency``) on ``queues``, logging at INFO.

    ``argv`` replaces the ``python -m celery -A worker.celery:app`` prefix (e.g. a script that patches
    something first and then calls ``app.worker_main``).
    """
    prefix = list(argv or [sys.executable, "-m", "celery", "-A", "worker.celery:app"])
    return _spawn([*prefix, "worker", "-l", "info", "-Q", queues, "-c", str(concurrency)], env, log)


def start_beat(env: dict[str, str], log: Path, schedule: Path, *, argv: Sequence[str] | None = None,
               ) -> subprocess.Popen[bytes]:
    """animabot's Celery beat (polls every ``poll_tick``, reaper every ``reap_interval``); ``argv`` as above."""
    prefix = list(argv or [sys.executable, "-m", "celery", "-A", "worker.celery:app"])
    return _spawn([*prefix, "beat", "-l", "info", "-s", str(schedule)], env, log)


def _spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen[bytes], *, grace: float = 60.0) -> None:
    """Warm shutdown (SIGTERM: running tasks finish), then SIGKILL after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass(frozen=True)
class Proc:
    """One process as ``/proc`` shows it now."""

    pid: int

    def _status(self) -> dict[str, int]:
        out = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0])
        return out

    def rss_kib(self) -> int:
        """Resident set size now."""
        return self._status().get("VmRSS", 0)

    def peak_rss_kib(self) -> int:
        """Largest resident set size so far (``VmHWM``)."""
        return self._status().get("VmHWM", 0)

    def pss_kib(self) -> int:
        """Proportional set size: pages shared with other processes (forked workers) count once in total."""
        with open(f"/proc/{self.pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
        return 0

    def cpu_seconds(self) -> float:
        """User + system CPU of the process and of its children it has waited for (e.g. ffmpeg)."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return sum(int(x) for x in fields[11:15]) / _TICK

    def title(self) -> str:
        """The command line (a PostgreSQL backend's shows its user, database and client)."""
        with open(f"/proc/{self.pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()


def tree(pid: int) -> list[Proc]:
    """``pid`` and every live descendant."""
    out = [Proc(pid)]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except FileNotFoundError:
        return []
    for child in children:
        out += tree(child)
    return out


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def pg_backends(database: str) -> list[Proc]:
    """The PostgreSQL server processes serving ``database`` (their title is ``postgres: user db host ...``)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _comm(int(entry)) == "postgres":
            try:
                title = Proc(int(entry)).title()
            except OSError:
                continue
            if re.search(rf"\s{re.escape(database)}\s", title + " "):
                found.append(Proc(int(entry)))
    return found


def redis_server(port: int = 6379) -> list[Proc]:
    """The Redis server listening on ``port`` (its title is ``redis-server 127.0.0.1:6379``)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _comm(int(entry)) == "redis-server":
            with suppress(OSError):
                if Proc(int(entry)).title().endswith(f":{port}"):
                    found.append(Proc(int(entry)))
    return found


def pool(pid: int) -> list[Proc]:
    """A Celery worker and its pool processes (their own children, e.g. ffmpeg, count in their CPU once reaped)."""
    procs = tree(pid)
    return [p for p in procs if p.pid == pid or _ppid(p.pid) == pid]


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return 0


class CpuMeter:
    """CPU seconds that groups of processes use over a span, sampled every second.

    ``groups`` maps a name to a callable listing the group's processes now. A process present at the
    first sample counts from there; one that appears later counts from zero (it was born in the span);
    one that vanishes counts up to its last sample.
    """

    def __init__(self, groups: dict[str, Callable[[], list[Proc]]], every: float = 1.0) -> None:
        self.groups, self.every = groups, every
        self.first: dict[str, dict[int, float]] = {name: {} for name in groups}
        self.last: dict[str, dict[int, float]] = {name: {} for name in groups}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.wall = 0.0

    def sample(self, *, initial: bool = False) -> None:
        """Read every group's processes once."""
        for name, procs in self.groups.items():
            for p in procs():
                with suppress(OSError, ValueError, IndexError):
                    cpu = p.cpu_seconds()
                    if initial:
                        self.first[name][p.pid] = cpu
                    self.last[name][p.pid] = cpu

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def __enter__(self) -> CpuMeter:
        self.sample(initial=True)
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
        self.wall = time.monotonic() - self._t0

    def seconds(self) -> dict[str, float]:
        """CPU seconds per group over the span."""
        return {name: sum(cpu - self.first[name].get(pid, 0.0) for pid, cpu in self.last[name].items())
                for name in self.groups}

    def shares(self) -> dict[str, float]:
        """CPU per group as a fraction of one core over the span."""
        return {name: cpu / self.wall for name, cpu in self.seconds().items()}


def cpu_of(procs: Sequence[Proc]) -> float:
    """Summed CPU seconds of ``procs`` (those that vanished meanwhile count zero)."""
    total = 0.0
    for p in procs:
        with suppress(OSError):
            total += p.cpu_seconds()
    return total


def load_average() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


def pct(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``values``, nearest rank; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def median(values: Sequence[float]) -> float:
    """Median, NaN when empty."""
    return statistics.median(values) if values else float("nan")


def wait_for(check: object, *, timeout: float, every: float = 0.5, what: str = "condition") -> float:
    """Call ``check()`` every ``every`` seconds until it is truthy; seconds waited (TimeoutError after ``timeout``)."""
    t0 = time.monotonic()
    while not check():  # type: ignore[operator]
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{what} did not happen within {timeout:g} s")
        time.sleep(every)
    return time.monotonic() - t0


_TASK_DONE = re.compile(r"^\[(?P<at>[\d-]+ [\d:,]+): INFO/\S+\] Task (?P<name>[\w.]+)\[[^\]]+\] succeeded in "
                        r"(?P<secs>[\d.e-]+)s")


def task_runs(log: Path) -> list[tuple[float, str, float]]:
    """``(epoch second it ended, task name, seconds it ran)`` for every task a worker log says succeeded."""
    from datetime import datetime

    runs = []
    for line in log.read_text(errors="replace").splitlines():
        m = _TASK_DONE.match(line)
        if m:
            at = datetime.strptime(m["at"], "%Y-%m-%d %H:%M:%S,%f").timestamp()  # the worker's local time
            runs.append((at, m["name"], float(m["secs"])))
    return runs
