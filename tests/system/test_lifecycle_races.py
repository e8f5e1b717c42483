"""Races of the payment lifecycle (SPEC 9), through gunicorn with a real worker: the API decides at
once which of concurrent capture, cancel and expiry wins (the losers get 409, never a 2xx for
something that will not happen); concurrent refunds never add up to more than was captured; the
same Idempotency-Key on concurrent captures answers the same payment."""
from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from datetime import datetime
from decimal import Decimal

import httpx
import pytest
from sqlalchemy import text

from common import ledger
from tests.conftest import AUTH
from tests.support.api import open_account, pay, wait_terminal
from tests.support.processes import wait_until
from tests.support.db import committing

ROUNDS = 20


def at_once(api_url: str, calls: list, start_at: float | None = None) -> list:
    """Run each call(client) in a thread of its own, all released together (at `start_at`, wall
    clock, if given); returns their results in order. Each thread has its own connection, opened
    before the release."""
    barrier = threading.Barrier(len(calls))
    results: list = [None] * len(calls)
    errors: list[BaseException] = []

    def run(i, call):
        try:
            with httpx.Client(base_url=api_url, headers=AUTH, timeout=30) as client:
                client.get("/health")  # connected before the release
                barrier.wait(timeout=30)
                if start_at is not None:
                    wait_until(lambda: time.time() >= start_at, 10, "the start time", interval_s=0.002)
                results[i] = call(client)
        except BaseException as exc:  # re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    return results


def post(path: str, body: dict | None = None, key: str | None = None):
    headers = {"Idempotency-Key": key} if key else {}
    return lambda client: client.post(path, json=body, headers=headers)


def account(http, account_id: int) -> dict:
    r = http.get(f"/accounts/{account_id}")
    assert r.status_code == 200, r.text
    return r.json()


def wait_status(http, payment_id: int, status: str) -> dict:
    got = wait_terminal(http, payment_id)
    assert got["status"] == status, got
    return got


def entries_moved(db, payment_id: int) -> tuple[int, Decimal]:
    with committing(db) as s:
        row = s.execute(text("SELECT count(*) AS n, coalesce(sum(amount) FILTER (WHERE amount > 0), 0) AS moved"
                             " FROM ledger_entries WHERE payment_id = :id"), {"id": payment_id}).one()
    return row.n, row.moved


def our_reconcile_lines(db, accounts: list[int], payments: list[int]) -> list[str]:
    """The reconciliation's complaints about these accounts and payments (the session's database
    holds other tests' rows too)."""
    ours = tuple([f"account {a}:" for a in accounts] + [f"payment {p}:" for p in payments])
    with committing(db) as s:
        return [line for line in ledger.reconcile(s) if line.startswith(ours)]


