"""The worker's task class (worker.tasks.WalletTask), run in this process through Celery's own
`Task.apply` (the retry runs at once instead of after its countdown), against a real PostgreSQL
reached through a TCP forwarder the test controls: a database that cannot be reached is retried
until it can, and any other error is raised at once, never retried."""
from __future__ import annotations

import os
from decimal import Decimal

import pytest
from celery.exceptions import Retry
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from common import ledger
from common.db import Database
from tests.conftest import make_settings
from tests.support.tcpproxy import proxied
from worker import app, tasks

calls: list[str] = []


@app.task(base=tasks.WalletTask, bind=True, name="wallet.test_statement")
def run_statement(self, sql: str) -> int:
    calls.append(sql)
    db, _ = tasks.runtime()
    with db.read() as session:
        return session.execute(text(sql)).scalar_one()


@pytest.fixture
def through_proxy(database_url, broker_url):
    """This process's worker runtime (database pool and sender) reaches PostgreSQL through a
    forwarder; yields the forwarder."""
    proxy, url = proxied(database_url)
    settings = make_settings(url, broker_url)
    db = Database(settings, pool_size=1)
    saved = dict(tasks._runtime)
    tasks._runtime.clear()
    tasks._runtime[os.getpid()] = (db, None)
    calls.clear()
    try:
        yield proxy
    finally:
        tasks._runtime.clear()
        tasks._runtime.update(saved)
        db.dispose()
        proxy.close()


def test_unreachable_database_is_retried_until_it_answers(through_proxy):
    through_proxy.refuse_next(3)  # the first three connections are closed at once
    result = run_statement.apply(args=["SELECT 41 + 1"])
    assert calls == ["SELECT 41 + 1"] * 4  # three attempts that could not connect, then one that did
    assert through_proxy.refused == 3
    # Task.apply runs each retry inside the previous attempt: the first attempt ends in Retry, the
    # innermost returned the value.
    assert isinstance(result.result, Retry) or result.result == 42


def test_other_errors_are_not_retried(through_proxy):
    result = run_statement.apply(args=["SELECT 1 / 0"])  # division_by_zero: the same every time
    assert calls == ["SELECT 1 / 0"]
    assert result.failed() and isinstance(result.result, DBAPIError)
    assert result.result.orig.pgcode == "22012"


def test_apply_payments_retries_an_unreachable_database_instead_of_failing_payments(db, through_proxy):
    """The isolation of unappliable payments (internal_error) must not take a database outage for
    a bad payment: the message is retried, and the payment completes."""
    def setup(s):
        currencies = ledger.Currencies.load(s)
        usd = currencies.by_id[1]
        a = ledger.create_account(s, usd, "task-a", Decimal("10"))
        b = ledger.create_account(s, usd, "task-b", Decimal("0"))
        return ledger.submit_payments(s, currencies, [ledger.PaymentRequest(a, b, "3")])[0]["id"]
    payment_id = db.unit_of_work(setup)
    through_proxy.refuse_next(2)
    tasks.apply_payments.apply(args=[[payment_id]])
    assert through_proxy.refused == 2
    with db.read() as s:
        row = s.execute(text("SELECT status, failure_code FROM payments WHERE id = :id"),
                        {"id": payment_id}).one()
    assert (row.status, row.failure_code) == ("completed", None)
