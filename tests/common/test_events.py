"""The outbox (common.ledger.events) on a real PostgreSQL: every status change writes its event in
its own transaction, the object rendered in SQL equals api/render.py's, one batch.finished per
batch even when two transactions finish its last payments at once, reconcile notices what is
missing, and the feed never skips an event that commits after a later one was served."""
from __future__ import annotations

import json
import threading
from datetime import datetime, timezone
from decimal import Decimal

import pytest
from sqlalchemy import text

from api import render
from common import ledger, queries
from common.ledger import events
from tests.support.processes import wait_until
from tests.support.db import committing


@pytest.fixture
def currencies(session):
    return ledger.Currencies.load(session)


def open_(session, currencies, amount, currency_id=1):
    return ledger.open_account(session, currencies.by_id[currency_id], "e", Decimal(amount))[0]["id"]


def submit(session, currencies, buyer, seller, amount, **kw):
    return ledger.submit_payment(session, currencies, ledger.PaymentRequest(buyer, seller, amount, **kw))[0]["id"]


def events_of(session, object_id, prefix="payment."):
    return session.execute(text(
        "SELECT id, type, object FROM events WHERE object_id = :id AND type LIKE :p ORDER BY id"
    ), {"id": object_id, "p": prefix + "%"}).mappings().all()


def as_get(row, currencies):
    """What GET /payments/<id> answers, through JSON as a client reads it."""
    return json.loads(json.dumps(render.payment(row, currencies)))


def test_apply_writes_one_event_per_payment_as_get_renders_it(session, currencies):
    rich = open_(session, currencies, "100")
    poor, seller = open_(session, currencies, "1"), open_(session, currencies, "0")
    done = submit(session, currencies, rich, seller, Decimal("10.50"), reference="r-1", metadata={"k": "v"})
    held = submit(session, currencies, rich, seller, "2", capture_method="manual")
    short = submit(session, currencies, poor, seller, "5")
    ledger.apply_payments(session, [done, held, short])
    for pid, kind in ((done, "completed"), (held, "authorized"), (short, "failed")):
        [event] = events_of(session, pid)
        assert event["type"] == f"payment.{kind}"
        assert event["object"] == as_get(queries.get_payment(session, pid), currencies)
    ledger.apply_payments(session, [done, held, short])  # a redelivered message writes nothing
    assert len(events_of(session, done)) == 1
    assert ledger.reconcile(session) == []


def test_capture_cancel_expiry_and_refund_write_their_events(session, currencies):
    buyer, seller = open_(session, currencies, "100"), open_(session, currencies, "0")
    captured, canceled, expired = (submit(session, currencies, buyer, seller, "3", capture_method="manual")
                                   for _ in range(3))
    ledger.apply_payments(session, [captured, canceled, expired])
    ledger.capture_payment(session, currencies, captured, "2")
    assert events_of(session, captured)[-1]["object"] == as_get(queries.get_payment(session, captured), currencies)
    ledger.cancel_payment(session, canceled)
    session.execute(text("UPDATE payments SET authorization_expires_at = now() - interval '1 s' WHERE id = :id"),
                    {"id": expired})
    assert expired in ledger.expire_authorizations(session)
    for pid, reason in ((canceled, "requested"), (expired, "expired")):
        types = [e["type"] for e in events_of(session, pid)]
        assert types == ["payment.authorized", "payment.canceled"]
        last = events_of(session, pid)[-1]["object"]
        assert last == as_get(queries.get_payment(session, pid), currencies)
        assert last["cancellation_reason"] == reason
    refund, _ = ledger.refund_payment(session, currencies, captured, "1", None, None)
    ledger.apply_payments(session, [refund["id"]])
    [event] = events_of(session, refund["id"])
    assert event["object"] == as_get(queries.get_payment(session, refund["id"]), currencies)
    assert event["object"]["refund_of"] == captured
    assert ledger.reconcile(session) == []


