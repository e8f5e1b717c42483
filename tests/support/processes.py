"""Real processes for end-to-end tests: gunicorn API instances, Celery workers, beat."""
from __future__ import annotations

import os
from pathlib import Path

import httpx

from scripts.procs import BIN, Proc, wait_until  # noqa: F401  (re-exported for the tests)
from scripts.services import free_port


def check_allowed(what: str) -> None:
    """`make test-fast` promises no processes but PostgreSQL and Redis: it sets
    WALLET_TESTS_NO_PROCESSES, and a test that would start one anyway fails here, loudly."""
    if os.environ.get("WALLET_TESTS_NO_PROCESSES"):
        raise AssertionError(f"this test starts {what}: mark it `processes` (make test-fast runs"
                             " only tests that start no processes)")


def service_env(database_url: str, broker_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WALLET_", "PYTEST"))}
    env.update(DATABASE_URL=database_url, REDIS_URL=broker_url, BROKER_URL=broker_url,
               PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def start_api(env: dict[str, str], log_dir: Path, port: int | None = None, workers: int = 2,
              name: str = "api") -> Proc:
    check_allowed("gunicorn")
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
    return proc.check_alive()


def start_worker(env: dict[str, str], log_dir: Path, name: str = "worker", concurrency: int = 2,
                 queues: str | None = None) -> Proc:
    check_allowed("a Celery worker")
    args = [str(BIN / "celery"), "-A", "worker", "worker", "--loglevel=INFO",
            f"--concurrency={concurrency}", f"--hostname={name}@%h", "--without-mingle",
            "--without-gossip"]
    if queues:
        args.append(f"--queues={queues}")
    proc = Proc(name, args, env, log_dir / f"{name}.log").start()
    wait_until(lambda: " ready." in proc.log() or _died(proc), 60, f"{name} to be ready")
    return proc


def start_beat(env: dict[str, str], log_dir: Path) -> Proc:
    check_allowed("Celery beat")
    schedule = log_dir / "celerybeat-schedule"
    proc = Proc("beat", [str(BIN / "celery"), "-A", "worker", "beat", "--loglevel=INFO",
                         f"--schedule={schedule}"], env, log_dir / "beat.log").start()
    wait_until(lambda: "beat: Starting" in proc.log() or _died(proc), 30, "beat to start")
    return proc
