"""`make run`: the whole system on this machine, in the foreground; Ctrl-C stops it all.

PostgreSQL and Redis come from DATABASE_URL / REDIS_URL, else embedded ones with data under
./var/. Then: migrations, the API (gunicorn, :8080), a worker, beat (the sweeper) and Flower
(:5555). A development API key is made once and kept in ./var/dev-api-key.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from scripts.services import ROOT, create_database, ensure_services, migrate

VAR = ROOT / "var"
BIN = Path(sys.executable).parent
API_PORT = int(os.environ.get("WALLET_API_PORT", "8080"))
FLOWER_PORT = int(os.environ.get("WALLET_FLOWER_PORT", "5555"))


def dev_secret(name: str, make) -> str:
    path = VAR / name
    if not path.exists():
        VAR.mkdir(exist_ok=True)
        path.write_text(make())
        path.chmod(0o600)
    return path.read_text().strip()


def main(cluster=None) -> int:
    """`cluster` (`make run-ha`): a scripts.ha.Cluster to run on instead of one PostgreSQL."""
    # SIGTERM stops everything like Ctrl-C does, from the first moment: no orphans.
    signal.signal(signal.SIGTERM, _interrupt)
    VAR.mkdir(exist_ok=True)
    redis_port = int(os.environ.get("WALLET_REDIS_PORT", "6390"))
    services = None
    procs: dict[str, subprocess.Popen] = {}
    try:
        if cluster is None:
            services = ensure_services(VAR, redis_port=redis_port)
            database_url = os.environ.get("DATABASE_URL") or create_database(services.database_url, "wallet")
        else:
            server_url = cluster.start()
            services = ensure_services(VAR, env={**os.environ, "DATABASE_URL": server_url},
                                       redis_port=redis_port)
            database_url = cluster.create_database("wallet")
        return _run(services, procs, database_url, cluster.banner() if cluster else "")
    except KeyboardInterrupt:
        print("stopping...", flush=True)
        return 0
    finally:
        # Nothing may cut the clean-up short: a second signal (make passes its SIGTERM on to this
        # process, so a SIGTERM to the process group arrives twice; Ctrl-C pressed again) would
        # leave the embedded PostgreSQL running. The clean-up is bounded by the waits below.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if services:
            services.stop()
        if cluster:
            cluster.stop()


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def _run(services, procs: dict[str, subprocess.Popen], database_url: str, more_banner: str = "") -> int:
    migrate(database_url)

    api_key = os.environ.get("WALLET_API_KEYS", "").split(",")[0] or \
        dev_secret("dev-api-key", lambda: "dev_" + secrets.token_urlsafe(24))
    flower_auth = os.environ.get("FLOWER_BASIC_AUTH") or \
        dev_secret("flower-auth", lambda: "admin:" + secrets.token_urlsafe(12))
    metrics_dir = VAR / "metrics"  # every process's Prometheus counters, summed by /metrics
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir()
    env = {**os.environ, "DATABASE_URL": database_url, "REDIS_URL": services.redis_url,
           "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
           "WALLET_API_KEYS": os.environ.get("WALLET_API_KEYS") or api_key,
           "FLOWER_BASIC_AUTH": flower_auth, "PYTHONUNBUFFERED": "1",
           # a local receiver (http://localhost:...) may be registered as a webhook endpoint
           "WALLET_WEBHOOK_ALLOW_PRIVATE": os.environ.get("WALLET_WEBHOOK_ALLOW_PRIVATE", "1")}
    commands = {
        "api": [BIN / "gunicorn", "api:create_app()", "--bind", f"0.0.0.0:{API_PORT}", "--workers", "2"],
        "worker": [BIN / "celery", "-A", "worker", "worker", "--loglevel=INFO"],
        "beat": [BIN / "celery", "-A", "worker", "beat", "--loglevel=INFO",
                 f"--schedule={VAR / 'celerybeat-schedule'}"],
        "flower": [BIN / "celery", "-A", "worker", "flower", f"--port={FLOWER_PORT}",
                   f"--basic-auth={flower_auth}"],
    }
    # For operator commands in another shell: `set -a; . var/env; set +a`, then
    # `.venv/bin/flask --app api wallet reconcile` (or `make reconcile`).
    (VAR / "env").write_text(f"DATABASE_URL={database_url}\nREDIS_URL={services.redis_url}\n")
    logs = VAR / "logs"
    logs.mkdir(exist_ok=True)
    for name, cmd in commands.items():
        procs[name] = subprocess.Popen([str(c) for c in cmd], env=env, cwd=ROOT,
                                       stdout=open(logs / f"{name}.log", "ab"), stderr=subprocess.STDOUT)
    if not _wait_ready(procs, logs):
        return 1
    print(f"""
Wallet service is running.
  API        http://localhost:{API_PORT}   (try: curl http://localhost:{API_PORT}/health)
  API key    {api_key}
             export WALLET_KEY={api_key}
  Flower     http://localhost:{FLOWER_PORT}   (basic auth {flower_auth})
  Database   {database_url}
  Broker     {services.redis_url}
  Logs       {logs}/{{api,worker,beat,flower}}.log
  Operators  make reconcile   (reads var/env: DATABASE_URL, REDIS_URL)
{more_banner}Press Ctrl-C to stop.
""", flush=True)
    while True:
        for name, proc in procs.items():
            if proc.poll() is not None:
                print(f"{name} exited with {proc.returncode}; see {logs / (name + '.log')}", flush=True)
                return 1
        time.sleep(0.5)


def _wait_ready(procs: dict, logs: Path, timeout_s: float = 90) -> bool:
    """Print the banner only once the API answers and the worker consumes, so that the README's
    walk-through works the moment it appears."""
    import urllib.request

    def api_up() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{API_PORT}/health", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def worker_up() -> bool:
        log = logs / "worker.log"
        return log.exists() and " ready." in log.read_text(errors="replace")

    deadline = time.monotonic() + timeout_s
    while not (api_up() and worker_up()):
        dead = [name for name, proc in procs.items() if proc.poll() is not None]
        if dead or time.monotonic() > deadline:
            print(f"could not start ({', '.join(dead) or 'timeout'}); see {logs}", flush=True)
            return False
        time.sleep(0.2)
    return True


if __name__ == "__main__":
    sys.exit(main())
