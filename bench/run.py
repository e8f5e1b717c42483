"""`make bench` (`python -m bench.run`): SPEC section 7, in one run.

1. PostgreSQL and Redis: DATABASE_URL / REDIS_URL if set, else embedded ones under var/bench/.
2. A fresh database `wallet_bench` (dropped and migrated) with N funded accounts (10,000), and a
   fresh `wallet_bench_ref` made by the same migrations for the pgbench reference.
3. The reference: pgbench with bench/pgbench_payment.sql (one payment per transaction), uniform
   buyer and one hot buyer, 32 clients, on the same server - run before the system starts.
4. The system: gunicorn (`--api-procs` gthread workers: one master by default, or one master per
   process with `--api-layout instances`), `--workers` Celery worker processes (each
   `--worker-concurrency` with `--worker-pool`), and beat (the sweeper).
5. Scenarios, each on the same database one after the other, each drained before the next:
   uniform single payments, single payments from one hot buyer, non-atomic batches of 100, all
   at `--clients` concurrent connections sending as fast as they are answered (wrk, else the
   Python client of bench/load.py in this process); then 'paced': uniform single payments
   offered at a fixed rate (the Python client), half of what 'uniform' sustained (or `--paced-rate`), the latency a client
   sees when the system is not saturated.
   'idle' (run first, on the quiet system; bench/idle.py): single payments one at a time, each
   polled until terminal: the time from POST to the poll that sees it (target: median < 50 ms).
6. reconcile (common.ledger.reconcile) over the whole database.
7. bench/results/<UTC timestamp>.json and .png, and a table on stdout.

Rates and latencies are measured over a steady window: from `--warmup` seconds after the load
starts to the moment it stops (the drain that follows is timed separately).
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import random
import secrets
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import psutil
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from bench import idle
from bench import load as loadgen
from bench import metrics, reference, report, system, wrk
from bench.seed import seed_accounts
from common.ledger import reconcile
from common.settings import sqlalchemy_url
from scripts import services as svc

ROOT = svc.ROOT
RESULTS = Path(__file__).with_name("results")
SCENARIOS = ("idle", "uniform", "hot", "batch", "paced")
FALLBACK_PACED_RATE = 600.0  # 'paced' without a 'uniform' run before it to take half of
TARGETS_IDLE_MS = 50  # median POST -> a poll that sees it terminal, on an idle system
TARGETS = {"single_completed_per_s": 1000, "acceptance_p99_ms": 50, "completion_p99_ms": 1000}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load per scenario (20)")
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds excluded at the start of each scenario (default: 15%% of duration, at least 1)")
    p.add_argument("--accounts", type=int, default=10_000)
    p.add_argument("--clients", type=int, default=32, help="concurrent HTTP connections (32)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--paced-rate", type=float, default=None,
                   help="the 'paced' scenario: uniform single payments offered at this many per"
                        " second in all (not as fast as answered), for latency below saturation;"
                        " default: half the rate 'uniform' sustained earlier in the run (SPEC 7),"
                        f" or {FALLBACK_PACED_RATE:g}/s when it did not run")
    p.add_argument("--idle-payments", type=int, default=60,
                   help="the 'idle' scenario: payments sent one at a time (60)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help=f"comma-separated subset of {','.join(SCENARIOS)}")
    p.add_argument("--api-procs", type=int, default=2, help="gunicorn worker processes (2)")
    p.add_argument("--api-layout", choices=("workers", "instances"), default="workers",
                   help="workers: one gunicorn master with --api-procs workers (default);"
                        " instances: --api-procs gunicorn masters of 1 worker each, on their own ports")
    p.add_argument("--gunicorn-arg", action="append", default=[],
                   help="extra gunicorn argument (repeatable), e.g. --gunicorn-arg=--worker-class=gthread")
    p.add_argument("--workers", type=int, default=2, help="Celery worker processes (2)")
    p.add_argument("--worker-concurrency", type=int, default=1, help="--concurrency of each worker (1)")
    p.add_argument("--worker-pool", default="prefork", help="--pool of each worker (prefork)")
    p.add_argument("--worker-loglevel", default="INFO")
    p.add_argument("--worker-arg", action="append", default=[], help="extra celery worker argument")
    p.add_argument("--loadgen", choices=("auto", "python", "wrk"), default="auto",
                   help="auto: wrk (with bench/wrk_payments.lua) when on PATH, else the Python client (bench/load.py)")
    p.add_argument("--no-beat", action="store_true", help="do not run beat (the sweeper)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for the API and workers, e.g. WALLET_DISPATCH_WINDOW_MS=5")
    p.add_argument("--reference-duration", type=float, default=None,
                   help="seconds per pgbench run (default: --duration)")
    p.add_argument("--pgbench-mode", choices=("simple", "extended", "prepared"), default="prepared")
    p.add_argument("--no-reference", action="store_true", help="skip pgbench")
    p.add_argument("--drain-timeout", type=float, default=120.0)
    p.add_argument("--smoke", action="store_true",
                   help="tiny run for tests: 2 s scenarios, 300 accounts, 8 clients, 2 s pgbench")
    p.add_argument("--output", type=Path, default=None,
                   help="result JSON path (default bench/results/<UTC timestamp>.json); PNG beside it")
    p.add_argument("--var-dir", type=Path, default=ROOT / "var" / "bench",
                   help="embedded services' data and logs (var/bench)")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    if args.smoke:
        args.duration = min(args.duration, 2.0)
        args.accounts = min(args.accounts, 300)
        args.clients = min(args.clients, 8)
        args.reference_duration = args.reference_duration or 2.0
        args.warmup = 0.5 if args.warmup is None else args.warmup
        args.drain_timeout = min(args.drain_timeout, 60.0)
        args.paced_rate = min(args.paced_rate or 50.0, 50.0)
        args.idle_payments = min(args.idle_payments, 5)
    if args.warmup is None:
        args.warmup = max(1.0, 0.15 * args.duration)
    if args.warmup >= args.duration:
        p.error("--warmup must be shorter than --duration")
    args.reference_duration = args.reference_duration or args.duration
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    if args.accounts < 3:
        p.error("--accounts must be at least 3")
    return args


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- machine facts -------------------------------------------------------------------------------

def machine_facts(engine, broker_url: str) -> dict:
    cpu_model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    with engine.connect() as conn:
        pg_version = conn.execute(text("SHOW server_version")).scalar_one()
        pg_settings = dict(conn.execute(text(
            "SELECT name, setting FROM pg_settings WHERE name IN ('shared_buffers', 'max_connections',"
            " 'synchronous_commit', 'fsync', 'wal_level', 'max_wal_size')")).all())
    import redis
    redis_version = redis.Redis.from_url(broker_url).info("server").get("redis_version")
    from importlib.metadata import version
    packages = {}
    for name in ("celery", "kombu", "flask", "gunicorn", "sqlalchemy", "psycopg2-binary", "redis",
                 "pgserver"):
        try:
            packages[name] = version(name)
        except Exception:
            packages[name] = None
    try:
        pgbench_version = subprocess.run([reference.pgbench_binary(), "--version"], capture_output=True,
                                         text=True).stdout.strip()
    except Exception:
        pgbench_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip() or None
    except OSError:
        commit = None
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "ram_bytes": psutil.virtual_memory().total,
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "postgresql": pg_version,
        "postgresql_settings": pg_settings,
        "redis": redis_version,
        "pgbench": pgbench_version,
        "packages": packages,
        "git_commit": commit,
        "loadavg_at_start": list(os.getloadavg()),
    }


# --- the run -------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.procs: list[system.Proc] = []
        self.services: svc.Services | None = None
        self.log_dir = args.var_dir / "logs" / dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.api_key = "bench_" + secrets.token_urlsafe(24)
        self.rng = random.Random(args.seed)
        self.cpu = system.CpuGroups()

    def run(self) -> dict:
        a = self.args
        started = dt.datetime.now(dt.timezone.utc)
        result: dict = {"started_at": started.strftime("%Y-%m-%dT%H:%M:%SZ"), "targets": TARGETS,
                        "config": self._config()}
        try:
            log(f"services under {a.var_dir} (unless DATABASE_URL / REDIS_URL are set)")
            self.services = svc.ensure_services(a.var_dir)
            database_url = svc.create_database(self.services.database_url, "wallet_bench", drop_first=True)
            svc.migrate(database_url)
            engine = create_engine(sqlalchemy_url(database_url), pool_size=2)
            result["machine"] = machine_facts(engine, self.services.redis_url)

            if not a.no_reference:
                result["reference"] = self._reference()
                result["reference_reconcile"] = {"ok": not self.reference_reconcile_problems,
                                                 "problems": self.reference_reconcile_problems}
            else:
                result["reference"] = {}

            t = time.perf_counter()
            with Session(engine) as session, session.begin():
                account_ids = seed_accounts(session, a.accounts, Decimal("1000000"), Decimal("1000000000"))
            # As the reference's database is: with statistics. Without them (autovacuum's first
            # ANALYZE comes up to a minute later, never where autovacuum is off) the planner
            # takes the 10,000 accounts for a few hundred, and the workers' balance UPDATE
            # seq-scans them in every transaction (seen: 53 scans/s, one per transaction).
            with engine.execution_options(isolation_level="AUTOCOMMIT").connect() as conn:
                conn.execute(text("VACUUM ANALYZE"))
            result["seed"] = {"accounts": len(account_ids), "seconds": round(time.perf_counter() - t, 2)}
            log(f"seeded {len(account_ids)} accounts in {result['seed']['seconds']} s")

            urls = self._start_system(database_url)
            result["scenarios"] = []
            for name in a.scenarios:
                if name == "idle":
                    log(f"scenario 'idle': {a.idle_payments} payments one at a time, each polled until terminal")
                    result["idle"] = idle.run(urls[0], self.api_key, account_ids, self.rng,
                                              count=a.idle_payments)
                    log(f"  POST -> terminal seen: p50 {result['idle']['completion_seen_ms']['p50']} ms,"
                        f" p90 {result['idle']['completion_seen_ms']['p90']} ms"
                        f" (accept p50 {result['idle']['acceptance_latency_ms']['p50']} ms)")
                    continue
                rate = self._paced_rate(result["scenarios"]) if name == "paced" else None
                result["scenarios"].append(self._scenario(name, engine, urls, account_ids, result["reference"],
                                                          rate))

            with Session(engine) as session:
                problems = reconcile(session)
            result["reconcile"] = {"ok": not problems, "problems": problems[:50]}
            log("reconcile " + ("OK" if not problems else f"FAILED ({len(problems)} problems)"))
            result["finished_at"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            result["logs"] = str(self.log_dir)
            engine.dispose()
            return result
        finally:
            self._stop()

    def _config(self) -> dict:
        a = self.args
        return {"duration_s": a.duration, "warmup_s": a.warmup, "accounts": a.accounts,
                "clients": a.clients, "batch_size": a.batch_size, "paced_rate_per_s": a.paced_rate,
                "idle_payments": a.idle_payments,
                "scenarios": a.scenarios,
                "api_procs": a.api_procs, "api_layout": a.api_layout, "gunicorn_args": a.gunicorn_arg,
                "workers": a.workers, "worker_concurrency": a.worker_concurrency,
                "worker_pool": a.worker_pool, "worker_loglevel": a.worker_loglevel,
                "worker_args": a.worker_arg, "beat": not a.no_beat, "env": a.env,
                "reference_duration_s": a.reference_duration, "pgbench_mode": a.pgbench_mode,
                "smoke": a.smoke, "loadgen": a.loadgen,
                "seed": a.seed}

    def _reference(self) -> dict:
        a = self.args
        ref_url = svc.create_database(self.services.database_url, "wallet_bench_ref", drop_first=True)
        svc.migrate(ref_url)
        engine = create_engine(sqlalchemy_url(ref_url))
        clients = a.clients
        with Session(engine) as session, session.begin():
            variables = reference.prepare(session, a.accounts, clients, a.reference_duration)
        with engine.execution_options(isolation_level="AUTOCOMMIT").connect() as conn:
            conn.execute(text("VACUUM ANALYZE"))

        def completed() -> int:
            with engine.connect() as conn:
                return conn.execute(text(
                    "SELECT count(*) FROM payments WHERE status = 'completed'")).scalar_one()
        out = {}
        for variant in reference.VARIANTS:
            log(f"pgbench reference '{variant}': {clients} clients, {a.reference_duration} s")
            before = completed()
            r = reference.run(ref_url, variables, variant, clients, threads=min(2, clients),
                              duration_s=a.reference_duration, mode=a.pgbench_mode,
                              log_path=self.log_dir / f"pgbench-{variant}.log")
            out[variant] = r.__dict__
            # Each transaction completes a pending payment of its own (until a client's share
            # wraps around): the count shows the script did the work it claims.
            out[variant]["payments_completed"] = completed() - before
            log(f"  {r.tps:,.0f} tps, latency avg {r.latency_avg_ms} ms, failed {r.failed},"
                f" {out[variant]['payments_completed']} payments completed"
                f" of {r.transactions} transactions")
        with Session(engine) as session:
            # pgbench's one-payment transaction (SPEC section 7) writes no events: the ledger only.
            self.reference_reconcile_problems = reconcile(session, events=False)[:20]
        engine.dispose()
        svc.drop_database(self.services.database_url, "wallet_bench_ref")
        return out

    def _start_system(self, database_url: str) -> list[str]:
        a = self.args
        extra = dict(kv.split("=", 1) for kv in a.env)
        env = system.service_env(database_url, self.services.redis_url, self.api_key, **extra)
        pg = system.postgres_pid(self.services.embedded_postgres)
        if pg:
            self.cpu.add("postgres", pg)
        rd = system.redis_pid(self.services.embedded_redis_pidfile)
        if rd:
            self.cpu.add("redis", rd)
        workers = [system.start_worker(env, self.log_dir, f"bench{i + 1}", a.worker_concurrency,
                                       a.worker_pool, a.worker_loglevel, a.worker_arg)
                   for i in range(a.workers)]
        self.procs += workers
        if a.api_layout == "workers":
            apis = [system.start_api(env, self.log_dir, a.api_procs, a.gunicorn_arg, "api")]
        else:
            apis = [system.start_api(env, self.log_dir, 1, a.gunicorn_arg, f"api{i + 1}")
                    for i in range(a.api_procs)]
        self.procs += apis
        system.wait_workers_ready(self.services.redis_url, workers)
        if not a.no_beat:
            beat = system.start_beat(env, self.log_dir)
            self.procs.append(beat)
            self.cpu.add("beat", beat.popen.pid)
        for p in apis:
            self.cpu.add("api", p.popen.pid)
        for p in workers:
            self.cpu.add("workers", p.popen.pid)
        log(f"system up: {len(apis)} gunicorn master(s), {a.api_procs} API process(es),"
            f" {a.workers} worker(s) x{a.worker_concurrency} {a.worker_pool}; logs in {self.log_dir}")
        return [f"http://127.0.0.1:{p.port}" for p in apis]

    def _paced_rate(self, done: list[dict]) -> float:
        """SPEC 7: acceptance latency "when single payments are offered at half the rate the
        system sustains", i.e. half of what `uniform` completed per second in this run."""
        if self.args.paced_rate:
            return self.args.paced_rate
        uniform = next((s for s in done if s["name"] == "uniform" and s.get("completed_per_s")), None)
        return round(uniform["completed_per_s"] / 2, 1) if uniform else FALLBACK_PACED_RATE

    def _scenario(self, name: str, engine, urls: list[str], account_ids: list[int],
                  ref: dict, rate: float | None = None) -> dict:
        a = self.args
        hot = account_ids[0]
        use_wrk = self._use_wrk(urls, account_ids) and name != "paced"  # wrk cannot pace
        if name == "batch":
            path, per_request = "/payments/batch", a.batch_size
        else:
            path, per_request = "/payments", 1
        if not use_wrk:  # encoded before the clock starts
            bodies = (loadgen.batch_bodies(account_ids, 300, a.batch_size, self.rng) if name == "batch"
                      else loadgen.single_bodies(account_ids, 20_000, hot if name == "hot" else None,
                                                 self.rng))
        with engine.connect() as conn:
            first_id = conn.execute(text("SELECT coalesce(max(id), 0) + 1 FROM payments")).scalar_one()
        log(f"scenario '{name}': {a.clients} clients, {a.duration} s (warm-up {a.warmup} s),"
            f" load generator {'wrk' if use_wrk else 'python'}"
            + (f", paced at {rate:g}/s" if rate else ""))
        cpu_before, sys_before = self.cpu.snapshot(), psutil.cpu_times()
        if use_wrk:
            client, window_start, window_end, client_cpu, client_wall = wrk.run(
                urls[0] + path, self.api_key, account_ids[0], len(account_ids),
                hot if name == "hot" else 0, a.batch_size if name == "batch" else 0, a.seed,
                a.clients, a.duration, a.warmup, self.log_dir / f"wrk-{name}.log")
        else:
            load = loadgen.run_load([u + path for u in urls], bodies, per_request, self.api_key,
                                    a.clients, a.duration,
                                    rate=rate)
            client = metrics.client_metrics(load, a.warmup, a.duration)
            window_start, window_end = load.started + a.warmup, load.started + a.duration
            client_cpu, client_wall = load.cpu_s, load.duration_s
        cpu_after, sys_after = self.cpu.snapshot(), psutil.cpu_times()
        load_end = time.perf_counter()
        # wrk abandons the requests in flight when it stops, but the API still serves them (they
        # wait in gunicorn's listen backlog): none takes longer than the slowest answer seen, so
        # the drain is not over before that much time has passed.
        settle_until = load_end + (client["acceptance_latency_ms"]["max"] or 0) / 1000 + 0.5 \
            if use_wrk else load_end
        for p in self.procs:
            p.check_alive()
        with engine.connect() as conn:
            backlog = conn.execute(text(
                "SELECT count(*) FROM payments WHERE id >= :f AND status = 'pending'"), {"f": first_id}).scalar_one()

        def drained():
            if time.perf_counter() < settle_until:
                return False
            with engine.connect() as conn:
                return conn.execute(text(
                    "SELECT count(*) = 0 FROM payments WHERE id >= :f AND status = 'pending'"),
                    {"f": first_id}).scalar_one()
        try:
            system.wait_until(drained, a.drain_timeout, f"scenario {name} to drain", interval_s=0.1)
            drain_s = round(time.perf_counter() - load_end, 2)
        except RuntimeError:
            drain_s = None
            log(f"  not drained after {a.drain_timeout} s")

        out = {"name": name, "path": path, "payments_per_request": per_request,
               "loadgen": "wrk" if use_wrk else "python",
               "window_s": round(window_end - window_start, 3)}
        if rate:
            out["offered_per_s"] = rate
        out.update(client)
        with Session(engine) as session:
            out.update(metrics.database_metrics(session, first_id, window_start, window_end))
        out["backlog_at_load_end"] = backlog
        out["drain_s"] = drain_s
        ref_key = "hot" if name == "hot" else "uniform"
        ref_tps = (ref.get(ref_key) or {}).get("tps")
        out["reference"] = ref_key if ref_tps else None
        out["reference_tps"] = ref_tps
        out["ratio_to_reference"] = round(out["completed_per_s"] / ref_tps, 3) if ref_tps else None
        out["failures"] = out["http_failures"] + out["failed"] + (out["pending_after_drain"] or 0)
        out["load_generator"] = {"kind": out["loadgen"], "cpu_s": round(client_cpu, 2),
                                 "wall_s": round(client_wall, 2),
                                 "cpu_cores_used": round(client_cpu / client_wall, 3) if client_wall else None,
                                 "cpu_ms_per_request": round(1000 * client_cpu / max(out["requests"], 1), 3)}
        # guest times are already inside user/nice on Linux
        spent = {k: getattr(sys_after, k) - getattr(sys_before, k) for k in sys_after._fields
                 if not k.startswith("guest")}
        total = sum(spent.values())
        busy = total - spent.get("idle", 0) - spent.get("iowait", 0)
        out["cpu_s"] = {**system.CpuGroups.delta(cpu_before, cpu_after),
                        "load_generator": round(client_cpu, 3)}
        ours = sum(out["cpu_s"].values())
        out["machine_cpu_busy_pct"] = round(100 * busy / total, 1) if total else None
        # CPU that processes outside the benchmark took meanwhile (other work on the machine, or
        # PostgreSQL/Redis when they are not embedded): a large share means a noisy result.
        out["cpu_s_outside_benchmark"] = round(max(busy - ours, 0.0), 2)
        out["cpu_share_outside_benchmark_pct"] = round(100 * max(busy - ours, 0.0) / total, 1) if total else None
        log(f"  accepted {out['accepted_per_s']:,.0f}/s, completed {out['completed_per_s']:,.0f}/s"
            f" (ref {ref_tps or 0:,.0f}), accept p99 {out['acceptance_latency_ms']['p99']} ms,"
            f" complete p99 {out['completion_latency_ms']['p99']} ms, failures {out['failures']},"
            f" drain {drain_s} s, client CPU {out['load_generator']['cpu_cores_used']} cores")
        return out

    def _use_wrk(self, urls: list[str], account_ids: list[int]) -> bool:
        a = self.args
        if a.loadgen == "python":
            return False
        problem = None
        if not wrk.available():
            problem = "wrk is not installed (apt-get install wrk)"
        elif len(urls) > 1:
            problem = "wrk drives one URL; --api-layout instances has several"
        elif account_ids != list(range(account_ids[0], account_ids[0] + len(account_ids))):
            problem = "account ids are not contiguous"
        if problem and a.loadgen == "wrk":
            raise SystemExit(f"--loadgen wrk: {problem}")
        if problem and not getattr(self, "_told", False):
            log(f"load generator: the Python client ({problem})")
            self._told = True
        return problem is None

    def _stop(self) -> None:
        for p in reversed(self.procs):
            try:
                p.stop()
            except Exception as exc:  # keep stopping the others
                log(f"stopping {p.name}: {exc}")
        if self.services:
            self.services.stop()


def main(argv=None) -> int:
    args = parse_args(argv)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    output = args.output or RESULTS / f"{stamp}.json"
    result = Bench(args).run()
    report.write_json(result, output)
    png = output.with_suffix(".png")
    report.chart(result, png)
    result_table = report.table(result)
    print("\n" + result_table)
    print(f"\nresults: {output}\nchart:   {png}", flush=True)
    return 0 if result["reconcile"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
