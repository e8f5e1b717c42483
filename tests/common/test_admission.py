"""Admission control against a real PostgreSQL of its own (it counts every pending payment)."""
from __future__ import annotations

from decimal import Decimal

import pytest
from sqlalchemy import text

from common import ledger
from common.admission import Admission
from common.db import Database
from common.errors import Overloaded
from tests.conftest import make_settings


@pytest.fixture
def own_db(fresh_database_url, broker_url):
    database = Database(make_settings(fresh_database_url, broker_url))
    yield database
    database.dispose()


def make_pending(db: Database, count: int) -> None:
    def setup(s):
        currencies = ledger.Currencies.load(s)
        usd = currencies.by_id[1]
        a = ledger.create_account(s, usd, "a", Decimal("100"))
        b = ledger.create_account(s, usd, "b", Decimal("0"))
        ledger.submit_payments(s, currencies, [ledger.PaymentRequest(a, b, "1")] * count)
    db.unit_of_work(setup)


def test_no_bound_admits_anything(own_db):
    make_pending(own_db, 5)
    Admission(own_db, max_pending=0).admit(10_000)


def test_an_empty_backlog_admits_even_more_than_the_bound(own_db):
    Admission(own_db, max_pending=3, refresh_s=0).admit(10)


def test_refuses_what_would_take_the_backlog_over_the_bound(own_db):
    make_pending(own_db, 3)
    admission = Admission(own_db, max_pending=4, refresh_s=0)
    admission.admit(1)  # 3 + 1 <= 4
    with pytest.raises(Overloaded) as caught:
        admission.admit(2)  # 3 + 2 > 4
    assert caught.value.details == {"pending": 3, "max_pending": 4}


def test_counts_what_it_admitted_between_reads(own_db):
    make_pending(own_db, 2)
    admission = Admission(own_db, max_pending=4, refresh_s=3600)
    admission.admit(1)  # reads 2, admits: 3 by its own count
    admission.admit(1)  # 4
    with pytest.raises(Overloaded):
        admission.admit(1)  # nothing was inserted, but this process admitted 2 since it read


def test_rereads_before_refusing(own_db):
    make_pending(own_db, 3)
    admission = Admission(own_db, max_pending=4, refresh_s=3600, recheck_s=0)
    admission.admit(1)  # reads 3: 4 by its own count, which admitting one more would exceed
    def drain(s):  # the backlog drains
        s.execute(text("UPDATE payments SET status = 'completed', amount_captured = amount,"
                       " completed_at = now()"))
    own_db.unit_of_work(drain)
    admission.admit(1)  # about to refuse on its stale count, it reads again: 0 pending
