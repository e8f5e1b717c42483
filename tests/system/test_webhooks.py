"""Events and webhooks on the real stack (gunicorn, Celery worker and beat, PostgreSQL, Redis), each
stack on a database and Redis index of its own, with short webhook timings:

- signed deliveries to a real receiver that fails the first attempts, then answers 2xx;
- a receiver that hangs past the timeout is retried; a type filter; a deleted endpoint gets
  nothing more;
- Redis flushed and the worker SIGKILLed during deliveries: every event still arrives;
- the event feed followed by a consumer while 16 threads submit payments through 2 API processes
  with slow, out-of-order commits: every event exactly once.
"""
from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import redis
from sqlalchemy import text

from common import ledger
from common.db import Database
from tests.conftest import AUTH, make_env, make_settings
from tests.support import processes
from tests.support.api import open_account, pay, wait_terminal
from scripts.procs import WaitTimeout
from tests.support.processes import wait_until
from tests.support.receiver import Receiver
from tests.support.db import committing

pytestmark = pytest.mark.slow

FAST_HOOKS = {"WALLET_WEBHOOK_RETRY_BASE_SECONDS": "0.3", "WALLET_WEBHOOK_TIMEOUT_SECONDS": "1",
              "WALLET_WEBHOOK_FANOUT_INTERVAL_SECONDS": "0.5"}


def redis_index(url: str, index: int) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        pytest.skip(f"this test flushes a Redis broker; broker is {parts.scheme}")
    return urlunsplit(parts._replace(path=f"/{index}"))


class Stack:
    def __init__(self, database_url: str, broker: str, logs, api_workers=1, concurrency=2, **env):
        self.env = make_env(database_url, broker, **{**FAST_HOOKS, **env})
        self.logs = logs
        self.db = Database(make_settings(database_url, broker))
        self.procs: list[processes.Proc] = []
        self.api = self.start(processes.start_api(self.env, logs, name="hooks-api", workers=api_workers))
        self.worker = self.start(processes.start_worker(self.env, logs, name="hooks-w", concurrency=concurrency))
        self.start(processes.start_beat(self.env, logs))
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.api.port}", headers=AUTH, timeout=15)

    def start(self, proc):
        self.procs.append(proc)
        return proc

    def stop(self):
        self.http.close()
        for proc in reversed(self.procs):
            proc.stop()
        self.db.dispose()

    def register(self, receiver: Receiver, **body) -> dict:
        r = self.http.post("/webhook_endpoints", json={"url": receiver.url, **body})
        assert r.status_code == 201, r.text
        endpoint = r.json()
        assert endpoint["secret"].startswith("whsec_")
        receiver.secret = endpoint["secret"]
        return endpoint

    def deliveries(self, endpoint_id: int) -> list[dict]:
        out, cursor = [], None
        while True:
            r = self.http.get(f"/webhook_endpoints/{endpoint_id}/deliveries",
                              params={"limit": 1000, **({"cursor": cursor} if cursor else {})})
            assert r.status_code == 200, r.text
            out += r.json()["deliveries"]
            cursor = r.json()["next_cursor"]
            if cursor is None:
                return out

    def event_ids(self, object_ids: set[int] | None = None) -> dict[int, dict]:
        with committing(self.db) as s:
            rows = s.execute(text("SELECT id, type, object_id FROM events")).all()
        return {r.id: r for r in rows if object_ids is None or r.object_id in object_ids}


@pytest.fixture(scope="module")
def stack(services, tmp_path_factory):
    from tests.conftest import _fresh_database
    from scripts import services as svc
    name, url = _fresh_database(services)
    broker = redis_index(services.redis_url, 8)
    redis.Redis.from_url(broker).flushdb()
    logs = tmp_path_factory.mktemp("hooks-logs")
    s = Stack(url, broker, logs, PROMETHEUS_MULTIPROC_DIR=str(logs / "metrics"))
    yield s
    s.stop()
    svc.drop_database(services.database_url, name)


