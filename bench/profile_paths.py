"""CPU cost per payment of each part of the payment path, measured in-process, so that it does
not depend on what else runs on the machine (unlike `make bench`'s throughput).

    .venv/bin/python -m bench.profile_paths [--batches 200] [--singles 2000] [--profile batch]

It starts (or reuses) PostgreSQL and Redis under var/profile/ (or DATABASE_URL / REDIS_URL),
makes a fresh database `wallet_profile`, seeds 10,000 accounts, and then, through Flask's test
client in this process (no gunicorn: the framework floor is measured separately as `noop`):

- `batch`:   POST /payments/batch of 100 payments (non-atomic);
- `single`:  POST /payments, no Idempotency-Key;
- `refused`: the same batch bodies answered 429 by admission control (a backlog is pending);
- `invalid`: batch bodies with one malformed item, answered 422 (while the backlog would refuse);
- `noop`:    GET /health through the same app (Flask + test client floor);
- `apply`:   the worker's unit of work (`ledger.apply_payments` in `db.run`) over sets of 500.

For each: Python CPU (time.process_time of this process, all threads, the dispatcher's
publishes included) and PostgreSQL CPU (utime+stime from /proc of the backends this process
holds), per request and per payment, and the statements sent per request.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import random
import statistics
import sys
import time
from decimal import Decimal
from pathlib import Path

from sqlalchemy import event, text

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "profile-key"
TICKS = os.sysconf("SC_CLK_TCK")
# Instruction counts, which the machine's load does not change: run under
#   valgrind --tool=callgrind --collect-atstart=no --toggle-collect=sys_call_tracing \
#            --dump-after=sys_call_tracing .venv/bin/python -m bench.profile_paths --callgrind ...
# and each scenario is one dump (callgrind.out.<pid>.<n>, in scenario order): see bench/callgrind_ab.sh.
CALLGRIND = "--callgrind" in sys.argv


def _backend_cpu(db) -> float:
    """CPU seconds used so far by every backend of this database's `wallet` connections."""
    with db.engine.connect() as conn:
        pids = conn.execute(text(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()")).scalars().all()
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / TICKS
        except (FileNotFoundError, PermissionError, IndexError):
            pass
    return total


def _wal(db) -> tuple[int, int]:
    """(WAL bytes, full-page images) written so far by the whole server (pg_stat_wal)."""
    with db.engine.connect() as conn:
        row = conn.execute(text("SELECT wal_bytes, wal_fpi FROM pg_stat_wal")).one()
    return int(row.wal_bytes), int(row.wal_fpi)


class Counter:
    def __init__(self, engine):
        self.n = 0
        event.listen(engine, "before_cursor_execute", self._count)

    def _count(self, *args):
        self.n += 1


def _bodies(rng: random.Random, ids: list[int], count: int, size: int) -> list[bytes]:
    out = []
    for _ in range(count):
        items = []
        for _ in range(size):
            buyer, seller = rng.sample(ids, 2)
            items.append({"buyer_account_id": buyer, "seller_account_id": seller,
                          "amount": f"0.{rng.randint(1, 99):02d}"})
        out.append(json.dumps({"atomic": False, "payments": items}).encode())
    return out


def _single_bodies(rng: random.Random, ids: list[int], count: int) -> list[bytes]:
    return [json.dumps({"buyer_account_id": b, "seller_account_id": s,
                        "amount": f"0.{rng.randint(1, 99):02d}"}).encode()
            for b, s in (rng.sample(ids, 2) for _ in range(count))]


def measure(name, db, counter, run, items, per_item, profile, results, rounds=5):
    """Run `run(chunk)` over `items` in `rounds` chunks; report the median and the minimum of the
    per-chunk CPU (the minimum is the least disturbed by other work on the machine)."""
    size = len(items) if CALLGRIND else max(1, len(items) // rounds)
    chunks = [items[i:i + size] for i in range(0, len(items), size)]
    prof = cProfile.Profile() if profile == name else None
    py, pg, statements, wall = [], [], 0, 0.0
    wal0 = _wal(db)
    for chunk in chunks:
        counter.n = 0
        pg0, cpu0, wall0 = _backend_cpu(db), time.process_time(), time.perf_counter()
        if prof:
            prof.enable()
        if CALLGRIND:
            sys.call_tracing(run, (chunk,))  # valgrind --toggle-collect=sys_call_tracing
        else:
            run(chunk)
        if prof:
            prof.disable()
        cpu, took = time.process_time() - cpu0, time.perf_counter() - wall0
        pg.append((_backend_cpu(db) - pg0) / len(chunk))
        py.append(cpu / len(chunk))
        statements += counter.n
        wall += took
    payments = len(items) * per_item
    wal_bytes, wal_fpi = (b - a for a, b in zip(wal0, _wal(db)))
    med = statistics.median
    row = {"scenario": name, "requests": len(items), "payments": payments,
           "py_ms_per_request": round(med(py) * 1000, 3), "py_ms_per_request_min": round(min(py) * 1000, 3),
           "pg_ms_per_payment": round(med(pg) * 1000 / max(per_item, 1), 4),
           "statements_per_request": round(statements / len(items), 2), "wall_s": round(wall, 2),
           "wal_bytes_per_payment": round(wal_bytes / max(payments, 1)),
           "wal_fpi_per_payment": round(wal_fpi / max(payments, 1), 3)}
    if per_item:
        row["py_ms_per_payment"] = round(med(py) * 1000 / per_item, 4)
        row["py_ms_per_payment_min"] = round(min(py) * 1000 / per_item, 4)
    results.append(row)
    print(json.dumps(row), flush=True)
    if prof:
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out).sort_stats("cumulative")
        stats.print_stats(45)
        out.write("\n--- by own time ---\n")
        stats.sort_stats("tottime").print_stats(35)
        print(out.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--singles", type=int, default=2000)
    ap.add_argument("--refused", type=int, default=500)
    ap.add_argument("--apply-set", type=int, default=500)
    ap.add_argument("--profile", default="", help="scenario to run under cProfile")
    ap.add_argument("--only", default="", help="comma-separated scenarios")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--database", default="wallet_profile", help="made afresh on each run")
    ap.add_argument("--callgrind", action="store_true", help="one round per scenario (see CALLGRIND)")
    ap.add_argument("--schema-sql", default="", help="SQL file run after the migrations: a schema"
                    " variant to measure before writing its migration")
    args = ap.parse_args()
    only = set(filter(None, args.only.split(",")))

    from scripts import services as svc
    from common.settings import Settings, hash_api_key, sqlalchemy_url
    services = svc.ensure_services(ROOT / "var" / "profile")
    try:
        _run(args, only, services)
    finally:  # the embedded PostgreSQL stays up for the next run; a Redis is started per run
        if services.embedded_redis_pidfile and services.embedded_redis_pidfile.exists():
            try:
                os.kill(int(services.embedded_redis_pidfile.read_text().strip()), 15)
            except (ProcessLookupError, ValueError):
                pass


def _run_sql(url: str, sql: str) -> None:
    from sqlalchemy import create_engine
    from common.settings import sqlalchemy_url
    engine = create_engine(sqlalchemy_url(url))
    with engine.begin() as conn:
        conn.exec_driver_sql(sql)
    engine.dispose()


def _run(args, only, services) -> None:
    from scripts import services as svc
    from common.settings import Settings, hash_api_key, sqlalchemy_url
    url = svc.create_database(services.database_url, args.database, drop_first=True)
    svc.migrate(url)
    if args.schema_sql:
        _run_sql(url, Path(args.schema_sql).read_text())
    settings = Settings(database_url=sqlalchemy_url(url), broker_url=services.redis_url,
                        api_key_hashes=frozenset({hash_api_key(API_KEY)}), max_pending=0,
                        admission_wait_ms=0,  # `refused` measures the 429 itself, not a wait
                        access_log=True, log_level="WARNING")
    os.environ.setdefault("WALLET_LOG_LEVEL", "WARNING")

    import logging
    from api import create_app
    from bench.seed import seed_accounts
    from common import ledger
    app = create_app(settings)
    logging.getLogger("wallet.access").setLevel(logging.WARNING)  # no log file: the line is built, not written
    w = app.extensions["wallet"]
    ids = w.db.unit_of_work(lambda session: seed_accounts(session, 10_000, Decimal("1000000"),
                                                          Decimal("1000000000")))
    import redis
    redis.Redis.from_url(services.redis_url).flushdb()
    client = app.test_client()
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    counter = Counter(w.db.engine)
    rng = random.Random(args.seed)
    results: list[dict] = []

    # Warm up every path once (pool connections, prepared statements, imports).
    for body in _bodies(rng, ids, 3, args.batch_size):
        assert client.post("/payments/batch", data=body, headers=headers).status_code == 202
    for body in _single_bodies(rng, ids, 20):
        assert client.post("/payments", data=body, headers=headers).status_code == 202

    import gc
    gc.freeze()  # as gunicorn.conf.py's post_worker_init and the worker's process init do

    def want(name):
        return not only or name in only

    if want("noop"):
        def noop(chunk):
            for _ in chunk:
                client.get("/health", headers=headers)
        measure("noop", w.db, counter, noop, list(range(2000)), 0, args.profile, results)

    if want("batch"):
        bodies = _bodies(rng, ids, args.batches, args.batch_size)

        def batch(chunk):
            for body in chunk:
                r = client.post("/payments/batch", data=body, headers=headers)
                assert r.status_code == 202, r.get_data()
        measure("batch", w.db, counter, batch, bodies, args.batch_size, args.profile, results)

    if want("single"):
        singles = _single_bodies(rng, ids, args.singles)

        def single(chunk):
            for body in chunk:
                r = client.post("/payments", data=body, headers=headers)
                assert r.status_code == 202, r.get_data()
        measure("single", w.db, counter, single, singles, 1, args.profile, results)

    time.sleep(w.settings.dispatch_window_ms / 1000 + 0.3)  # the dispatcher's last send
    if want("refused") or want("invalid"):
        w.admission.max_pending = 1  # the payments above are pending: every payment POST is refused
        refused_bodies = _bodies(rng, ids, args.refused, args.batch_size)

        def refused(chunk):
            for body in chunk:
                r = client.post("/payments/batch", data=body, headers=headers)
                assert r.status_code == 429, r.get_data()
        if want("refused"):
            measure("refused", w.db, counter, refused, refused_bodies, args.batch_size,
                    args.profile, results)
        invalid_bodies = []
        for body in refused_bodies[:100]:
            doc = json.loads(body)
            doc["payments"][50]["amount"] = "0.001x"  # malformed: refused before admission
            invalid_bodies.append(json.dumps(doc).encode())

        def invalid(chunk):
            for body in chunk:
                r = client.post("/payments/batch", data=body, headers=headers)
                assert r.status_code == 422, r.get_data()
        if want("invalid"):
            measure("invalid", w.db, counter, invalid, invalid_bodies, args.batch_size,
                    args.profile, results)
        w.admission.max_pending = 0

    if want("apply"):
        with w.db.read() as session:
            pending = session.execute(text(
                "SELECT id FROM payments WHERE status = 'pending' ORDER BY id")).scalars().all()
        full = len(pending) - len(pending) % args.apply_set
        sets = [pending[i:i + args.apply_set] for i in range(0, full, args.apply_set)]

        def apply(chunk):
            for ids_ in chunk:
                w.db.unit_of_work(lambda session: ledger.apply_payments(session, ids_))
        measure("apply", w.db, counter, apply, sets, args.apply_set, args.profile, results)
        if pending[full:]:
            apply([pending[full:]])
        with w.db.read() as session:
            left = session.execute(text(
                "SELECT count(*) FROM payments WHERE status = 'pending'")).scalar_one()
        assert left == 0, left
        with w.db.read() as session:
            problems = ledger.reconcile(session)
        print("reconcile:", "ok" if not problems else problems)

    print("SUMMARY " + json.dumps(results))
    print(f"{'scenario':10} {'py ms/req':>10} {'(min)':>8} {'py ms/p':>8} {'(min)':>8} {'pg ms/p':>8}"
          f" {'stmts/req':>9} {'WAL B/p':>8} {'FPI/p':>6}")
    for r in results:
        print(f"{r['scenario']:10} {r['py_ms_per_request']:10.3f} {r['py_ms_per_request_min']:8.3f}"
              f" {r.get('py_ms_per_payment', 0):8.4f} {r.get('py_ms_per_payment_min', 0):8.4f}"
              f" {r['pg_ms_per_payment']:8.4f} {r['statements_per_request']:9.2f}"
              f" {r['wal_bytes_per_payment']:8d} {r['wal_fpi_per_payment']:6.3f}")


if __name__ == "__main__":
    main()
