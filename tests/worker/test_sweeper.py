"""The sweeper (common.sweeper.sweep) against a real PostgreSQL of its own and a real Redis
database that no worker reads: what it sends, what it leaves, and that it sends a payment at most
once per period."""
from __future__ import annotations

import base64
import json
import threading
from decimal import Decimal
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from sqlalchemy import text

from common import ledger, routing
from common.db import Database
from common.messaging import APPLY_ATOMIC_BATCH, APPLY_PAYMENTS, Sender, make_celery
from common.sweeper import sweep
from tests.conftest import make_settings


@pytest.fixture
def own(fresh_database_url, broker_url):
    parts = urlsplit(broker_url)
    if parts.scheme not in ("redis", "rediss"):
        pytest.skip(f"this test reads the messages from Redis; the broker is {parts.scheme}")
    url = urlunsplit(parts._replace(path="/13"))
    client = redis.Redis.from_url(url)
    client.flushdb()
    settings = make_settings(fresh_database_url, url, queues=2)
    db = Database(settings)
    yield db, Sender(make_celery(settings), settings), client, settings
    db.dispose()
    client.flushdb()
    client.close()


def sent(client, settings) -> list[tuple[str, object]]:
    """(task name, first argument) of every message waiting in the payment queues; drains them."""
    out = []
    for k in range(settings.queues):
        name = routing.queue_name(k)
        while (raw := client.rpop(name)) is not None:
            message = json.loads(raw)
            args = json.loads(base64.b64decode(message["body"]))[0]
            out.append((message["headers"]["task"], args[0]))
    return out


def test_sweep_sends_stale_pending_payments_once_per_period(own):
    db, sender, client, settings = own

    def setup(s):
        currencies = ledger.Currencies.load(s)
        usd = currencies.by_id[1]
        a, b, c = (ledger.create_account(s, usd, n, Decimal("100")) for n in "abc")
        pay = ledger.PaymentRequest
        stale = [r["id"] for r in ledger.submit_payments(s, currencies, [pay(a, b, "1"), pay(b, c, "1"),
                                                                          pay(c, a, "1")])]
        fresh = ledger.submit_payments(s, currencies, [pay(a, c, "1")])[0]["id"]
        done = ledger.submit_payments(s, currencies, [pay(a, b, "1")])[0]["id"]
        ledger.apply_payments(s, [done])
        atomic, _, _ = ledger.submit_batch(s, currencies, [pay(a, b, "2"), pay(b, c, "2")], atomic=True)
        plain, plain_rows, _ = ledger.submit_batch(s, currencies, [pay(c, b, "3")], atomic=False)
        s.execute(text("UPDATE payments SET created_at = now() - interval '1 minute' WHERE id <> :fresh"),
                  {"fresh": fresh})
        return stale, fresh, done, atomic, plain_rows[0]["id"]
    stale, fresh, done, atomic, plain_item = db.unit_of_work(setup)

    # A payment a worker is applying right now (its row locked) is skipped, not waited for.
    locked = threading.Event()
    release = threading.Event()

    def hold():
        def work(s):
            s.execute(text("SELECT 1 FROM payments WHERE id = :id FOR UPDATE"), {"id": stale[2]})
            locked.set()
            release.wait(10)
        db.unit_of_work(work)
    holder = threading.Thread(target=hold)
    holder.start()
    assert locked.wait(10)
    try:
        count = sweep(db, sender, older_than_seconds=10)
    finally:
        release.set()
        holder.join(10)

    messages = sent(client, settings)
    singles = sorted(i for task, ids in messages if task == APPLY_PAYMENTS for i in ids)
    batches = [batch for task, batch in messages if task == APPLY_ATOMIC_BATCH]
    assert singles == sorted([stale[0], stale[1], plain_item])  # not fresh, done, locked, atomic items
    assert batches == [atomic]  # an atomic batch goes whole, as one message
    assert count == 3 + 2  # payments claimed: three singles, the atomic batch's two

    # Swept just now: not again within the period, though still pending...
    assert sweep(db, sender, older_than_seconds=10) == 1  # ...only the one that was locked
    assert sent(client, settings) == [(APPLY_PAYMENTS, [stale[2]])]
    assert sweep(db, sender, older_than_seconds=10) == 0
    assert sent(client, settings) == []
    # A period later, the still-pending ones are due again.
    db.unit_of_work(lambda s: s.execute(text("UPDATE payments SET swept_at = swept_at - interval '1 minute'")))
    assert sweep(db, sender, older_than_seconds=10) == 6


def test_vacuum_open_payments_leaves_only_the_open_rows(own):
    """Applied payments leave dead rows in open_payments (a queue table); the sweeper's vacuum
    removes them, so that counting the pending ones stops reading them: here every page but the
    first (the one pending payment's) empties, and is given back."""
    from common.sweeper import vacuum_open_payments
    db = own[0]

    def churn(s):
        currencies = ledger.Currencies.load(s)
        usd = currencies.by_id[1]
        a, b = (ledger.create_account(s, usd, n, Decimal("10000")) for n in "ab")
        ids = [r["id"] for r in ledger.submit_payments(s, currencies, [ledger.PaymentRequest(a, b, "1")] * 2000)]
        ledger.apply_payments(s, ids[1:])  # the first stays pending
    db.unit_of_work(churn)

    def pages_and_pending():
        with db.read() as s:
            return s.execute(text("SELECT pg_relation_size('open_payments') / 8192,"
                                  " (SELECT count(*) FROM open_payments)")).one()
    pages, pending = pages_and_pending()
    assert pages > 5 and pending == 1
    vacuum_open_payments(db)
    assert pages_and_pending() == (1, 1)