def test_signed_deliveries_retried_until_delivered(stack):
    receiver = Receiver(fail_first=2)
    filtered = Receiver()
    try:
        endpoint = stack.register(receiver, metadata={"team": "payments"})
        only_failed = stack.register(filtered, events=["payment.failed"])
        assert "secret" not in stack.http.get(f"/webhook_endpoints/{endpoint['id']}").json()
        listed = stack.http.get("/webhook_endpoints").json()["webhook_endpoints"]
        assert {e["id"] for e in listed} >= {endpoint["id"], only_failed["id"]}
        assert all("secret" not in e for e in listed)

        a, b = open_account(stack.http, "10")["id"], open_account(stack.http)["id"]
        ids = [pay(stack.http, a, b, amount)["id"] for amount in ("1", "2", "100")]  # the last fails
        held = pay(stack.http, a, b, "3", capture_method="manual")["id"]
        for pid in [*ids, held]:
            wait_terminal(stack.http, pid)
        assert stack.http.post(f"/payments/{held}/capture", json={}).status_code == 200
        expected = stack.event_ids({*ids, held})
        assert len(expected) == 5  # 2 completed, 1 failed, authorized then completed

        wait_until(lambda: receiver.delivered() >= set(expected), 60, "every event delivered")
        by_event: dict[int, list] = {}
        for r in receiver.requests:
            by_event.setdefault(r.event_id, []).append(r)
        for event_id in expected:
            attempts = by_event[event_id]
            assert [r.status for r in attempts[:3]] == [500, 500, 200], (event_id, [r.status for r in attempts])
            assert all(r.verified for r in attempts), "a signature did not verify"
            assert all(r.header_event_id == str(event_id) for r in attempts)
            assert attempts[-1].body == stack.http.get(f"/events/{event_id}").json()
        deliveries = {d["event_id"]: d for d in stack.deliveries(endpoint["id"])}
        for event_id in expected:
            d = deliveries[event_id]
            assert (d["status"], d["attempts"], d["last_http_status"]) == ("delivered", 3, 200), d
            assert d["delivered_at"] and d["next_attempt_at"] is None and d["last_error"] is None

        metrics = stack.http.get("/metrics").text  # the worker's counters, summed by the API
        for line in ('wallet_webhook_deliveries_total{outcome="delivered"}',
                     'wallet_webhook_deliveries_total{outcome="retry"}',
                     "wallet_webhook_oldest_undelivered_age_seconds", "wallet_webhook_queue_depth"):
            assert line in metrics, line
        failed_event = {i for i, e in expected.items() if e.type == "payment.failed"}
        wait_until(lambda: filtered.delivered() >= failed_event, 30, "the failed event to its subscriber")
        assert {r.body["type"] for r in filtered.requests} == {"payment.failed"}
    finally:
        receiver.close()
        filtered.close()


def test_receiver_hanging_past_the_timeout_is_retried(stack):
    receiver = Receiver(hang_first=3.0)  # the timeout is 1 s here
    try:
        endpoint = stack.register(receiver)
        a, b = open_account(stack.http, "10")["id"], open_account(stack.http)["id"]
        pid = pay(stack.http, a, b, "1")["id"]
        wait_terminal(stack.http, pid)
        [event_id] = stack.event_ids({pid})
        t0 = time.monotonic()
        wait_until(lambda: event_id in receiver.delivered() and
                   any(d["status"] == "delivered" for d in stack.deliveries(endpoint["id"])), 30,
                   "the retry after the timeout")
        [d] = [d for d in stack.deliveries(endpoint["id"]) if d["event_id"] == event_id]
        assert d["attempts"] == 2, d
        assert time.monotonic() - t0 < 30
    finally:
        receiver.close()


def test_slow_receiver_never_delays_payments(stack):
    """Deliveries to a receiver taking 0.9 s each (the timeout is 1 s) keep every delivery thread
    busy; payments applied meanwhile complete as fast as ever (the delivery task only hands its
    ids to the threads, so no pool process waits on the receiver)."""
    slow = Receiver(delay_s=0.9)
    try:
        endpoint = stack.register(slow)
        a, b = open_account(stack.http, "100")["id"], open_account(stack.http)["id"]
        first = [pay(stack.http, a, b, "1")["id"] for _ in range(40)]
        for pid in first:
            wait_terminal(stack.http, pid)
        wait_until(lambda: slow.count() >= 1, 30, "deliveries to the slow receiver to start")
        latencies = []
        for _ in range(5):
            t0 = time.monotonic()
            wait_terminal(stack.http, pay(stack.http, a, b, "1")["id"])
            latencies.append(time.monotonic() - t0)
        pending = [d for d in stack.deliveries(endpoint["id"]) if d["status"] == "pending"]
        assert pending, "the receiver was not slow enough to matter"
        assert max(latencies) < 2.0, latencies
        print(f"\nslow receiver: payments completed in {[round(x, 3) for x in latencies]} s"
              f" with {len(pending)} deliveries pending")
    finally:
        stack.http.delete(f"/webhook_endpoints/{endpoint['id']}")
        slow.close()


