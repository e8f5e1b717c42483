"""Reads: keyset pagination, and that the list queries use indexes on a large table."""
import json

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from common import queries


@pytest.fixture(scope="module")
def many_payments(db):
    """50,000 payments over 1,000 accounts, made set-based in a transaction rolled back after."""
    with db.engine.connect() as conn:
        outer = conn.begin()
        with Session(bind=conn, join_transaction_mode="create_savepoint") as session:
            _fill(session)
            yield session
        outer.rollback()


def _fill(session):
    session.execute(text(
        "INSERT INTO accounts (id, name, currency_id, balance)"
        " SELECT 1000000 + g, 'bulk', 1, 0 FROM generate_series(1, 1000) g"))
    # One in ten failed; one in twenty each pending, authorized and canceled; the rest completed.
    session.execute(text(
        "INSERT INTO payments (buyer_account_id, seller_account_id, currency_id, amount, status,"
        "                      failure_code, completed_at, amount_captured, capture_method,"
        "                      authorization_expires_at, cancellation_reason)"
        " SELECT 1000000 + 1 + g % 1000, 1000000 + 1 + (g + 1) % 1000, 1, 1, s.status,"
        "        CASE WHEN s.status = 'failed' THEN 'insufficient_funds' END,"
        "        CASE WHEN s.status NOT IN ('pending', 'authorized') THEN now() END,"
        "        CASE WHEN s.status = 'completed' THEN 1 END,"
        "        CASE WHEN s.status IN ('authorized', 'canceled') THEN 'manual' ELSE 'automatic' END,"
        "        CASE WHEN s.status IN ('authorized', 'canceled') THEN now() + interval '1 day' END,"
        "        CASE WHEN s.status = 'canceled' THEN 'requested' END"
        " FROM generate_series(1, 50000) g, LATERAL (SELECT CASE"
        "   WHEN g % 10 = 0 THEN 'failed' WHEN g % 20 = 1 THEN 'pending'"
        "   WHEN g % 20 = 3 THEN 'authorized' WHEN g % 20 = 5 THEN 'canceled'"
        "   ELSE 'completed' END AS status) s"))
    session.execute(text("ANALYZE payments"))
    session.execute(text("ANALYZE accounts"))
    session.execute(text("ANALYZE open_payments"))


def plan_of(session, sql, params):
    rows = session.execute(text("EXPLAIN (FORMAT JSON) " + sql), params).scalar_one()
    return json.dumps(rows)


def scanned_whole(plan):
    """The tables a plan reads with a sequential scan."""
    found = set()

    def walk(node):
        if node.get("Node Type") == "Seq Scan":
            found.add(node["Relation Name"])
        for child in node.get("Plans", []):
            walk(child)
    walk(json.loads(plan)[0]["Plan"])
    return found


@pytest.mark.parametrize("filters", [
    {}, {"account_id": 1000500}, {"account_id": 1000500, "status": "completed"},
    *({"status": status} for status in ("pending", "completed", "failed", "authorized", "canceled")),
])
def test_payment_listing_uses_indexes(many_payments, filters):
    captured = {}
    real_execute = many_payments.execute

    def spy(statement, params=None, *args, **kwargs):
        captured["sql"], captured["params"] = str(statement), params
        return real_execute(statement, params, *args, **kwargs)

    many_payments.execute = spy
    page = queries.list_payments(many_payments, after=None, limit=50, **filters)
    many_payments.execute = real_execute
    assert len(page.rows) == 50 and page.next_after is not None
    assert all(row["status"] == filters.get("status", row["status"]) for row in page.rows)
    # open_payments is small by design (the open payments only): a scan of it is fine.
    plan = plan_of(many_payments, captured["sql"], captured["params"])
    assert scanned_whole(plan) <= {"open_payments"}, plan


def test_pages_cover_every_row_once(many_payments):
    seen, after = [], None
    while True:
        page = queries.list_payments(many_payments, after=after, limit=1000, account_id=1000500)
        seen += [r["id"] for r in page.rows]
        if page.next_after is None:
            break
        after = page.next_after
    assert len(seen) == len(set(seen)) == 100  # buyer in 50 payments, seller in 50
    assert seen == sorted(seen, reverse=True)
