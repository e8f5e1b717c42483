"""Two or more API variants loaded at the same time, so that the machine's swings hit them alike.

    .venv/bin/python -m bench.side_by_side A= B=--worker-class=gthread [--rounds 3] [--seconds 15]
        [--connections 16] [--workers 1] [--path /payments]

On this VM two runs of the same code a minute apart differ by up to 40 % in throughput and in
CPU per request (bench/NOTES.md): sequential A/B runs cannot resolve a 10 % change. Here each
variant (NAME=gunicorn arguments, comma-separated; `env:KEY=VALUE` sets the environment) is its
own gunicorn on one fresh database, and one wrk per variant (bench/wrk_payments.lua, single
payments over 10,000 accounts) drives them all at once for each round after a warm-up round.
Per round and variant: requests/s, the API's CPU per request (gunicorn master and workers,
from /proc), and PostgreSQL's (the backends serving that variant's connections, found by their
client ports; over TCP only: through a Unix socket, as the embedded server is reached, it
reads 0). No Celery worker: payments stay pending (admission control is off), which is the
API's path alone. PostgreSQL and Redis: DATABASE_URL / REDIS_URL, else embedded ones under
var/side_by_side.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import psutil

from bench.seed import seed_accounts
from bench.system import _healthy, wait_until
from scripts import services as svc
from scripts.procs import BIN
from scripts.services import free_port

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "side-by-side-key"
DATABASE = "wallet_side_by_side"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="+", metavar="NAME=ARGS")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=int, default=15)
    p.add_argument("--connections", type=int, default=16, help="per variant (16)")
    p.add_argument("--workers", type=int, default=1, help="gunicorn processes per variant (1)")
    p.add_argument("--think-ms", type=int, default=0,
                   help="each connection pauses this long before each request (0: closed loop)")
    args = p.parse_args()
    variants = dict(_variant(v) for v in args.variants)
    services = svc.ensure_services(ROOT / "var" / "side_by_side")
    url = svc.create_database(services.database_url, DATABASE, drop_first=True)
    svc.migrate(url)
    lo = _seed(url)
    log_dir = ROOT / "var" / "side_by_side" / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = {name: _start(name, gunicorn_args, env, url, services.redis_url, args.workers, log_dir)
             for name, (gunicorn_args, env) in variants.items()}
    try:
        results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in procs}
        for n in range(args.rounds + 1):  # round 0 warms up
            got = _round(procs, url, lo, args.seconds, args.connections, args.think_ms, seed=n + 1)
            if n:
                print(f"round {n}: " + " | ".join(f"{name} {rate:,.0f}/s {ms:.3f} ms/req (PG {pg:.3f})"
                                                  for name, (rate, ms, pg) in got.items()), flush=True)
                for name, value in got.items():
                    results[name].append(value)
        for name, values in results.items():
            print(f"{name}: median {statistics.median(v[0] for v in values):,.0f}/s,"
                  f" {statistics.median(v[1] for v in values):.3f} ms of API CPU and"
                  f" {statistics.median(v[2] for v in values):.3f} ms of PostgreSQL CPU per request")
    finally:
        for proc, _ in procs.values():
            proc.terminate()
        for proc, _ in procs.values():
            proc.wait(30)
        svc.drop_database(services.database_url, DATABASE)
        services.stop()


def _variant(spec: str) -> tuple[str, tuple[list[str], dict[str, str]]]:
    name, _, rest = spec.partition("=")
    gunicorn_args, env = [], {}
    for arg in filter(None, rest.split(",")):
        if arg.startswith("env:"):
            key, _, value = arg[4:].partition("=")
            env[key] = value
        else:
            gunicorn_args.append(arg)
    return name, (gunicorn_args, env)


def _seed(url: str) -> int:
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session
    from common.settings import sqlalchemy_url
    engine = create_engine(sqlalchemy_url(url))
    with Session(engine) as session:
        ids = seed_accounts(session, 10_000, Decimal("1000000"), Decimal("1000000000"))
        session.commit()
    engine.dispose()
    return min(ids)


def _start(name, gunicorn_args, extra_env, url, redis_url, workers, log_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WALLET_", "PYTEST"))}
    env.update(DATABASE_URL=url, REDIS_URL=redis_url, BROKER_URL=redis_url, WALLET_API_KEYS=API_KEY,
               WALLET_MAX_PENDING="0", WALLET_LOG_LEVEL="WARNING", **extra_env)
    port = free_port()
    with open(log_dir / f"{name}.log", "w") as log:
        proc = subprocess.Popen([str(BIN / "gunicorn"), "api:create_app()", "--bind", f"127.0.0.1:{port}",
                                 "--workers", str(workers), *gunicorn_args],
                                cwd=ROOT, env=env, stdout=log, stderr=log)
    wait_until(lambda: _healthy(port) or proc.poll() is not None, 60, f"{name} on :{port}")
    if proc.poll() is not None:
        sys.exit(f"{name} exited: see {log_dir / (name + '.log')}")
    return proc, port


def _cpu_s(pid: int) -> float:
    root = psutil.Process(pid)
    return sum(t.user + t.system for t in (p.cpu_times() for p in [root, *root.children(recursive=True)]))


def _backends(url: str, procs) -> dict[str, dict[int, float]]:
    """Per variant: the PostgreSQL backends serving its processes' connections -> their CPU so
    far. A backend's client port is the local port of a socket its gunicorn process holds."""
    from sqlalchemy import create_engine, text
    from common.settings import sqlalchemy_url
    engine = create_engine(sqlalchemy_url(url))
    with engine.connect() as conn:
        by_port = dict(conn.execute(text(
            "SELECT client_port, pid FROM pg_stat_activity WHERE client_port IS NOT NULL")).all())
    engine.dispose()
    out: dict[str, dict[int, float]] = {}
    for name, (proc, _) in procs.items():
        root = psutil.Process(proc.pid)
        ports = {c.laddr.port for p in [root, *root.children(recursive=True)]
                 for c in p.net_connections(kind="tcp") if c.raddr}
        out[name] = {}
        for port in ports & by_port.keys():
            with contextlib.suppress(psutil.NoSuchProcess):
                times = psutil.Process(by_port[port]).cpu_times()
                out[name][by_port[port]] = times.user + times.system
    return out


