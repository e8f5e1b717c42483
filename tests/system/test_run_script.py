"""`make run` (scripts/run.py) stops everything it started, the embedded PostgreSQL and Redis
included, even when the stop signal comes twice (as when a supervisor signals the whole process
group and make passes its own SIGTERM on)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from scripts.services import ROOT, free_port

pytestmark = [pytest.mark.processes, pytest.mark.slow]

TREE = ("api", "common", "worker", "scripts", "migrations", "alembic.ini", "gunicorn.conf.py")


def _until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    """Running (a zombie, which nothing may have reaped yet in a container, has stopped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def tree():
    # A copy of the code, so that the run's var/ (its embedded PostgreSQL and Redis) is its own.
    path = Path(tempfile.mkdtemp(prefix="wallet-run-"))
    for name in TREE:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, path / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, path / name)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_two_sigterms_still_stop_the_embedded_postgres(tree):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("WALLET_", "DATABASE_URL", "REDIS_URL", "BROKER_URL", "PYTEST"))}
    env.update(WALLET_API_PORT=str(free_port()), WALLET_FLOWER_PORT=str(free_port()),
               WALLET_REDIS_PORT=str(free_port()))
    log = open(tree / "run.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "scripts.run"], cwd=tree, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _until(lambda: b"Wallet service is running" in (tree / "run.log").read_bytes()
               or proc.poll() is not None, 180, "make run's banner")
        assert proc.poll() is None, (tree / "run.log").read_text(errors="replace")
        postmaster = tree / "var" / "pg" / "postmaster.pid"
        pg_pid = int(postmaster.read_text().split()[0])
        redis_pid = int((tree / "var" / "redis" / "redis.pid").read_text())
        assert _alive(pg_pid) and _alive(redis_pid)
        os.killpg(proc.pid, signal.SIGTERM)  # the whole group: every process it started
        _until(lambda: b"stopping" in (tree / "run.log").read_bytes(), 30, "the clean-up to begin")
        os.kill(proc.pid, signal.SIGTERM)  # and again, as make passes it on
        assert proc.wait(90) == 0, (tree / "run.log").read_text(errors="replace")
        assert not _alive(pg_pid), "the embedded PostgreSQL was left running"
        assert not postmaster.exists()
        _until(lambda: not _alive(redis_pid), 10, "the embedded Redis to stop")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        pidfile = tree / "var" / "pg" / "postmaster.pid"
        if pidfile.exists():  # the bug this test is about: stop them anyway
            from scripts.services import Services
            Services("", "", embedded_postgres=tree / "var" / "pg",
                     embedded_redis_pidfile=tree / "var" / "redis" / "redis.pid").stop()