def test_deleted_endpoint_gets_nothing_more(stack):
    doomed, marker = Receiver(always=500), Receiver()
    try:
        endpoint, witness = stack.register(doomed), stack.register(marker)
        a, b = open_account(stack.http, "10")["id"], open_account(stack.http)["id"]
        first = pay(stack.http, a, b, "1")["id"]
        wait_terminal(stack.http, first)
        [first_event] = stack.event_ids({first})
        wait_until(lambda: doomed.count() >= 2, 30, "a few failed attempts")
        [age] = [float(line.split()[-1]) for line in stack.http.get("/metrics").text.splitlines()
                 if line.startswith("wallet_webhook_oldest_undelivered_age_seconds ")]
        assert age > 0  # the failing endpoint's event is still owed
        r = stack.http.delete(f"/webhook_endpoints/{endpoint['id']}")
        assert (r.status_code, r.json()) == (200, {"id": endpoint["id"], "deleted": True})
        assert stack.http.get(f"/webhook_endpoints/{endpoint['id']}").status_code == 404
        assert stack.http.delete(f"/webhook_endpoints/{endpoint['id']}").status_code == 404
        with committing(stack.db) as s:
            statuses = s.execute(text("SELECT status FROM webhook_deliveries WHERE endpoint_id = :e"),
                                 {"e": endpoint["id"]}).scalars().all()
        assert set(statuses) == {"canceled"}
        # Later events reach the other endpoint (so the fan-out has passed them), never this one,
        # and the canceled delivery is not retried (several backoff periods pass meanwhile).
        wait_until(lambda: first_event in marker.delivered(), 30, "the witness to get the first event")
        after_delete = doomed.count()
        later = [pay(stack.http, a, b, "1")["id"] for _ in range(3)]
        for pid in later:
            wait_terminal(stack.http, pid)
        wait_until(lambda: marker.delivered() >= set(stack.event_ids(set(later))), 30, "the later events")
        assert doomed.count() == after_delete
        with committing(stack.db) as s:
            assert s.execute(text("SELECT count(*) FROM webhook_deliveries WHERE endpoint_id = :e"
                                  " AND event_id = ANY(:ids)"), {"e": endpoint["id"], "ids": list(
                                      stack.event_ids(set(later)))}).scalar_one() == 0
        assert witness["id"] != endpoint["id"]
    finally:
        doomed.close()
        marker.close()


def test_no_event_lost_when_redis_is_flushed_and_the_worker_killed(services, fresh_database_url, tmp_path):
    broker = redis_index(services.redis_url, 9)
    broker_redis = redis.Redis.from_url(broker)
    broker_redis.flushdb()
    receiver = Receiver(delay_s=0.15)  # slow: deliveries are in flight when the worker dies
    stack = Stack(fresh_database_url, broker, tmp_path / "logs", WALLET_WEBHOOK_THREADS="2")
    try:
        stack.register(receiver)
        accounts = [open_account(stack.http, "100")["id"] for _ in range(4)]
        r = stack.http.post("/payments/batch", json={"payments": [
            {"buyer_account_id": accounts[i % 4], "seller_account_id": accounts[(i + 1) % 4], "amount": "1"}
            for i in range(40)]})
        assert r.status_code == 202, r.text
        ids = [p["id"] for p in r.json()["payments"]]
        wait_until(lambda: receiver.count() >= 3, 60, "deliveries to start")
        stack.worker.kill(signal.SIGKILL)
        broker_redis.flushdb()  # every queued delivery message is gone too
        delivered_at_kill = len(receiver.delivered())
        from tests.support.invariants import wait_all_terminal
        stack.start(processes.start_worker(stack.env, stack.logs, name="hooks-heir"))
        wait_all_terminal(stack.db, ids, 60)
        expected = set(stack.event_ids())  # the 40 payments' events and the batch's
        assert len(expected) == 41
        wait_until(lambda: receiver.delivered() >= expected, 120, "every event delivered after the faults",
                   interval_s=0.2)
        assert delivered_at_kill < len(expected), "the faults came too late to matter"
        with committing(stack.db) as s:
            assert ledger.reconcile(s) == []
        print(f"\nwebhook faults: {delivered_at_kill} of {len(expected)} delivered at the kill,"
              f" {receiver.count()} requests in all")
    finally:
        stack.stop()
        receiver.close()