def test_capture_cancel_expiry_one_winner(http, api_url, db):
    """For each of ROUNDS authorized payments, captures (in full and in part) and cancels at once;
    every other round the payment expires about then, with the sweeper's expiry running too.
    Exactly one of them decides it; every loser answers 409 invalid_state; the state is the
    winner's; the buyer's balance and held are exact."""
    buyer = open_account(http, "100000", name="race-buyer")["id"]
    seller = open_account(http, "0", name="race-seller")["id"]
    rng = random.Random(5)
    payments, captured_total, outcomes = [], Decimal(0), Counter()
    for round_ in range(ROUNDS):
        expiring = round_ % 2 == 1
        amount = Decimal(rng.choice(["10", "25.5", "99.99"]))
        extra = {"capture_method": "manual"}
        if expiring:
            extra["authorization_expires_in"] = 1
        pid = pay(http, buyer, seller, str(amount), **extra)["id"]
        payments.append(pid)
        held = wait_status(http, pid, "authorized")
        part = (amount / 3).quantize(Decimal("0.01"))
        calls = [post(f"/payments/{pid}/capture"), post(f"/payments/{pid}/capture", {"amount": str(part)}),
                 post(f"/payments/{pid}/cancel"), post(f"/payments/{pid}/capture", {"amount": str(amount)}),
                 post(f"/payments/{pid}/cancel", {})]
        start_at = None
        expired_by_sweeper: list[list[int]] = []
        if expiring:
            # Released about when the hold expires, the sweeper's expiry among them (it runs until
            # the payment is decided, as a sweeper on a schedule would).
            start_at = datetime.fromisoformat(held["authorization_expires_at"]).timestamp() + rng.uniform(-0.05, 0.05)

            def expiry(_client):
                def decided():
                    expired_by_sweeper.append(expire(db))
                    return status_in_db(db, pid) != "authorized"
                return wait_until(decided, 10, f"payment {pid} decided", interval_s=0.01)
            calls.append(expiry)
        results = at_once(api_url, calls, start_at)
        responses = results[:5]
        winners = [(i, r) for i, r in enumerate(responses) if r.status_code < 300]
        for i, r in enumerate(responses):
            if r.status_code >= 300:
                error = r.json()["error"]
                assert (r.status_code, error["code"]) == (409, "invalid_state"), (pid, i, r.text)
        final = http.get(f"/payments/{pid}").json()
        swept = [p for batch in expired_by_sweeper for p in batch if p == pid]
        assert len(winners) + len(swept) == 1, (pid, [r.text for r in responses], swept)
        if winners:
            i, r = winners[0]
            assert r.status_code == 200, r.text
            assert r.json() == final, (r.json(), final)  # answered with the payment in its final state
            if i in (2, 4):
                assert (final["status"], final["cancellation_reason"]) == ("canceled", "requested"), final
                outcomes["canceled"] += 1
            else:
                moved = {0: amount, 1: part, 3: amount}[i]
                assert (final["status"], Decimal(final["amount_captured"])) == ("completed", moved), final
                assert entries_moved(db, pid) == (2, moved)
                captured_total += moved
                outcomes["captured in part" if i == 1 else "captured"] += 1
        else:
            assert (final["status"], final["cancellation_reason"]) == ("canceled", "expired"), final
            outcomes["expired"] += 1
        if final["status"] != "completed":
            assert entries_moved(db, pid) == (0, 0)
        # Decided by a capture or cancel before the expiry, else by the expiry (once it passed).
        decided_at = datetime.fromisoformat(final["completed_at"])
        expires_at = datetime.fromisoformat(final["authorization_expires_at"])
        assert (decided_at < expires_at) == bool(winners), (pid, final)
        for i, r in enumerate(responses):  # each loser said what had decided it, or that it had expired
            if r.status_code == 409:
                details = r.json()["error"]["details"]
                if details["status"] == "authorized":
                    assert details["expired"] is True and final["cancellation_reason"] == "expired", (pid, details)
                else:
                    assert details["status"] == final["status"], (pid, details, final)
        b = account(http, buyer)
        assert (Decimal(b["balance"]), Decimal(b["held"])) == (100000 - captured_total, 0), b
        assert Decimal(account(http, seller)["balance"]) == captured_total
    assert our_reconcile_lines(db, [buyer, seller], payments) == []
    print(f"\nraces: {dict(outcomes)}")
    assert outcomes["expired"] and outcomes["canceled"] and outcomes["captured"] + outcomes["captured in part"]


def expire(db) -> list[int]:
    """What the sweeper's expiry does (common.sweeper.expire), returning the ids it canceled."""
    with committing(db) as session:
        return ledger.expire_authorizations(session)


def status_in_db(db, payment_id: int) -> str:
    with committing(db) as s:
        return s.execute(text("SELECT status FROM payments WHERE id = :id"), {"id": payment_id}).scalar_one()


