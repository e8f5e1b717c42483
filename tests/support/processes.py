"""Real processes for end-to-end tests: gunicorn API instances, Celery workers, beat."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from scripts.services import ROOT, free_port

BIN = Path(sys.executable).parent


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.05):
    """Poll `predicate` until it returns a truthy value; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


@dataclass
class Proc:
    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    popen: subprocess.Popen | None = None
    port: int | None = None
    extra: dict = field(default_factory=dict)

    def start(self) -> "Proc":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        # A process group of its own, so a SIGKILL reaches the pool children too.
        self.popen = subprocess.Popen(self.args, env=self.env, cwd=ROOT, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive():
            os.killpg(self.popen.pid, sig)
            self.popen.wait(timeout=30)

    def stop(self, timeout_s: float = 15) -> None:
        if not self.alive():
            return
        os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()


def service_env(database_url: str, broker_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WALLET_", "PYTEST"))}
    env.update(DATABASE_URL=database_url, REDIS_URL=broker_url, BROKER_URL=broker_url,
               PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def start_api(env: dict[str, str], log_dir: Path, port: int | None = None, workers: int = 2,
              name: str = "api") -> Proc:
    port = port or free_port()
    proc = Proc(name, [str(BIN / "gunicorn"), "api:create_app()", "--bind", f"127.0.0.1:{port}",
                       "--workers", str(workers), "--graceful-timeout", "5"],
                env, log_dir / f"{name}-{port}.log", port=port).start()
    wait_until(lambda: _healthy(port) or _died(proc), 30, f"{name} on :{port} to answer /health")
    return proc


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _died(proc: Proc) -> bool:
    if not proc.alive():
        raise AssertionError(f"{proc.name} exited:\n{proc.log()[-3000:]}")
    return False


def start_worker(env: dict[str, str], log_dir: Path, name: str = "worker", concurrency: int = 2,
                 queues: str | None = None) -> Proc:
    args = [str(BIN / "celery"), "-A", "worker", "worker", "--loglevel=INFO",
            f"--concurrency={concurrency}", f"--hostname={name}@%h", "--without-mingle",
            "--without-gossip"]
    if queues:
        args.append(f"--queues={queues}")
    proc = Proc(name, args, env, log_dir / f"{name}.log").start()
    wait_until(lambda: " ready." in proc.log() or _died(proc), 60, f"{name} to be ready")
    return proc


def start_beat(env: dict[str, str], log_dir: Path) -> Proc:
    schedule = log_dir / "celerybeat-schedule"
    proc = Proc("beat", [str(BIN / "celery"), "-A", "worker", "beat", "--loglevel=INFO",
                         f"--schedule={schedule}"], env, log_dir / "beat.log").start()
    wait_until(lambda: "beat: Starting" in proc.log() or _died(proc), 30, "beat to start")
    return proc
