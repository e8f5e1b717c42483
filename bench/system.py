"""The system under test: PostgreSQL and Redis (scripts/services.py), a fresh database, the API
(gunicorn) and Celery workers and beat as real processes, and their CPU accounting."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from scripts.procs import BIN, Proc, wait_until  # noqa: F401  (bench.run uses them from here)
from scripts.services import free_port


def service_env(database_url: str, broker_url: str, api_key: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(DATABASE_URL=database_url, REDIS_URL=broker_url, BROKER_URL=broker_url,
               WALLET_API_KEYS=api_key, PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def _healthy(port: int) -> bool:
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def start_api(env: dict[str, str], log_dir: Path, workers: int, extra_args: list[str],
              name: str) -> Proc:
    port = free_port()
    proc = Proc(name, [str(BIN / "gunicorn"), "api:create_app()", "--bind", f"127.0.0.1:{port}",
                       "--workers", str(workers), "--graceful-timeout", "5",
                       # one control socket per instance (by default they would share one path)
                       "--control-socket", str(log_dir / f"{name}.ctl"), *extra_args],
                env, log_dir / f"{name}.log", port=port).start()
    wait_until(lambda: _healthy(port) or proc.check_alive(), 60, f"{name} on :{port}")
    return proc


def start_worker(env: dict[str, str], log_dir: Path, name: str, concurrency: int, pool: str,
                 loglevel: str, extra_args: list[str]) -> Proc:
    return Proc(name, [str(BIN / "celery"), "-A", "worker", "worker", f"--loglevel={loglevel}",
                       f"--concurrency={concurrency}", f"--pool={pool}", f"--hostname={name}@%h",
                       "--without-mingle", "--without-gossip", *extra_args],
                env, log_dir / f"{name}.log").start()


def wait_workers_ready(broker_url: str, procs: list[Proc], timeout_s: float = 90) -> None:
    """Every worker answers a control ping (works whatever the log level)."""
    from celery import Celery
    app = Celery("bench-ping", broker=broker_url, set_as_current=False)
    wanted = {p.name for p in procs}

    def all_answer() -> bool:
        for p in procs:
            p.check_alive()
        replies = app.control.ping(timeout=1.0) or []
        seen = {name.split("@", 1)[0] for reply in replies for name in reply}
        return wanted <= seen

    try:
        wait_until(all_answer, timeout_s, "workers to answer ping", interval_s=0.2)
    finally:
        app.close()


def start_beat(env: dict[str, str], log_dir: Path) -> Proc:
    schedule = log_dir / "celerybeat-schedule"
    proc = Proc("beat", [str(BIN / "celery"), "-A", "worker", "beat", "--loglevel=INFO",
                         f"--schedule={schedule}"], env, log_dir / "beat.log").start()
    wait_until(lambda: "beat: Starting" in proc.log_path.read_text(errors="replace")
               or proc.check_alive(), 60, "beat to start")
    return proc


# --- CPU accounting ------------------------------------------------------------------------------

@dataclass
class CpuGroups:
    """CPU seconds (user+system) used by each group of process trees between two snapshots.
    Processes that exit between snapshots are missed (none should, in a steady run)."""
    roots: dict[str, list[int]] = field(default_factory=dict)

    def add(self, group: str, pid: int) -> None:
        self.roots.setdefault(group, []).append(pid)

    def snapshot(self) -> dict[str, dict[int, float]]:
        out: dict[str, dict[int, float]] = {}
        for group, pids in self.roots.items():
            times: dict[int, float] = {}
            for pid in pids:
                try:
                    root = psutil.Process(pid)
                    for p in [root, *root.children(recursive=True)]:
                        try:
                            # children_*: the processes it has reaped, e.g. the backends of
                            # connections closed during the window (a pool's overflow), whose
                            # CPU would otherwise count as outside the benchmark.
                            t = p.cpu_times()
                            times[p.pid] = t.user + t.system + t.children_user + t.children_system
                        except psutil.Error:
                            pass
                except psutil.Error:
                    pass
            out[group] = times
        return out

    @staticmethod
    def delta(before: dict, after: dict) -> dict[str, float]:
        return {group: round(sum(t - before.get(group, {}).get(pid, 0.0)
                                 for pid, t in after[group].items()), 3)
                for group in after}


def postgres_pid(data_dir: Path | None) -> int | None:
    if data_dir is None:
        return None
    pidfile = data_dir / "postmaster.pid"
    try:
        return int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def redis_pid(pidfile: Path | None) -> int | None:
    try:
        return int(pidfile.read_text().strip()) if pidfile else None
    except (OSError, ValueError):
        return None