@pytest.mark.parametrize("created_at", [
    datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc),  # no fraction: isoformat writes none
    datetime(2026, 1, 2, 3, 4, 5, 7, tzinfo=timezone.utc),
    datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc),
])
@pytest.mark.parametrize("currency_id, amount", [(1, "100"), (1, "0.01"), (4, "0.000000000000000001"),
                                                 (3, "12345678.9"), (2, "1000000")])
def test_sql_rendering_matches_python_rendering(session, currencies, created_at, currency_id, amount):
    buyer = open_(session, currencies, "99999999", currency_id)
    seller = open_(session, currencies, "0", currency_id)
    pid = submit(session, currencies, buyer, seller, amount, metadata={"a": "ü\"\\", "b.c": ""})
    session.execute(text("UPDATE payments SET created_at = :t, amount = amount * 1.000 WHERE id = :id"),
                    {"t": created_at, "id": pid})  # trailing zeros in the stored numeric
    ledger.apply_payments(session, [pid])
    session.execute(text("UPDATE payments SET completed_at = :t WHERE id = :id"), {"t": created_at, "id": pid})
    events.record_payment_events(session, [pid], settled=False)
    assert events_of(session, pid)[-1]["object"] == as_get(queries.get_payment(session, pid), currencies)


def test_batch_finished_once_when_nothing_is_pending(session, currencies):
    buyer, seller = open_(session, currencies, "100"), open_(session, currencies, "0")
    reqs = [ledger.PaymentRequest(buyer, seller, "1", capture_method=m) for m in ("automatic", "manual", "automatic")]
    batch_id, rows, _ = ledger.submit_batch(session, currencies, reqs, atomic=False)
    ids = [r["id"] for r in rows]
    ledger.apply_payments(session, ids[:2])
    assert events_of(session, batch_id, "batch.") == []
    ledger.apply_payments(session, ids)  # the last one; the others are skipped
    [event] = events_of(session, batch_id, "batch.")
    assert event["type"] == "batch.finished"
    assert event["object"] == json.loads(json.dumps(render.batch(queries.get_batch(session, batch_id))))
    assert event["object"]["counts"] == {"pending": 0, "completed": 2, "failed": 0, "authorized": 1, "canceled": 0}
    ledger.capture_payment(session, currencies, ids[1], None)  # not a change of `pending`: no second one
    assert len(events_of(session, batch_id, "batch.")) == 1
    assert ledger.reconcile(session) == []


def test_atomic_batch_writes_every_event_and_one_batch_finished(session, currencies):
    buyer, seller = open_(session, currencies, "5"), open_(session, currencies, "0")
    reqs = [ledger.PaymentRequest(buyer, seller, a) for a in ("1", "10")]  # the second cannot: all fail
    batch_id, rows, _ = ledger.submit_batch(session, currencies, reqs, atomic=True)
    ledger.apply_atomic_batch(session, batch_id)
    assert [events_of(session, r["id"])[0]["object"]["failure_code"] for r in rows] == ["batch_failed", "insufficient_funds"]
    assert [e["object"]["counts"]["failed"] for e in events_of(session, batch_id, "batch.")] == [2]


def test_reconcile_reports_missing_duplicate_and_stray_events(session, currencies):
    buyer, seller = open_(session, currencies, "10"), open_(session, currencies, "0")
    batch_id, rows, _ = ledger.submit_batch(session, currencies, [ledger.PaymentRequest(buyer, seller, "1")] * 2, atomic=False)
    a, b = (r["id"] for r in rows)
    ledger.apply_payments(session, [a, b])
    lone = submit(session, currencies, buyer, seller, "1")
    assert ledger.reconcile(session) == []
    session.execute(text("DELETE FROM events WHERE object_id = :id AND type = 'payment.completed'"), {"id": a})
    session.execute(text("INSERT INTO events (type, object_id, object) SELECT type, object_id, object FROM events"
                         " WHERE object_id = :id AND type = 'batch.finished'"), {"id": batch_id})
    session.execute(text("INSERT INTO events (type, object_id, object) VALUES ('payment.failed', :id, '{}')"),
                    {"id": lone})
    problems = ledger.reconcile(session)
    assert f"payment {a}: 0 payment.completed events, not 1" in problems
    assert f"payment {lone}: a payment.failed event, but the payment is not so" in problems
    assert f"batch {batch_id}: 2 of 2 payments settled, counter 2, 2 batch.finished events" in problems
    session.execute(text("UPDATE batches SET settled = 1 WHERE id = :id"), {"id": batch_id})
    assert any(p.startswith(f"batch {batch_id}: 2 of 2 payments settled, counter 1") for p in ledger.reconcile(session))


