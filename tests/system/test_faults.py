"""Faults one at a time, each against real processes and a database of its own:

- PostgreSQL unreachable (for some processes only, through a TCP forwarder the test controls):
  the API answers 503 with the error object and writes nothing, and recovers by itself; a worker
  retries until it can apply.
- The broker unreachable from the API: the payment is still accepted (202) and the sweeper
  delivers it.
- A worker SIGKILLed with messages in flight: every payment still completes, none twice.
"""
from __future__ import annotations

import signal
import time
import uuid
from decimal import Decimal
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import redis
from sqlalchemy import text

from common import ledger
from common.db import Database
from scripts.services import free_port
from tests.conftest import AUTH, make_env, make_settings
from tests.support import invariants, processes
from tests.support.api import open_account, pay, wait_terminal
from tests.support.processes import wait_until
from tests.support.tcpproxy import TcpProxy, proxied  # noqa: F401

pytestmark = pytest.mark.slow


def redis_db(url: str, index: int) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        pytest.skip(f"this test inspects a Redis broker; broker is {parts.scheme}")
    return urlunsplit(parts._replace(path=f"/{index}"))


def count_payments(db: Database) -> int:
    with db.read() as s:
        return s.execute(text("SELECT count(*) FROM payments")).scalar_one()


@pytest.fixture
def stack(tmp_path):
    """Processes started by a test, stopped afterwards whatever happened."""
    started: list[processes.Proc] = []
    yield started, tmp_path / "logs"
    for proc in reversed(started):
        proc.stop()


def test_database_unreachable(fresh_database_url, services, stack):
    started, logs = stack
    broker = redis_db(services.redis_url, 2)
    redis.Redis.from_url(broker).flushdb()
    db = Database(make_settings(fresh_database_url, broker))  # the test's own, direct line
    proxy, through = proxied(fresh_database_url)
    try:
        # One API and the worker reach PostgreSQL through the forwarder; a second API directly.
        cut = processes.start_api(make_env(through, broker), logs, name="api-cut", workers=1)
        direct = processes.start_api(make_env(fresh_database_url, broker), logs, name="api-direct",
                                     workers=1)
        worker = processes.start_worker(make_env(through, broker), logs, name="faults-w")
        started += [cut, direct, worker]
        with httpx.Client(base_url=f"http://127.0.0.1:{cut.port}", headers=AUTH, timeout=15) as api, \
             httpx.Client(base_url=f"http://127.0.0.1:{direct.port}", headers=AUTH, timeout=15) as other:
            a, b = open_account(api, "100")["id"], open_account(api)["id"]
            assert wait_terminal(api, pay(api, a, b, "1")["id"])["status"] == "completed"

            proxy.down()
            before = count_payments(db)
            key = f"db-down-{uuid.uuid4().hex}"
            body = {"buyer_account_id": a, "seller_account_id": b, "amount": "2"}
            for path, method, payload in [("/payments", "POST", body), ("/accounts", "POST",
                                          {"name": "x", "amount": "5", "currency_id": 1}),
                                          (f"/accounts/{a}", "GET", None), ("/payments", "GET", None)]:
                r = api.request(method, path, json=payload, headers={"Idempotency-Key": key}
                                if method == "POST" and path == "/payments" else None)
                assert r.status_code == 503, (path, r.status_code, r.text)
                assert r.json()["error"]["code"] == "database_unavailable", r.text
                assert set(r.json()["error"]) == {"code", "message", "details"}
            assert api.get("/health").status_code == 200
            assert api.get("/ready").status_code == 503
            assert count_payments(db) == before, "a request written while the database was down"
            assert proxy.refused > 0  # the forwarder really refused connections

            # Meanwhile the other API accepts a payment; the worker cannot apply it and retries.
            waiting = pay(other, a, b, "3")["id"]
            wait_until(lambda: "database unavailable, retrying" in worker.log(), 30,
                       "the worker to retry")
            assert other.get(f"/payments/{waiting}").json()["status"] == "pending"

            proxy.up()
            # The API recovers by itself; the key of the refused request was not used up.
            r = wait_until(lambda: _answered(api, "POST", "/payments", body, key), 30,
                           "the API to recover")
            assert r.status_code == 202, r.text
            replay = api.post("/payments", json=body, headers={"Idempotency-Key": key})
            assert (replay.status_code, replay.json()["id"]) == (202, r.json()["id"])
            assert wait_terminal(api, r.json()["id"])["status"] == "completed"
            assert wait_terminal(api, waiting)["status"] == "completed"
            assert api.get("/ready").status_code == 200
            assert Decimal(api.get(f"/accounts/{a}").json()["balance"]) == Decimal("94")
        with db.read() as s:
            assert ledger.reconcile(s) == []
            assert s.execute(text("SELECT count(*) FROM payments")).scalar_one() == 3
    finally:
        proxy.close()
        db.dispose()