@pytest.mark.parametrize("manual", [False, True], ids=["completed", "captured-in-part"])
def test_concurrent_refunds_never_exceed_the_capture(http, api_url, db, manual):
    """24 refunds of one payment at once, adding up to far more than was captured: the accepted
    ones never exceed it, the rest answer 422 refund_exceeds_payment, and none was refused that
    would have fitted in what is left at the end. Once the worker applied them, amount_refunded
    and both balances are exact."""
    buyer = open_account(http, "1000", name="refund-buyer")["id"]
    seller = open_account(http, "1000", name="refund-seller")["id"]
    if manual:
        pid = pay(http, buyer, seller, "150", capture_method="manual")["id"]
        wait_status(http, pid, "authorized")
        r = http.post(f"/payments/{pid}/capture", json={"amount": "100"})
        assert r.status_code == 200, r.text
    else:
        pid = pay(http, buyer, seller, "100")["id"]
        wait_status(http, pid, "completed")
    captured = Decimal("100")
    rng = random.Random(9)
    amounts = [Decimal(rng.choice(["3", "5", "7.5", "11.25", "0.01", "20"])) for _ in range(23)] + [None]
    results = at_once(api_url, [post(f"/payments/{pid}/refunds", None if a is None else {"amount": str(a)},
                                     key=f"refund-race-{uuid.uuid4().hex}") for a in amounts])
    accepted, refused = {}, []
    for amount, r in zip(amounts, results):
        if r.status_code == 202:
            refund = r.json()
            assert (refund["refund_of"], refund["buyer_account_id"], refund["seller_account_id"]) == (pid, seller, buyer)
            assert amount is None or Decimal(refund["amount"]) == amount
            accepted[refund["id"]] = Decimal(refund["amount"])
        else:
            error = r.json()["error"]
            assert (r.status_code, error["code"]) == (422, "refund_exceeds_payment"), r.text
            refundable = Decimal(error["details"]["refundable"])
            assert amount is None and refundable == 0 or amount > refundable, (amount, error)
            refused.append(amount)
    total = sum(accepted.values(), Decimal(0))
    assert total <= captured, (total, accepted)
    assert refused, "the requests added up to more than the capture: some must be refused"
    left = captured - total
    assert all(a is None and left == 0 or a is not None and a > left for a in refused), (left, refused)
    for refund_id in accepted:
        wait_status(http, refund_id, "completed")
    original = http.get(f"/payments/{pid}").json()
    assert Decimal(original["amount_refunded"]) == total, original
    listed = http.get("/payments", params={"refund_of": pid, "limit": 100}).json()["payments"]
    assert {p["id"] for p in listed} == set(accepted)
    assert Decimal(account(http, buyer)["balance"]) == 1000 - captured + total
    assert Decimal(account(http, seller)["balance"]) == 1000 + captured - total
    assert our_reconcile_lines(db, [buyer, seller], [pid, *accepted]) == []
    print(f"\nrefund race: {len(accepted)} accepted ({total}), {len(refused)} refused, {left} left")


def test_same_idempotency_key_on_concurrent_captures(http, api_url, db):
    """Concurrent captures (and cancels) with one Idempotency-Key and one body answer the same
    payment, captured once; with one key and two bodies, one body wins and the other answers 409
    idempotency_conflict."""
    buyer = open_account(http, "1000", name="idem-buyer")["id"]
    seller = open_account(http, "0", name="idem-seller")["id"]

    pid = pay(http, buyer, seller, "40", capture_method="manual")["id"]
    wait_status(http, pid, "authorized")
    key = f"cap-{uuid.uuid4().hex}"
    results = at_once(api_url, [post(f"/payments/{pid}/capture", {"amount": "30"}, key=key) for _ in range(10)])
    assert [r.status_code for r in results] == [200] * 10, [r.text for r in results]
    bodies = [r.json() for r in results]
    assert all(b == bodies[0] for b in bodies), bodies
    assert (bodies[0]["id"], bodies[0]["status"], bodies[0]["amount_captured"]) == (pid, "completed", "30")
    assert entries_moved(db, pid) == (2, Decimal("30"))

    pid2 = pay(http, buyer, seller, "20", capture_method="manual")["id"]
    wait_status(http, pid2, "authorized")
    key2 = f"cap-{uuid.uuid4().hex}"
    results = at_once(api_url, [post(f"/payments/{pid2}/capture", {"amount": a}, key=key2)
                                for a in ["5", "6"] * 5])
    wins = {r.json()["amount_captured"] for r in results if r.status_code == 200}
    assert len(wins) == 1, [r.text for r in results]
    won = wins.pop()
    for a, r in zip(["5", "6"] * 5, results):
        if a == won:
            assert r.status_code == 200 and r.json()["id"] == pid2, r.text
        else:
            assert (r.status_code, r.json()["error"]["code"]) == (409, "idempotency_conflict"), r.text
    assert entries_moved(db, pid2) == (2, Decimal(won))

    pid3 = pay(http, buyer, seller, "10", capture_method="manual")["id"]
    wait_status(http, pid3, "authorized")
    key3 = f"cancel-{uuid.uuid4().hex}"
    results = at_once(api_url, [post(f"/payments/{pid3}/cancel", key=key3) for _ in range(6)])
    assert [r.status_code for r in results] == [200] * 6, [r.text for r in results]
    assert all(r.json()["status"] == "canceled" for r in results)

    b = account(http, buyer)
    assert (Decimal(b["balance"]), Decimal(b["held"])) == (1000 - 30 - Decimal(won), 0), b
    assert Decimal(account(http, seller)["balance"]) == 30 + Decimal(won)
    with committing(db) as s:
        rows = s.execute(text("SELECT key, resource_type, resource_id FROM idempotency_keys WHERE key = ANY(:k)"),
                         {"k": [key, key2, key3]}).all()
    assert sorted((r.key, r.resource_type, r.resource_id) for r in rows) == sorted(
        [(key, "capture", pid), (key2, "capture", pid2), (key3, "cancel", pid3)])
    assert our_reconcile_lines(db, [buyer, seller], [pid, pid2, pid3]) == []


