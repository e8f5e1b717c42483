"""Usage: .venv/bin/python bench/ab_events.py [ROUNDS]

A/B: the worker's apply transaction with and without the events CTE, interleaved on one
database, so machine noise hits both alike. Payments over 10,000 accounts, 100 per message."""
import importlib.util, random, statistics, sys, time
from decimal import Decimal
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import subprocess, tempfile
OLD = Path(tempfile.mkdtemp()) / "old_applying.py"
OLD.write_text(subprocess.run(["git", "-C", str(ROOT), "show", "f7f2b21:common/ledger/applying.py"], capture_output=True, text=True, check=True).stdout)
from sqlalchemy import text
from scripts import services as svc
from common.db import Database
from common.settings import Settings, sqlalchemy_url
from common import ledger
from common.ledger import applying as new

spec = importlib.util.spec_from_file_location("old_applying", OLD)
old = importlib.util.module_from_spec(spec); sys.modules["old_applying"] = old; spec.loader.exec_module(old)

running = svc.ensure_services(Path(tempfile.mkdtemp(prefix="ab-events-")))
try:
    url = svc.create_database(running.database_url, "ab_apply", drop_first=True)
    svc.migrate(url)
    db = Database(Settings(database_url=sqlalchemy_url(url), broker_url="redis://127.0.0.1:1/0"))
    def seed(s):
        s.execute(text("INSERT INTO accounts (name, currency_id, balance) SELECT 'a', 1, 1000000 FROM generate_series(1, 10000)"))
        s.execute(text("UPDATE accounts SET balance = balance - 10000::numeric * 1000000 WHERE id = -1"))
        s.execute(text("INSERT INTO ledger_entries (account_id, amount, balance_after) SELECT id, balance, balance FROM accounts WHERE id > 0 UNION ALL SELECT -1, -10000::numeric * 1000000, -10000::numeric * 1000000"))
        return ledger.Currencies.load(s), [r[0] for r in s.execute(text("SELECT id FROM accounts WHERE id > 0"))]
    cur, ids = db.unit_of_work(seed)
    rng = random.Random(1)
    def make(n, batch=False):
        reqs = []
        for _ in range(n):
            a, b = rng.sample(ids, 2)
            reqs.append(ledger.PaymentRequest(a, b, "1"))
        if batch:
            _, rows, _ = db.unit_of_work(lambda s: ledger.submit_batch(s, cur, reqs, atomic=False))
            return [r["id"] for r in rows]
        return [r["id"] for r in db.unit_of_work(lambda s: ledger.submit_payments(s, cur, reqs))]
    timings = {"old": [], "new": []}
    for rnd in range(int(sys.argv[1]) if len(sys.argv) > 1 else 30):
        for variant in (("old", "new") if rnd % 2 else ("new", "old")):
            pids = make(100, batch=(rnd % 3 == 0))
            mod = old if variant == "old" else new
            t0 = time.perf_counter()
            db.unit_of_work(lambda s: mod.apply_payments(s, pids))
            timings[variant].append((time.perf_counter() - t0) * 1000)
    for k, v in timings.items():
        v = sorted(v)
        print(f"{k}: median {statistics.median(v):.2f} ms per 100-payment message, mean {statistics.mean(v):.2f},"
              f" p10 {v[len(v)//10]:.2f}, p90 {v[9*len(v)//10]:.2f} (n={len(v)})")
    with db.read() as s:
        print("events:", s.execute(text("SELECT count(*) FROM events")).scalar_one(),
              "reconcile problems (old variant writes no events):", len(ledger.reconcile(s)))
    db.dispose()
    svc.drop_database(running.database_url, "ab_apply")
finally:
    running.stop()
