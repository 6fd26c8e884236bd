"""`animabot run`, `submit`, `jobs` and `cancel` as an owner uses them: real processes, one SQLite file."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
from pathlib import Path

from test_cli import ANIMABOT, SAMPLE, animabot

ENV = {"ANIMABOT_OUTPUT_LONG_SIDE": "256", "ANIMABOT_WEB_PORT": "0", "ANIMABOT_DAILY_FREE_CREDITS": "10"}


class Running:
    """`animabot run` in the background, its output lines collected as they come."""

    def __init__(self, cwd: Path) -> None:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("ANIMABOT_")} | ENV
        self.proc = subprocess.Popen([ANIMABOT, "run"], cwd=cwd, env=environ, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        for stream in (self.proc.stdout, self.proc.stderr):
            threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream) -> None:
        for line in stream:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                assert self.proc.poll() is None, f"animabot run exited with {self.proc.returncode}"
                continue
            if text in line:
                return line
        raise AssertionError(f"no line with {text!r} within {timeout}s")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=30)


def test_run_does_the_jobs_that_submit_queues_and_prints_their_events(tmp_path):
    """Embedded mode: one process runs the jobs; the console front end prints each event once."""
    running = Running(tmp_path)
    try:
        running.wait_for("animabot running (embedded")
        running.wait_for("set ANIMABOT_DISCORD_TOKEN")
        result = animabot("submit", str(SAMPLE), "--prompt", "slow push", "--duration", "1", "--member", "g:u",
                          "--backend", "fake", "--model", "frozen,ok", "--json", cwd=tmp_path, **ENV)
        assert result.returncode == 0, result.stderr
        receipt = json.loads(result.stdout)
        assert receipt["ok"] and receipt["price_credits"] == 1
        job = receipt["job_id"]
        running.wait_for(f"job {job}: retrying: that one came out frozen")
        done = running.wait_for(f"job {job}: done:")
        assert "1 credits" in done
    finally:
        assert running.stop() == 0


def test_jobs_lists_unfinished_jobs_and_cancel_refunds_one(tmp_path):
    """Without a runtime running the job waits in the queue; cancel ends it and frees the credits."""
    result = animabot("submit", str(SAMPLE), "--prompt", "p", "--duration", "2", "--member", "g:u", "--backend",
                      "fake", cwd=tmp_path, **ENV)
    assert result.returncode == 0, result.stderr
    assert "queued, position 1" in result.stdout and "2 credits held" in result.stdout
    listed = json.loads(animabot("jobs", "--json", cwd=tmp_path, **ENV).stdout)["jobs"]
    assert [(j["state"], j["position"]) for j in listed] == [("queued", 1)]

    canceled = animabot("cancel", str(listed[0]["job_id"]), cwd=tmp_path, **ENV)
    assert canceled.returncode == 0 and "canceled" in canceled.stdout
    assert "no unfinished jobs" in animabot("jobs", cwd=tmp_path, **ENV).stdout
    again = animabot("cancel", str(listed[0]["job_id"]), cwd=tmp_path, **ENV)
    assert again.returncode == 2 and "already canceled" in again.stderr


def test_submit_refuses_bad_input_in_one_line_and_charges_nothing(tmp_path):
    """A text file is not a picture: exit 2, one line, no job."""
    bogus = tmp_path / "notes.txt"
    bogus.write_text("hello")
    result = animabot("submit", str(bogus), "--prompt", "p", "--member", "g:u", cwd=tmp_path, **ENV)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "not a picture" in result.stderr and "Traceback" not in result.stderr
    assert "no unfinished jobs" in animabot("jobs", cwd=tmp_path, **ENV).stdout


def test_redis_without_postgresql_is_refused_with_what_to_set(tmp_path):
    """Scale-out needs a database every machine can reach; the message names the setting."""
    result = animabot("run", cwd=tmp_path, ANIMABOT_REDIS_URL="redis://127.0.0.1:6379/0")
    assert result.returncode == 2
    assert "ANIMABOT_DATABASE_URL=postgresql://" in result.stderr and "Traceback" not in result.stderr


def test_worker_and_beat_explain_that_they_need_redis(tmp_path):
    """Embedded mode needs neither; the message says what `animabot run` already does."""
    for command in ("worker", "beat"):
        result = animabot(command, cwd=tmp_path)
        assert result.returncode == 2 and "ANIMABOT_REDIS_URL is not set" in result.stderr