SLOW_COMMIT = """
CREATE FUNCTION test_slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF coalesce(current_setting('test.slept', true), '') = '' THEN
    PERFORM set_config('test.slept', '1', true);
    PERFORM pg_sleep(0.002 + random() * 0.008);
  END IF;
  RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER test_slow_commit AFTER INSERT ON events
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION test_slow_commit();
"""


def test_feed_consumer_sees_every_event_exactly_once_under_load(services, fresh_database_url, tmp_path):
    """16 threads, each paying within its own pair of accounts (so their transactions do not queue
    on each other's row locks), through 2 API processes, 4 queues and 4 worker processes, with a
    sleep at every event-writing commit: transactions commit out of id order all the time. A
    consumer follows the feed meanwhile. (With a naive `id > cursor` feed this test fails.)"""
    broker = redis_index(services.redis_url, 10)
    redis.Redis.from_url(broker).flushdb()
    db = Database(make_settings(fresh_database_url, broker))
    with committing(db) as s:
        s.execute(text(SLOW_COMMIT))
    db.dispose()
    stack = Stack(fresh_database_url, broker, tmp_path / "logs", api_workers=2, concurrency=4,
                  WALLET_DISPATCH_WINDOW_MS="2")
    seen: list[int] = []
    done = threading.Event()
    errors: list[str] = []

    def consume():
        with httpx.Client(base_url=stack.http.base_url, headers=AUTH, timeout=15) as c:
            cursor = None
            while True:
                finishing = done.is_set()
                r = c.get("/events", params={"limit": 20, **({"cursor": cursor} if cursor else {})})
                if r.status_code != 200:
                    errors.append(r.text)
                    return
                body = r.json()
                seen.extend(e["id"] for e in body["events"])
                if not body["next_cursor"]:
                    errors.append(f"next_cursor {body['next_cursor']!r}")
                    return
                cursor = body["next_cursor"]
                if finishing and not body["events"]:
                    return

    consumer = threading.Thread(target=consume)
    try:
        pairs = [(open_account(stack.http, "1000")["id"], open_account(stack.http, "1000")["id"]) for _ in range(16)]
        consumer.start()

        def client(pair):
            a, b = pair
            with httpx.Client(base_url=stack.http.base_url, headers=AUTH, timeout=30) as c:
                return [pay(c, *((a, b) if i % 2 else (b, a)), "1")["id"] for i in range(30)]

        with ThreadPoolExecutor(16) as pool:
            ids = [pid for chunk in pool.map(client, pairs) for pid in chunk]
        from tests.support.invariants import wait_all_terminal
        wait_all_terminal(stack.db, ids, 120)
        with committing(stack.db) as s:
            total = s.execute(text("SELECT count(*) FROM events")).scalar_one()
        try:
            wait_until(lambda: len(set(seen)) >= total or errors, 30, "the consumer to catch up")
        except WaitTimeout:
            pass  # the assertions below say what is missing
        done.set()
        consumer.join(30)
        assert not errors, errors
        with committing(stack.db) as s:
            all_ids = set(s.execute(text("SELECT id FROM events")).scalars())
            out_of_order = s.execute(text(
                "SELECT count(*) FROM (SELECT id, lag(id) OVER (ORDER BY txid, id) AS prev FROM events) x"
                " WHERE prev > id")).scalar_one()
        duplicates = len(seen) - len(set(seen))
        missing = all_ids - set(seen)
        print(f"\nfeed: {len(ids)} payments, {len(all_ids)} events, {out_of_order} committed out of id"
              f" order, consumer saw {len(seen)} ({duplicates} duplicates, {len(missing)} missing)")
        assert out_of_order > 0, "ids always in transaction order: the test proves nothing"
        assert duplicates == 0
        assert not missing, f"{len(missing)} events never served: {sorted(missing)[:10]}"
        assert set(seen) == all_ids
    finally:
        done.set()
        stack.stop()