def _answered(client: httpx.Client, method: str, path: str, body, key: str):
    r = client.request(method, path, json=body, headers={"Idempotency-Key": key})
    return r if r.status_code != 503 else None


def test_broker_unreachable_from_api(fresh_database_url, services, stack):
    """The API cannot publish: the payment is committed, answered 202, and the sweeper (beat and a
    worker on the real broker) delivers it."""
    started, logs = stack
    broker = redis_db(services.redis_url, 3)
    redis.Redis.from_url(broker).flushdb()
    nowhere = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    api = processes.start_api(make_env(fresh_database_url, nowhere), logs, name="api-nobroker",
                              workers=1)
    started.append(api)
    with httpx.Client(base_url=f"http://127.0.0.1:{api.port}", headers=AUTH, timeout=15) as http:
        a, b = open_account(http, "10")["id"], open_account(http)["id"]
        t0 = time.monotonic()
        payment = pay(http, a, b, "4")
        assert time.monotonic() - t0 < 2, "the request waited for the broker"
        wait_until(lambda: "dispatch failed" in api.log(), 30, "the API to give up publishing")
        assert http.get(f"/payments/{payment['id']}").json()["status"] == "pending"

        env = make_env(fresh_database_url, broker)
        worker = processes.start_worker(env, logs, name="sweep-w")
        started += [worker, processes.start_beat(env, logs)]
        done = wait_terminal(http, payment["id"], timeout_s=30)
        assert done["status"] == "completed"
        assert "re-enqueued" in worker.log()
        assert http.get(f"/accounts/{b}").json()["balance"] == "4"


def test_worker_killed_in_flight(fresh_database_url, services, stack):
    started, logs = stack
    broker = redis_db(services.redis_url, 4)
    broker_redis = redis.Redis.from_url(broker)
    broker_redis.flushdb()
    env = make_env(fresh_database_url, broker)
    db = Database(make_settings(fresh_database_url, broker))
    try:
        api = processes.start_api(env, logs, name="api-kill", workers=1)
        first = processes.start_worker(env, logs, name="doomed")
        started += [api, first, processes.start_beat(env, logs)]
        with httpx.Client(base_url=f"http://127.0.0.1:{api.port}", headers=AUTH, timeout=30) as http:
            opening = {"300": 1, "100": 3, "50": 4}
            openings = {}
            for amount, n in opening.items():
                for _ in range(n):
                    openings[open_account(http, amount)["id"]] = Decimal(amount)
            ids = sorted(openings)
            hot = ids[0]
            items = [{"buyer_account_id": hot if i % 2 else ids[1 + i % 7],
                      "seller_account_id": ids[1 + i % 7] if i % 2 else hot,
                      # every 50th more than all the money there is: both outcomes, always
                      "amount": "1000" if i % 50 == 0 else str(Decimal(1 + i % 13))}
                     for i in range(1000)]
            accepted = {}
            for atomic, chunk in ((False, items[:900]), (True, items[900:920]), (False, items[920:])):
                r = http.post("/payments/batch", json={"payments": chunk, "atomic": atomic})
                assert r.status_code == 202, r.text
                for p in r.json()["payments"]:
                    accepted[p["id"]] = (p["buyer_account_id"], p["seller_account_id"],
                                         Decimal(p["amount"]))
            # Kill the worker while it holds messages it has not acknowledged.
            wait_until(lambda: broker_redis.hlen("unacked") > 0, 10, "the worker to take messages")
            first.kill(signal.SIGKILL)
            with db.read() as s:
                pending_at_kill = s.execute(text(
                    "SELECT count(*) FROM payments WHERE status = 'pending'")).scalar_one()
            assert pending_at_kill > 0
            assert broker_redis.hlen("unacked") > 0  # stranded until the visibility timeout
            started.append(processes.start_worker(env, logs, name="heir"))

        invariants.wait_all_terminal(db, list(accepted), timeout_s=60)
        counts = invariants.check(db, openings, accepted)  # 2 entries per completed, 0 per failed
        with db.read() as s:
            assert ledger.reconcile(s) == []
        assert counts.get("completed", 0) > 0 and counts.get("failed", 0) > 0, counts
        print(f"\nworker kill: {pending_at_kill} pending at the kill, {counts}")
    finally:
        db.dispose()