def test_capture_in_flight_at_expiry_wins(http, api_url, db):
    """A capture that took the payment's lock before the expiry decides it, even if it is still
    running (here: waiting for the buyer's account, which the test holds) when the expiry passes
    and the sweeper runs: the sweeper skips it, the capture completes, held ends at zero."""
    buyer = open_account(http, "100", name="inflight-buyer")["id"]
    seller = open_account(http, "0", name="inflight-seller")["id"]
    pid = pay(http, buyer, seller, "60", capture_method="manual", authorization_expires_in=2)["id"]
    held = wait_status(http, pid, "authorized")
    expires_at = datetime.fromisoformat(held["authorization_expires_at"]).timestamp()
    results: dict = {}

    def capture():
        with httpx.Client(base_url=api_url, headers=AUTH, timeout=30) as client:
            results["capture"] = client.post(f"/payments/{pid}/capture", json={"amount": "50"})

    def sweep():
        try:
            results["expired"] = expire(db)
        except Exception as exc:  # reported below
            results["expired"] = exc

    def waiting_on_lock(fragment: str) -> bool:
        with committing(db) as s:
            return s.execute(text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND query LIKE :q"), {"q": f"%{fragment}%"}).scalar_one() > 0

    with committing(db) as holder:  # the buyer's account, locked as a worker would
        holder.execute(text("SELECT id FROM accounts WHERE id = :id FOR NO KEY UPDATE"), {"id": buyer})
        assert time.time() < expires_at - 0.5, "the hold expired before the test could start"
        capturing = threading.Thread(target=capture)
        capturing.start()
        wait_until(lambda: waiting_on_lock("FROM accounts WHERE id = ANY"), 10, "the capture to wait for the account")
        wait_until(lambda: time.time() > expires_at + 0.2, 10, "the expiry to pass", interval_s=0.01)
        sweeping = threading.Thread(target=sweep)
        sweeping.start()
        # The sweeper either finishes (it skipped the payment) or waits for a lock (it did not).
        wait_until(lambda: "expired" in results or sessions_waiting(db) >= 2, 10, "the sweeper to finish or wait")
    capturing.join(timeout=30)
    sweeping.join(timeout=30)
    assert not isinstance(results["expired"], Exception), results["expired"]
    assert pid not in results["expired"]
    r = results["capture"]
    assert r.status_code == 200, r.text
    final = http.get(f"/payments/{pid}").json()
    assert (final["status"], final["amount_captured"], final["cancellation_reason"]) == ("completed", "50", None)
    assert datetime.fromisoformat(final["completed_at"]).timestamp() < expires_at
    b = account(http, buyer)
    assert (b["balance"], b["held"], b["available"]) == ("50", "0", "50"), b
    assert account(http, seller)["balance"] == "50"
    assert our_reconcile_lines(db, [buyer, seller], [pid]) == []


def sessions_waiting(db) -> int:
    with committing(db) as s:
        return s.execute(text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                              " AND wait_event_type = 'Lock'")).scalar_one()
