"""A bank test in the spirit of Jepsen's bank workload.

Two gunicorn API instances, two (then three) Celery workers and beat, over a database and a Redis
database index of their own. Sixteen client threads send a few thousand payments round-robin over
the instances, every one with an Idempotency-Key, some sent twice, retrying with the same key on
connection errors and 5xx. Some payments are manual (holds, SPEC 9): lifecycle threads capture them
(in full or in part), cancel them, race a capture against a cancel or against the expiry, or leave
them to expire (short `authorization_expires_in`, canceled by beat's sweep) or to stay authorized;
some completed payments are refunded, in part, in full, several refunds at once for one payment,
or more than is left. Meanwhile a fault thread SIGKILLs a worker (and starts another), flushes the
broker (every queued message lost) and SIGKILLs an API instance (and restarts it on the same port).

Afterwards, payment by payment: every accepted payment is in a final state consistent with every
answer the clients got (each 2xx capture or cancel is what happened, each 409 invalid_state was
true when it was given), refunds never exceed what was captured, and the books balance.
"""
from __future__ import annotations

import os
import queue
import random
import signal
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, Decimal
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
from tests.support.db import committing

pytestmark = pytest.mark.slow

CLIENTS = 16
LIFECYCLE_THREADS = 8
PAYMENTS = 2400
USD, EUR = 1, 2
CENT = Decimal("0.01")
FINAL = ("completed", "failed", "authorized", "canceled")
# What a lifecycle thread does with a manual payment once a worker has applied it.
MANUAL_ACTIONS = {"capture": 22, "partial": 20, "cancel": 16, "duel": 12, "expire": 12, "expire-race": 12,
                  "hold": 6}
REFUND_MODES = ("full", "partial", "partial-then-full", "concurrent", "concurrent", "over")


