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
    session.execute(text(
        "INSERT INTO payments (buyer_account_id, seller_account_id, currency_id, amount, status,"
        "                      failure_code, completed_at, amount_captured)"
        " SELECT 1000000 + 1 + g % 1000, 1000000 + 1 + (g + 1) % 1000, 1, 1,"
        "        CASE WHEN g % 10 = 0 THEN 'failed' ELSE 'completed' END,"
        "        CASE WHEN g % 10 = 0 THEN 'insufficient_funds' END, now(),"
        "        CASE WHEN g % 10 = 0 THEN NULL ELSE 1 END"
        " FROM generate_series(1, 50000) g"))
    session.execute(text("ANALYZE payments"))
    session.execute(text("ANALYZE accounts"))


def plan_of(session, sql, params):
    rows = session.execute(text("EXPLAIN (FORMAT JSON) " + sql), params).scalar_one()
    return json.dumps(rows)


@pytest.mark.parametrize("filters", [
    {}, {"status": "failed"}, {"account_id": 1000500}, {"account_id": 1000500, "status": "completed"},
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
    plan = plan_of(many_payments, captured["sql"], captured["params"])
    assert "Seq Scan" not in plan, plan


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
