"""A bank test in the spirit of Jepsen's bank workload.

Two gunicorn API instances, two (then three) Celery workers and beat, over a database and a Redis
database index of their own. Sixteen client threads send a few thousand payments round-robin over
the instances, every one with an Idempotency-Key, some sent twice, retrying with the same key on
connection errors and 5xx. Meanwhile a fault thread SIGKILLs a worker (and starts another),
flushes the broker (every queued message lost) and SIGKILLs an API instance (and restarts it on
the same port). Afterwards every accepted payment must be terminal and the books must balance.
"""
from __future__ import annotations

import os
import random
import signal
import threading
import time
import uuid
from collections import defaultdict
from decimal import Decimal
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import redis
from sqlalchemy import text

from common import ledger
from common.db import Database
from tests.conftest import AUTH, make_env, make_settings
from tests.support import invariants, processes
from tests.support.api import open_account
from tests.support.processes import wait_until

pytestmark = pytest.mark.slow

CLIENTS = 16
PAYMENTS = 2400
USD, EUR = 1, 2


def own_redis_db(url: str, index: int = 1) -> str:
    """The same Redis server, another database index: flushing it disturbs no other test."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        pytest.skip(f"the bank test flushes a Redis broker; broker is {parts.scheme}")
    return urlunsplit(parts._replace(path=f"/{index}"))


class Clients:
    """What the clients saw: every 202 (id -> buyer, seller, amount) and key -> ids returned."""

    def __init__(self, ports: list[int]):
        self.ports = ports
        self.lock = threading.Lock()
        self.accepted: dict[int, tuple[int, int, Decimal]] = {}
        self.ids_by_key: dict[str, set[int]] = defaultdict(set)
        self.errors: list[str] = []
        self.retries = 0          # resends after a connection error or a 5xx
        self.replays = 0          # deliberate second sends of a successful request
        self.transport_errors = 0

    def count(self) -> int:
        with self.lock:
            return len(self.accepted)

    def send(self, client: httpx.Client, start: int, buyer: int, seller: int, amount: Decimal,
             key: str) -> int | None:
        body = {"buyer_account_id": buyer, "seller_account_id": seller, "amount": str(amount)}
        headers = {**AUTH, "Idempotency-Key": key}
        deadline = time.monotonic() + 30
        attempt = start
        while True:
            port = self.ports[attempt % len(self.ports)]
            attempt += 1
            try:
                r = client.post(f"http://127.0.0.1:{port}/payments", json=body, headers=headers)
            except httpx.TransportError:
                r = None
                with self.lock:
                    self.transport_errors += 1
            if r is not None and r.status_code == 202:
                pid = r.json()["id"]
                with self.lock:
                    self.accepted[pid] = (buyer, seller, amount)
                    self.ids_by_key[key].add(pid)
                return pid
            if r is not None and r.status_code < 500 and r.status_code != 429:  # 429: retry later
                with self.lock:
                    self.errors.append(f"{key}: {r.status_code} {r.text[:200]}")
                return None
            if time.monotonic() > deadline:
                with self.lock:
                    self.errors.append(f"{key}: gave up, last {r and r.status_code}")
                return None
            with self.lock:
                self.retries += 1
            time.sleep(0.02)  # back off a little, then the same key on the next instance

    def run(self, n: int, plan: list[tuple[int, int, Decimal]], seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=httpx.Timeout(10, connect=2)) as client:
            for i, (buyer, seller, amount) in enumerate(plan):
                key = f"bank-{n}-{i}-{uuid.uuid4().hex[:8]}"
                self.send(client, n + i, buyer, seller, amount, key)
                if rng.random() < 0.1:  # the client did not hear the answer: the same key again
                    with self.lock:
                        self.replays += 1
                    self.send(client, n + i + 1, buyer, seller, amount, key)


def make_plan(accounts: dict[int, list[int]], hot: int, seed: int) -> list[tuple[int, int, Decimal]]:
    rng = random.Random(seed)
    amounts = [Decimal(a) for a in ("0.01", "1", "3.5", "12", "40", "99.99", "250", "1000")]
    plan = []
    for _ in range(PAYMENTS):
        if rng.random() < 0.7:  # most payments touch the hot USD account
            other = rng.choice([a for a in accounts[USD] if a != hot])
            buyer, seller = (hot, other) if rng.random() < 0.5 else (other, hot)
        else:
            buyer, seller = rng.sample(accounts[rng.choice((USD, EUR))], 2)
        plan.append((buyer, seller, rng.choice(amounts)))
    return plan


def test_bank(fresh_database_url, services, tmp_path):
    broker = own_redis_db(services.redis_url)
    env = make_env(fresh_database_url, broker)
    db = Database(make_settings(fresh_database_url, broker))
    broker_redis = redis.Redis.from_url(broker)
    broker_redis.flushdb()
    logs = tmp_path / "logs"
    started: list[processes.Proc] = []
    try:
        apis = [processes.start_api(env, logs, name=f"api{i}") for i in (1, 2)]
        started += apis
        workers = [processes.start_worker(env, logs, name=f"bank-w{i}") for i in (1, 2)]
        started += workers
        started.append(processes.start_beat(env, logs))

        base = f"http://127.0.0.1:{apis[0].port}"
        with httpx.Client(base_url=base, headers=AUTH, timeout=10) as http:
            opening_amounts = {USD: ["500", "100", "100", "50"], EUR: ["300", "80", "40", "20"]}
            accounts = {c: [open_account(http, a, currency_id=c, name=f"{c}-{i}")["id"]
                            for i, a in enumerate(amounts)]
                        for c, amounts in opening_amounts.items()}
        openings = {aid: Decimal(a) for c in (USD, EUR)
                    for aid, a in zip(accounts[c], opening_amounts[c])}
        hot = accounts[USD][0]
        plan = make_plan(accounts, hot, seed=11)

        clients = Clients([api.port for api in apis])
        faults: dict = {}
        fault_errors: list[BaseException] = []

        def inject_faults():
            try:
                wait_until(lambda: clients.count() >= PAYMENTS * 0.15, 60, "payments before a worker kill")
                victim = workers[0]
                faults["killed_worker_pid"] = victim.popen.pid
                victim.kill(signal.SIGKILL)
                started.append(processes.start_worker(env, logs, name="bank-w3"))

                wait_until(lambda: clients.count() >= PAYMENTS * 0.4, 60, "payments before the flush")
                with db.read() as s:
                    faults["pending_at_flush"] = s.execute(text(
                        "SELECT count(*) FROM payments WHERE status = 'pending'")).scalar_one()
                faults["broker_keys_at_flush"] = broker_redis.dbsize()
                broker_redis.flushdb()
                faults["flushed"] = True

                wait_until(lambda: clients.count() >= PAYMENTS * 0.6, 60, "payments before an API kill")
                victim_api = apis[0]
                victim_api.kill(signal.SIGKILL)
                faults["killed_api_pid"] = victim_api.popen.pid
                before = clients.count()
                wait_until(lambda: clients.count() >= before + 100, 60, "payments while an API is down")
                started.append(processes.start_api(env, logs, port=victim_api.port, name="api1-again"))
                faults["api_restarted"] = True
            except BaseException as exc:  # reported by the main thread
                fault_errors.append(exc)

        threads = [threading.Thread(target=clients.run, args=(n, plan[n::CLIENTS], n), daemon=True)
                   for n in range(CLIENTS)]
        fault_thread = threading.Thread(target=inject_faults, daemon=True)
        t0 = time.monotonic()
        for t in threads:
            t.start()
        fault_thread.start()
        for t in threads:
            t.join(timeout=120)
        fault_thread.join(timeout=60)
        sent_s = time.monotonic() - t0
        assert not any(t.is_alive() for t in threads), "client threads hung"
        assert not fault_errors, fault_errors
        assert not clients.errors, clients.errors[:10]

        # Every request got its 202 in the end, exactly one payment per key.
        assert len(clients.ids_by_key) == PAYMENTS
        many = {k: ids for k, ids in clients.ids_by_key.items() if len(ids) != 1}
        assert not many, f"keys that gave different payments: {list(many.items())[:5]}"
        assert len(clients.accepted) == PAYMENTS

        invariants.wait_all_terminal(db, list(clients.accepted), timeout_s=60)
        counts = invariants.check(db, openings, clients.accepted)
        with db.read() as s:
            assert ledger.reconcile(s) == []
            total_payments = s.execute(text("SELECT count(*) FROM payments")).scalar_one()
            key_rows = dict(s.execute(text(
                "SELECT key, resource_id FROM idempotency_keys WHERE resource_type = 'payment'")).all())
        # Nothing was created that no client saw, and the database agrees with the clients.
        assert total_payments == PAYMENTS
        assert key_rows == {k: next(iter(ids)) for k, ids in clients.ids_by_key.items()}

        # The faults happened, and while there was work in flight.
        with pytest.raises(ProcessLookupError):
            os.kill(faults["killed_worker_pid"], 0)
        with pytest.raises(ProcessLookupError):
            os.kill(faults["killed_api_pid"], 0)
        assert faults.get("flushed") and faults.get("api_restarted"), faults
        assert faults["pending_at_flush"] + faults["broker_keys_at_flush"] > 0, faults
        assert clients.replays > 50, clients.replays
        # Both outcomes happened, so the test could have caught a wrong one.
        assert counts.get("completed", 0) > 200 and counts.get("failed", 0) > 200, counts
        print(f"\nbank: {PAYMENTS} payments in {sent_s:.1f}s, {counts}, faults={faults},"
              f" retries={clients.retries}, transport_errors={clients.transport_errors},"
              f" replays={clients.replays}")
    finally:
        for proc in reversed(started):
            proc.stop()
        db.dispose()
        broker_redis.flushdb()
        broker_redis.close()