# --- committed transactions: the concurrency the rolled-back session cannot show ---

def _committed_batch(db, n=2):
    with committing(db) as s:
        currencies = ledger.Currencies.load(s)
        pairs = [(open_(s, currencies, "100"), open_(s, currencies, "0")) for _ in range(n)]  # disjoint
        batch_id, rows, _ = ledger.submit_batch(s, currencies, [ledger.PaymentRequest(b, s_, "1") for b, s_ in pairs],
                                                atomic=False)
    return batch_id, [r["id"] for r in rows]


def _wait_for_lock_waiter(db, marker):
    def waiting():
        with committing(db) as s:
            return s.execute(text(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE :m"
            ), {"m": f"%{marker}%"}).scalar_one()
    wait_until(waiting, 10, "the second transaction to wait for the first")


def test_two_transactions_finishing_a_batch_at_once_write_one_batch_finished(db):
    """The first applies one of the batch's two payments and stays open; the second applies the
    other and must wait on the batch row; the first commits. One batch.finished, by the second,
    with both payments counted (a check of "no pending payment left" in each transaction's own
    snapshot would see the other's payment pending in both, and write none)."""
    batch_id, (a, b) = _committed_batch(db)
    first = db.engine.connect()
    trans = first.begin()
    from sqlalchemy.orm import Session
    s1 = Session(bind=first)
    ledger.apply_payments(s1, [a])
    errors = []

    def second():
        try:
            with committing(db) as s2:
                s2.execute(text("SELECT 'second-finisher'"))
                ledger.apply_payments(s2, [b])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=second)
    thread.start()
    _wait_for_lock_waiter(db, "WITH balances AS")  # the apply statement (its text is cut at 1 kB)
    s1.flush()
    trans.commit()
    first.close()
    thread.join(10)
    assert not errors
    with committing(db) as s:
        [event] = events_of(s, batch_id, "batch.")
        assert event["object"]["counts"]["completed"] == 2 and event["object"]["finished"] is True


def test_feed_serves_an_event_that_commits_after_a_later_one(db):
    """Transaction A writes an event and stays open; B writes one (a higher id) and commits. The
    feed serves neither until A ends, then both, A's first: a consumer is never handed B's
    position before A's event is readable. The naive `id > cursor` feed skips A's event."""
    with committing(db) as s:
        start = events.read_feed(s, events.START, 1000).next
        while True:  # catch up with everything already there
            page = events.read_feed(s, start, 1000)
            if not page.rows:
                break
            start = page.next
        naive_cursor = s.execute(text("SELECT coalesce(max(id), 0) FROM events")).scalar_one()
    batch_a, (pa,) = _committed_batch(db, 1)
    batch_b, (pb,) = _committed_batch(db, 1)
    conn = db.engine.connect()
    trans = conn.begin()
    from sqlalchemy.orm import Session
    sa_ = Session(bind=conn)
    ledger.apply_payments(sa_, [pa])  # A: events written, not committed
    with committing(db) as s:
        ledger.apply_payments(s, [pb])  # B: committed, higher ids
    with committing(db) as s:
        page = events.read_feed(s, start, 1000)
        assert [r["object_id"] for r in page.rows if r["object_id"] in (pa, pb, batch_a, batch_b)] == []
        naive = s.execute(text("SELECT id, object_id FROM events WHERE id > :c ORDER BY id"),
                          {"c": naive_cursor}).all()
    assert [r.object_id for r in naive] == [pb, batch_b]  # the naive feed hands out B ...
    naive_cursor = naive[-1].id
    trans.commit()
    conn.close()
    with committing(db) as s:
        seen = []
        cursor = page.next
        while True:
            page = events.read_feed(s, cursor, 2)
            seen += [r["object_id"] for r in page.rows]
            if not page.rows:
                break
            cursor = page.next
        late = s.execute(text("SELECT object_id FROM events WHERE id > :c ORDER BY id"), {"c": naive_cursor}).all()
    assert [x for x in seen if x in (pa, pb, batch_a, batch_b)] == [pa, batch_a, pb, batch_b]
    assert late == []  # ... and, resuming after it, never A's: skipped for good