def _round(procs, url, lo, seconds, connections, think_ms, seed) -> dict[str, tuple[float, float, float]]:
    before = {name: _cpu_s(proc.pid) for name, (proc, _) in procs.items()}
    pg_before = _backends(url, procs)
    loads = {name: subprocess.Popen(
        ["wrk", "-t", "2", "-c", str(connections), "-d", f"{seconds}s", "--timeout", "30s",
         "-s", str(ROOT / "bench" / "wrk_payments.lua"), f"http://127.0.0.1:{port}/payments",
         "--", API_KEY, str(lo), "10000", "0", "0", str(seed), str(think_ms)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for name, (_, port) in procs.items()}
    out = {name: load.communicate()[0] for name, load in loads.items()}
    pg_after = _backends(url, procs)
    got = {}
    for name, (proc, _) in procs.items():
        requests = int(re.search(r"(\d+) requests in", out[name]).group(1))
        if re.search(r"Non-2xx or 3xx responses: (\d+)", out[name]):
            sys.exit(f"{name}: non-2xx answers:\n{out[name]}")
        # Backends opened during the round count from zero; those closed during it are lost.
        pg_s = sum(cpu - pg_before[name].get(pid, 0.0) for pid, cpu in pg_after[name].items())
        got[name] = (requests / seconds, 1000 * (_cpu_s(proc.pid) - before[name]) / requests,
                     1000 * pg_s / requests)
    return got


if __name__ == "__main__":
    main()