def own_redis_db(url: str, index: int = 1) -> str:
    """The same Redis server, another database index: flushing it disturbs no other test."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        pytest.skip(f"the bank test flushes a Redis broker; broker is {parts.scheme}")
    return urlunsplit(parts._replace(path=f"/{index}"))


@dataclass(frozen=True)
class Item:
    """One planned payment and what happens to it afterwards."""
    buyer: int
    seller: int
    amount: Decimal
    manual: bool = False
    expires_in: int | None = None
    action: str | None = None  # one of MANUAL_ACTIONS, for a manual payment
    refund: str | None = None  # one of REFUND_MODES, once (if ever) it is completed
    early: bool = False  # capture at once, most likely before a worker applied it (409 pending)
    metadata: dict | None = None


@dataclass
class Answer:
    """One capture, cancel or refund request as the client saw it (after its retries)."""
    kind: str  # capture | cancel | refund
    payment_id: int
    key: str
    amount: Decimal | None
    sent_at: float  # wall clock (the database's clock too: same machine), before the first attempt
    received_at: float = 0.0
    status: int | None = None  # None: gave up
    body: dict = field(default_factory=dict)


class Clients:
    """What the clients saw: every 202 (id -> buyer, seller, amount), key -> ids returned, and every
    lifecycle answer."""

    def __init__(self, ports: list[int]):
        self.ports = ports
        self.lock = threading.Lock()
        self.accepted: dict[int, tuple[int, int, Decimal]] = {}
        self.items: dict[int, Item] = {}
        self.references: dict[int, tuple[str, dict]] = {}
        self.ids_by_key: dict[str, set[int]] = defaultdict(set)
        self.answers: list[Answer] = []
        self.errors: list[str] = []
        self.server_errors: list[tuple[float, int, str]] = []  # (when, status, path) of every 5xx
        self.retries = 0          # resends after a connection error, a 5xx or a 429
        self.replays = 0          # deliberate second sends of a successful request
        self.transport_errors = 0
        self.tasks: queue.Queue = queue.Queue()  # (payment id, its row once a worker applied it)
        self.waiting: set[int] = set()  # accepted manual or to-be-refunded payments not yet applied
        self.sending = True

    def count(self) -> int:
        with self.lock:
            return len(self.accepted)

    def request(self, client: httpx.Client, start: int, path: str, body: dict | None,
                key: str) -> httpx.Response | None:
        """POST with the same key until an answer that is not a transport error, a 5xx or a 429
        (retried on the next instance), or 30 s have passed (None)."""
        headers = {**AUTH, "Idempotency-Key": key}
        deadline = time.monotonic() + 30
        attempt = start
        while True:
            port = self.ports[attempt % len(self.ports)]
            attempt += 1
            try:
                r = client.post(f"http://127.0.0.1:{port}{path}", json=body, headers=headers)
            except httpx.TransportError:
                r = None
                with self.lock:
                    self.transport_errors += 1
            if r is not None and r.status_code >= 500:
                with self.lock:
                    self.server_errors.append((time.time(), r.status_code, path))
            if r is not None and r.status_code < 500 and r.status_code != 429:  # 429: retry later
                return r
            if time.monotonic() > deadline:
                with self.lock:
                    self.errors.append(f"{key}: gave up, last {r and r.status_code}")
                return None
            with self.lock:
                self.retries += 1
            time.sleep(0.02)  # back off a little, then the same key on the next instance

    def send(self, client: httpx.Client, start: int, item: Item, key: str, reference: str) -> int | None:
        body = {"buyer_account_id": item.buyer, "seller_account_id": item.seller, "amount": str(item.amount),
                "reference": reference}
        if item.manual:
            body["capture_method"] = "manual"
            if item.expires_in is not None:
                body["authorization_expires_in"] = item.expires_in
        if item.metadata is not None:
            body["metadata"] = item.metadata
        r = self.request(client, start, "/payments", body, key)
        if r is None:
            return None
        if r.status_code != 202:
            with self.lock:
                self.errors.append(f"{key}: {r.status_code} {r.text[:200]}")
            return None
        pid = r.json()["id"]
        with self.lock:
            self.accepted[pid] = (item.buyer, item.seller, item.amount)
            self.items[pid] = item
            self.references[pid] = (reference, item.metadata or {})
            self.ids_by_key[key].add(pid)
        return pid

    def act(self, client: httpx.Client, start: int, kind: str, payment_id: int, amount: Decimal | None,
            key: str | None = None) -> Answer:
        """A capture, cancel or refund, recorded with its answer."""
        key = key or f"{kind}-{payment_id}-{uuid.uuid4().hex[:8]}"
        path = f"/payments/{payment_id}/{'refunds' if kind == 'refund' else kind}"
        body = None if amount is None else {"amount": str(amount)}
        answer = Answer(kind, payment_id, key, amount, sent_at=time.time())
        r = self.request(client, start, path, body, key)
        answer.received_at = time.time()
        if r is not None:
            answer.status = r.status_code
            answer.body = r.json()
            if kind == "refund" and r.status_code == 202:
                refund = answer.body
                with self.lock:
                    self.accepted[refund["id"]] = (refund["buyer_account_id"], refund["seller_account_id"],
                                                   Decimal(refund["amount"]))
                    self.ids_by_key[key].add(refund["id"])
        with self.lock:
            self.answers.append(answer)
        return answer

    def run(self, n: int, plan: list[Item], seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=httpx.Timeout(10, connect=2)) as client:
            for i, item in enumerate(plan):
                key = f"bank-{n}-{i}-{uuid.uuid4().hex[:8]}"
                reference = f"bank/{n}/{i}"
                pid = self.send(client, n + i, item, key, reference)
                if rng.random() < 0.1:  # the client did not hear the answer: the same key again
                    with self.lock:
                        self.replays += 1
                    self.send(client, n + i + 1, item, key, reference)
                if pid is None:
                    continue
                if item.early:
                    self.act(client, n + i, "capture", pid, None)
                if item.manual or item.refund:
                    with self.lock:
                        self.waiting.add(pid)

    # --- the lifecycle threads ---------------------------------------------------------------

    def watch(self, db) -> None:
        """Hand each awaited payment to the lifecycle threads once a worker has applied it (one
        query for all of them, every 50 ms), until the clients are done and nothing is awaited."""
        def poll():
            with self.lock:
                ids, done = list(self.waiting), not self.sending
            if ids:
                with committing(db) as s:
                    rows = s.execute(text(
                        "SELECT id, status, amount, extract(epoch FROM authorization_expires_at) AS expires_at"
                        " FROM payments WHERE id = ANY(:ids) AND status <> 'pending' ORDER BY id"),
                        {"ids": ids}).all()
                with self.lock:
                    self.waiting.difference_update(r.id for r in rows)
                for row in rows:
                    self.tasks.put((row.id, row))
            return done and not ids
        try:
            wait_until(poll, 150, "the awaited payments to be applied")
        finally:
            for _ in range(LIFECYCLE_THREADS):
                self.tasks.put(None)

    def lifecycle(self, n: int, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=httpx.Timeout(10, connect=2)) as client:
            while True:
                task = self.tasks.get()
                if task is None:
                    return
                pid, payment = task
                try:
                    self.follow(client, rng, n, pid, payment)
                except Exception as exc:  # reported by the main thread
                    with self.lock:
                        self.errors.append(f"lifecycle of {pid}: {exc!r}")

    def follow(self, client: httpx.Client, rng: random.Random, n: int, pid: int, payment) -> None:
        item = self.items[pid]
        amount = payment.amount
        if item.manual:
            captured = self.decide(client, rng, n, payment, item)
            if captured is None or item.refund is None:
                return
        elif payment.status == "completed":
            captured = amount
        else:  # failed: a refund must be refused (409), and nothing else
            self.act(client, n, "refund", pid, None)
            return
        self.refund(client, rng, n, pid, captured, item.refund)

    def decide(self, client, rng, n: int, payment: dict, item: Item) -> Decimal | None:
        """Capture, cancel or leave a hold, as its plan says; returns what was captured, if any."""
        pid, amount = payment.id, payment.amount
        if item.action in ("capture", "partial"):
            part = None
            if item.action == "partial":
                part = max(CENT, (amount * Decimal(rng.choice(["0.25", "0.5", "0.9"]))).quantize(CENT, ROUND_DOWN))
            elif rng.random() < 0.3:
                part = amount  # the whole amount, said explicitly
            answer = self.act(client, n, "capture", pid, part)
            self.maybe_replay(client, rng, n, answer)
            return Decimal(answer.body["amount_captured"]) if answer.status == 200 else None
        if item.action == "cancel":
            self.maybe_replay(client, rng, n, self.act(client, n, "cancel", pid, None))
            return None
        if item.action == "duel":  # capture and cancel at once: exactly one of them wins
            self.concurrently(client, n, [("capture", pid, None), ("cancel", pid, None)])
            return None
        if item.action == "expire-race":
            # Aim at the expiry: the capture or cancel lands just before or just after it.
            target = float(payment.expires_at) + rng.uniform(-0.3, 0.15)
            wait_until(lambda: time.time() >= target, 5, "the expiry", interval_s=0.01)
            self.act(client, n, rng.choice(["capture", "cancel"]), pid, None)
        return None  # expire, hold: nothing

    def refund(self, client, rng, n: int, pid: int, captured: Decimal, mode: str) -> None:
        half = (captured / 2).quantize(CENT, ROUND_DOWN)
        if mode == "full":
            self.maybe_replay(client, rng, n, self.act(client, n, "refund", pid, None))
        elif mode in ("partial", "partial-then-full"):
            self.maybe_replay(client, rng, n, self.act(client, n, "refund", pid, half or None))
            if mode == "partial-then-full":
                self.act(client, n, "refund", pid, None)
        elif mode == "over":
            self.act(client, n, "refund", pid, captured + CENT)
        else:  # several at once, adding up to more than was captured
            share = max(CENT, (captured * Decimal("0.4")).quantize(CENT, ROUND_DOWN))
            calls = [("refund", pid, share) for _ in range(rng.randint(3, 4))]
            if rng.random() < 0.5:
                calls.append(("refund", pid, None))  # what is left, whatever that is by then
            self.concurrently(client, n, calls)

    def concurrently(self, client, n: int, calls: list[tuple]) -> None:
        barrier = threading.Barrier(len(calls))

        def one(i, kind, pid, amount):
            barrier.wait(timeout=10)
            with httpx.Client(timeout=httpx.Timeout(10, connect=2)) as own:
                self.act(own, n + i, kind, pid, amount)

        threads = [threading.Thread(target=one, args=(i, *call)) for i, call in enumerate(calls)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)

    def maybe_replay(self, client, rng, n: int, answer: Answer) -> None:
        if answer.status is not None and rng.random() < 0.15:  # the same key again: the same answer
            with self.lock:
                self.replays += 1
            self.act(client, n + 1, answer.kind, answer.payment_id, answer.amount, key=answer.key)


def make_plan(accounts: dict[int, list[int]], hot: int, seed: int) -> list[Item]:
    rng = random.Random(seed)
    amounts = [Decimal(a) for a in ("0.01", "1", "3.5", "12", "40", "99.99", "250", "1000")]
    actions = [a for a, weight in MANUAL_ACTIONS.items() for _ in range(weight)]
    plan = []
    for i in range(PAYMENTS):
        if rng.random() < 0.7:  # most payments touch the hot USD account
            other = rng.choice([a for a in accounts[USD] if a != hot])
            buyer, seller = (hot, other) if rng.random() < 0.5 else (other, hot)
        else:
            buyer, seller = rng.sample(accounts[rng.choice((USD, EUR))], 2)
        amount = rng.choice(amounts)
        metadata = {"order": str(i), "note": "bank \u00e9"} if rng.random() < 0.1 else None
        if rng.random() < 0.15:
            action = rng.choice(actions)
            short = action in ("expire", "expire-race") or (action != "hold" and rng.random() < 0.1)
            plan.append(Item(buyer, seller, amount, manual=True, action=action, metadata=metadata,
                             expires_in=rng.randint(1, 3) if short else rng.choice([None, 3600]),
                             refund=rng.choice(REFUND_MODES) if action in ("capture", "partial")
                             and rng.random() < 0.4 else None,
                             early=action in ("capture", "partial", "cancel") and rng.random() < 0.2))
        else:
            plan.append(Item(buyer, seller, amount, metadata=metadata,
                             refund=rng.choice(REFUND_MODES) if rng.random() < 0.12 else None))
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
        windows: list[list[float]] = []  # [start, end] of each fault, wall clock
        fault_errors: list[BaseException] = []

        def inject_faults():
            try:
                wait_until(lambda: clients.count() >= PAYMENTS * 0.15, 60, "payments before a worker kill")
                victim = workers[0]
                faults["killed_worker_pid"] = victim.popen.pid
                windows.append([time.time(), 0.0])
                victim.kill(signal.SIGKILL)
                started.append(processes.start_worker(env, logs, name="bank-w3"))
                windows[-1][1] = time.time()

                wait_until(lambda: clients.count() >= PAYMENTS * 0.4, 60, "payments before the flush")
                with db.read() as s:
                    faults["pending_at_flush"] = s.execute(text(
                        "SELECT count(*) FROM payments WHERE status = 'pending'")).scalar_one()
                    faults["authorized_at_flush"] = s.execute(text(
                        "SELECT count(*) FROM payments WHERE status = 'authorized'")).scalar_one()
                faults["broker_keys_at_flush"] = broker_redis.dbsize()
                windows.append([time.time(), 0.0])
                broker_redis.flushdb()
                windows[-1][1] = time.time()
                faults["flushed"] = True

                wait_until(lambda: clients.count() >= PAYMENTS * 0.6, 60, "payments before an API kill")
                victim_api = apis[0]
                windows.append([time.time(), 0.0])
                victim_api.kill(signal.SIGKILL)
                faults["killed_api_pid"] = victim_api.popen.pid
                before = clients.count()
                wait_until(lambda: clients.count() >= before + 100, 60, "payments while an API is down")
                started.append(processes.start_api(env, logs, port=victim_api.port, name="api1-again"))
                windows[-1][1] = time.time()
                faults["api_restarted"] = True
            except BaseException as exc:  # reported by the main thread
                fault_errors.append(exc)

        threads = [threading.Thread(target=clients.run, args=(n, plan[n::CLIENTS], n), daemon=True)
                   for n in range(CLIENTS)]
        followers = [threading.Thread(target=clients.lifecycle, args=(n, 100 + n), daemon=True)
                     for n in range(LIFECYCLE_THREADS)]
        watch_errors: list[BaseException] = []

        def watch():
            try:
                clients.watch(db)
            except BaseException as exc:  # reported by the main thread
                watch_errors.append(exc)
        followers.append(threading.Thread(target=watch, daemon=True))
        fault_thread = threading.Thread(target=inject_faults, daemon=True)
        t0 = time.monotonic()
        for t in threads + followers:
            t.start()
        fault_thread.start()
        for t in threads:
            t.join(timeout=120)
        sent_s = time.monotonic() - t0
        with clients.lock:
            clients.sending = False
        for t in followers:
            t.join(timeout=120)
        fault_thread.join(timeout=60)
        followed_s = time.monotonic() - t0
        assert not any(t.is_alive() for t in threads + followers), "client threads hung"
        assert not fault_errors, fault_errors
        assert not watch_errors, watch_errors
        assert not clients.errors, clients.errors[:10]

        # Every request got its 202 in the end, exactly one payment per key.
        assert len([k for k in clients.ids_by_key if k.startswith("bank-")]) == PAYMENTS
        many = {k: ids for k, ids in clients.ids_by_key.items() if len(ids) != 1}
        assert not many, f"keys that gave different payments: {list(many.items())[:5]}"
        refunds_accepted = {pid for a in clients.answers if a.kind == "refund" and a.status == 202
                            for pid in [a.body["id"]]}
        assert len(clients.accepted) == PAYMENTS + len(refunds_accepted)

        # No 5xx but a 503 while a fault was injected (and a few seconds after).
        def during_fault(when: float) -> bool:
            return any(start - 0.5 <= when <= end + 10 for start, end in windows)
        bad = [e for e in clients.server_errors if e[1] != 503 or not during_fault(e[0])]
        assert not bad, f"5xx outside the faults: {bad[:10]} (faults at {windows})"

        invariants.wait_all_terminal(db, list(clients.accepted), timeout_s=60)
        wait_until(lambda: short_holds_left(db) == 0, 30, "the sweeper to expire the short holds",
                   interval_s=0.2)
        finals = final_rows(db, list(clients.accepted))
        captured = check_decisions(clients, finals)
        lifecycle = check_refunds(clients, finals)
        counts = invariants.check(db, openings, clients.accepted, captured=captured, statuses=FINAL)
        with db.read() as s:
            assert ledger.reconcile(s) == []
            total_payments = s.execute(text("SELECT count(*) FROM payments")).scalar_one()
            key_rows = {(r.resource_type, r.key): r.resource_id for r in s.execute(text(
                "SELECT key, resource_type, resource_id FROM idempotency_keys"))}
        # Nothing was created that no client saw, and the database agrees with the clients.
        assert total_payments == len(clients.accepted)
        assert {k: v for (t, k), v in key_rows.items() if t in ("payment", "refund")} == {
            k: next(iter(ids)) for k, ids in clients.ids_by_key.items()}
        decided = {(a.kind, a.key): a.payment_id for a in clients.answers
                   if a.kind in ("capture", "cancel") and a.status == 200}
        assert {k: v for k, v in key_rows.items() if k[0] in ("capture", "cancel")} == decided
        for pid, (reference, metadata) in clients.references.items():
            assert (finals[pid].reference, finals[pid].metadata) == (reference, metadata), pid

        # The faults happened, and while there was work in flight.
        with pytest.raises(ProcessLookupError):
            os.kill(faults["killed_worker_pid"], 0)
        with pytest.raises(ProcessLookupError):
            os.kill(faults["killed_api_pid"], 0)
        assert faults.get("flushed") and faults.get("api_restarted"), faults
        assert faults["pending_at_flush"] + faults["broker_keys_at_flush"] > 0, faults
        assert clients.replays > 50, clients.replays
        # Every outcome happened, so the test could have caught a wrong one.
        assert counts.get("completed", 0) > 200 and counts.get("failed", 0) > 200, counts
        for what in ("captured", "captured in part", "canceled", "expired", "held", "lost a race",
                     "refunded", "refunded in part", "refund refused: exceeds", "refund failed"):
            assert lifecycle.get(what, 0) > 0, (what, lifecycle)
        print(f"\nbank: {PAYMENTS} payments in {sent_s:.1f}s (lifecycle done at {followed_s:.1f}s), {counts},"
              f" lifecycle={dict(lifecycle)}, faults={faults}, retries={clients.retries},"
              f" transport_errors={clients.transport_errors}, replays={clients.replays},"
              f" 503s={len(clients.server_errors)}")
    finally:
        for proc in reversed(started):
            proc.stop()
        db.dispose()
        broker_redis.flushdb()
        broker_redis.close()


def short_holds_left(db) -> int:
    """Authorized payments that expire (or expired) within a minute: the short holds (1-3 s), due
    soon or already past their expiry but not yet canceled by the sweeper. The other holds have an
    hour or more."""
    with committing(db) as s:
        return s.execute(text("SELECT count(*) FROM payments WHERE status = 'authorized'"
                              " AND authorization_expires_at <= now() + interval '1 minute'")).scalar_one()


def final_rows(db, ids: list[int]) -> dict:
    with committing(db) as s:
        return {r.id: r for r in s.execute(text(
            "SELECT id, status, amount, amount_captured, amount_refunded, cancellation_reason, refund_of,"
            " buyer_account_id, seller_account_id, capture_method,"
            " extract(epoch FROM authorization_expires_at) AS expires_at, reference, metadata,"
            " completed_at < authorization_expires_at AS before_expiry"
            " FROM payments WHERE id = ANY(:ids)"), {"ids": ids})}


def check_decisions(clients: Clients, finals: dict) -> dict[int, Decimal]:
    """Each capture and cancel answer against the payment's final state. Returns payment id ->
    amount captured, for the manual payments that were captured."""
    by_payment = defaultdict(list)
    for a in clients.answers:
        if a.kind in ("capture", "cancel"):
            by_payment[a.payment_id].append(a)
    captured = {}
    for pid, item in clients.items.items():
        final = finals[pid]
        answers = by_payment.get(pid, [])
        for a in answers:
            assert a.status in (200, 409), (pid, a)
        wins = [a for a in answers if a.status == 200]
        winning_keys = {(a.kind, a.key) for a in wins}
        assert len(winning_keys) <= 1, f"payment {pid}: more than one capture/cancel won: {wins}"
        for a in answers:  # a key that won answers the same every time
            if (a.kind, a.key) in winning_keys:
                assert a.status == 200, (pid, a, wins)
        if not item.manual:
            assert not answers
            continue
        state = (final.status, final.cancellation_reason)
        if final.status in ("completed", "canceled"):  # a capture or cancel decides before the expiry
            assert final.before_expiry == (state != ("canceled", "expired")), (pid, final)
        if wins:
            win = wins[0]
            if win.kind == "capture":
                assert state == ("completed", None), (pid, state, win)
                moved = final.amount if win.amount is None else win.amount
                assert final.amount_captured == moved, (pid, final.amount_captured, win)
                captured[pid] = moved
            else:
                assert state == ("canceled", "requested"), (pid, state, win)
            for a in wins:  # the 200 showed the payment in its final state
                assert (a.body["status"], a.body["cancellation_reason"]) == state, (pid, a)
                shown = a.body["amount_captured"]
                assert (None if shown is None else Decimal(shown)) == captured.get(pid), (pid, a)
        else:  # nobody won: it failed, expired, or is still held
            assert state in (("failed", None), ("canceled", "expired"), ("authorized", None)), (pid, state, answers)
        if item.action == "expire":
            assert state in (("canceled", "expired"), ("failed", None)), (pid, state, final, item, time.time())
        if item.action == "hold":
            assert state in (("authorized", None), ("failed", None)), (pid, state)
            assert final.expires_at is None or final.expires_at > time.time()
        for a in answers:
            if a.status == 409:
                check_refusal(pid, a, final, wins)
    return captured


def check_refusal(pid: int, a: Answer, final, wins: list[Answer]) -> None:
    """A 409 invalid_state was true when it was given: the status it reports is one the payment
    had then, and what it says decided the payment did happen before the answer."""
    error = a.body["error"]
    assert error["code"] == "invalid_state", (pid, a)
    said = error["details"]["status"]
    if said == "pending":
        assert final.status != "pending"
        return
    if said == "authorized":  # authorized but past its expiry: expiry had won
        assert error["details"]["expired"] is True, (pid, a)
        assert (final.status, final.cancellation_reason) == ("canceled", "expired"), (pid, a, final)
        assert a.received_at >= float(final.expires_at), (pid, a, final.expires_at)
        return
    assert said == final.status, (pid, a, final.status)  # a decided state never changes
    if said == "completed" or (said == "canceled" and final.cancellation_reason == "requested"):
        # the winner was sent before this answer came back
        assert wins and min(w.sent_at for w in wins) <= a.received_at, (pid, a, wins)
    elif said == "canceled":
        assert not wins and a.received_at >= float(final.expires_at), (pid, a, final)


def check_refunds(clients: Clients, finals: dict) -> dict[str, int]:
    """Each refund answer, and per refunded payment: the refunds that are not failed sum to at most
    what was captured, amount_refunded is the sum of the completed ones, and the database holds
    no refund no client was told of. Returns counts of what happened (with those of the holds)."""
    seen = defaultdict(int)
    by_payment = defaultdict(list)
    for a in clients.answers:
        if a.kind == "refund":
            by_payment[a.payment_id].append(a)
    refunds_in_db = defaultdict(set)
    for row in finals.values():
        if row.refund_of is not None:
            refunds_in_db[row.refund_of].add(row.id)
    for pid, answers in by_payment.items():
        original = finals[pid]
        accepted = {}
        for a in answers:
            if a.status == 202:
                accepted[a.body["id"]] = a
        assert refunds_in_db[pid] == set(accepted), (pid, refunds_in_db[pid], accepted)
        for a in answers:
            assert a.status in (202, 409, 422), (pid, a)
            if a.status == 202:
                refund = finals[a.body["id"]]
                assert (refund.refund_of, refund.buyer_account_id, refund.seller_account_id) == (
                    pid, original.seller_account_id, original.buyer_account_id), (pid, a)
                assert refund.capture_method == "automatic"
                if a.amount is not None:
                    assert refund.amount == a.amount, (pid, a)
                seen["refund failed" if refund.status == "failed" else "refund accepted"] += 1
            elif a.status == 409:
                assert a.body["error"]["code"] == "invalid_state", (pid, a)
                assert a.body["error"]["details"]["status"] == original.status != "completed", (pid, a)
                seen["refund refused: not completed"] += 1
            else:
                error = a.body["error"]
                assert error["code"] == "refund_exceeds_payment", (pid, a)
                refundable = Decimal(error["details"]["refundable"])
                requested = a.amount if a.amount is not None else refundable
                assert requested > refundable or requested == refundable == 0, (pid, a)
                # What was left then was at most the captured amount less the refunds accepted
                # before this answer (some of which may have failed since).
                before = sum(finals[r].amount for r, b in accepted.items() if b.sent_at <= a.received_at)
                assert refundable >= original.amount_captured - before, (pid, a, before)
                seen["refund refused: exceeds"] += 1
        refunds = [finals[r] for r in accepted]
        claimed = sum((r.amount for r in refunds if r.status != "failed"), Decimal(0))
        completed = sum((r.amount for r in refunds if r.status == "completed"), Decimal(0))
        assert all(r.status in ("completed", "failed") for r in refunds), (pid, refunds)
        if refunds:
            assert original.status == "completed"
            assert claimed <= original.amount_captured, (pid, claimed, original.amount_captured)
            assert original.amount_refunded == completed, (pid, original.amount_refunded, completed)
            if completed == original.amount_captured:
                seen["refunded"] += 1
            elif completed:
                seen["refunded in part"] += 1
    for pid in clients.items:
        final = finals[pid]
        if final.capture_method == "manual":
            seen[{"completed": "captured", "canceled": final.cancellation_reason == "expired" and "expired"
                  or "canceled", "authorized": "held", "failed": "hold failed"}[final.status]] += 1
            if final.status == "completed" and final.amount_captured < final.amount:
                seen["captured in part"] += 1
    for a in clients.answers:
        if a.kind in ("capture", "cancel") and a.status == 409:
            details = a.body["error"]["details"]
            seen["lost a race"] += 1
            seen[f"409: {'expired' if details['expired'] else details['status']}"] += 1
    return seen