def test_feed_pages_filter_and_resume(db):
    _committed_batch(db, 3)
    with committing(db) as s:
        all_rows, cursor = [], events.START
        while True:
            page = events.read_feed(s, cursor, 7)
            all_rows += page.rows
            if not page.rows:
                break
            assert (page.next.txid, page.next.id) > (cursor.txid, cursor.id)
            cursor = page.next
        keys = [(int(r["txid"]), r["id"]) for r in all_rows]
        assert keys == sorted(keys) and len(set(keys)) == len(keys)
        batches = events.read_feed(s, events.START, 1000, "batch.finished").rows
        assert batches and {r["type"] for r in batches} == {"batch.finished"}
        assert events.read_feed(s, cursor, 10).next == cursor or events.read_feed(s, cursor, 10).rows == []


def test_migration_backfills_the_events_of_earlier_payments(services):
    """A database at 0002 with payments in every state, upgraded: reconcile finds every event."""
    import uuid
    from alembic import command
    from alembic.config import Config
    from scripts import services as svc
    from common.db import Database
    from common.settings import sqlalchemy_url
    from tests.conftest import make_settings
    name = f"wallet_test_{uuid.uuid4().hex[:12]}"
    url = svc.create_database(services.database_url, name)
    config = Config(str(svc.ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(svc.ROOT / "migrations"))
    config.attributes["database_url"] = sqlalchemy_url(url)
    command.upgrade(config, "0002")
    db = Database(make_settings(url, "redis://127.0.0.1:1/0"))
    try:
        with committing(db) as s:
            s.execute(text(
                "INSERT INTO accounts (id, name, currency_id, balance) VALUES (1, 'a', 1, 0), (2, 'b', 1, 0);"
                "INSERT INTO batches (id, atomic, total) VALUES (1, false, 2), (2, false, 2);"
                "INSERT INTO payments (buyer_account_id, seller_account_id, currency_id, amount, status,"
                "  failure_code, batch_id, completed_at, capture_method, authorization_expires_at,"
                "  cancellation_reason) VALUES"
                " (1, 2, 1, 1, 'failed', 'insufficient_funds', 1, now(), 'automatic', NULL, NULL),"
                " (1, 2, 1, 1, 'failed', 'insufficient_funds', 1, now(), 'automatic', NULL, NULL),"
                " (1, 2, 1, 1, 'failed', 'account_frozen', 2, now(), 'automatic', NULL, NULL),"
                " (1, 2, 1, 1, 'pending', NULL, 2, NULL, 'automatic', NULL, NULL),"
                " (1, 2, 1, 1, 'canceled', NULL, NULL, now(), 'manual', now(), 'requested')"))
        command.upgrade(config, "head")
        with committing(db) as s:
            assert ledger.reconcile(s) == []
            assert s.execute(text("SELECT type, count(*) FROM events GROUP BY type ORDER BY type")).all() == [
                ("batch.finished", 1), ("payment.authorized", 1), ("payment.canceled", 1), ("payment.failed", 3)]
            assert s.execute(text("SELECT id, settled FROM batches ORDER BY id")).all() == [(1, 2), (2, 1)]
        command.downgrade(config, "0002")
        command.upgrade(config, "head")
    finally:
        db.dispose()
        svc.drop_database(services.database_url, name)
