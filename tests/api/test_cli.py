"""`flask --app api wallet reconcile` and `flask --app api wallet api-key create`, run as real
subprocesses against a database of the test's own (so corrupting it harms nobody)."""
from __future__ import annotations

import subprocess

import pytest
from sqlalchemy import text

from api import create_app
from common.db import Database
from scripts.services import ROOT
from tests.api.conftest import assert_error
from tests.conftest import AUTH, make_env, make_settings
from tests.support.api import open_account, pay
from tests.support.processes import BIN, check_allowed, wait_until

pytestmark = pytest.mark.processes  # runs the flask CLI as a subprocess


def flask(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    check_allowed("the flask CLI")
    return subprocess.run([str(BIN / "flask"), "--app", "api", "wallet", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def own(fresh_database_url, broker_url):
    """(settings, env, db, authenticated test client) on a fresh database."""
    settings = make_settings(fresh_database_url, broker_url)
    db = Database(settings)
    app = create_app(settings)
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = AUTH["Authorization"]
    yield settings, make_env(fresh_database_url, broker_url), db, client
    db.dispose()
    app.extensions["wallet"].db.dispose()


def apply_all(db) -> None:
    """Apply the pending payments in-process (the worker fixture serves the shared database only)."""
    from common import ledger
    def apply(s):
        ids = list(s.execute(text("SELECT id FROM payments WHERE status = 'pending' ORDER BY id")).scalars())
        ledger.apply_payments(s, ids)
    db.unit_of_work(apply)


def test_reconcile_clean_database(own):
    _, env, db, client = own
    assert flask(env, "reconcile").returncode == 0  # empty
    a = open_account(client, "100", name="r1")
    b = open_account(client, "5", currency_id=2, name="r2")
    c = open_account(client, currency_id=2, name="r3")
    pay(client, a["id"], open_account(client, name="r4")["id"], "30")
    pay(client, b["id"], c["id"], "10")  # fails: insufficient funds
    apply_all(db)
    result = flask(env, "reconcile")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "reconcile ok" in result.stdout
    assert "FAILED" not in result.stdout + result.stderr


def test_reconcile_reports_corruption(own):
    _, env, db, client = own
    a, b = open_account(client, "100", name="c1"), open_account(client, "50", name="c2")
    pay(client, a["id"], b["id"], "30")
    apply_all(db)
    assert flask(env, "reconcile").returncode == 0
    def corrupt(s):
        s.execute(text("UPDATE accounts SET balance = balance + 1 WHERE id = :id"), {"id": a["id"]})
    db.unit_of_work(corrupt)
    result = flask(env, "reconcile")
    assert result.returncode != 0
    report = result.stderr
    assert "RECONCILE FAILED: 2 violation(s)" in report, report
    assert "USD: balances sum to 1" in report  # money created
    assert f"account {a['id']}: balance 71" in report and "entries sum to 70" in report

    def corrupt_more(s):  # a negative balance, with the totals and entries made to agree
        # the schema refuses negative balances and changed entries itself: drop those guards in
        # this throw-away database
        s.execute(text("ALTER TABLE accounts DROP CONSTRAINT accounts_customer_balance_nonnegative,"
                       " DROP CONSTRAINT accounts_customer_available_nonnegative"))
        s.execute(text("ALTER TABLE ledger_entries DISABLE TRIGGER ledger_entries_never_changed"))
        s.execute(text("UPDATE accounts SET balance = balance - 1 WHERE id = :id"), {"id": a["id"]})
        s.execute(text("UPDATE accounts SET balance = -5 WHERE id = :id"), {"id": b["id"]})
        s.execute(text("UPDATE ledger_entries SET amount = amount - 85 WHERE account_id = :id"
                       " AND payment_id IS NULL"), {"id": b["id"]})
        s.execute(text("UPDATE accounts SET balance = balance + 85 WHERE id = -1"))
        s.execute(text("UPDATE ledger_entries SET amount = amount + 85 WHERE account_id = -1"
                       " AND id = (SELECT min(id) FROM ledger_entries WHERE account_id = -1)"))
    db.unit_of_work(corrupt_more)
    result = flask(env, "reconcile")
    assert result.returncode != 0
    assert "RECONCILE FAILED: 2 violation(s)" in result.stderr, result.stderr
    assert f"account {b['id']}: negative balance -5" in result.stderr
    assert f"account {b['id']}: available balance -5 is negative" in result.stderr


def test_reconcile_reports_payment_without_entries(own):
    _, env, db, client = own
    a, b = open_account(client, "10", name="p1"), open_account(client, name="p2")
    payment = pay(client, a["id"], b["id"], "1")
    def complete_without_entries(s):
        s.execute(text("UPDATE payments SET status = 'completed', amount_captured = amount, completed_at = now() WHERE id = :id"), {"id": payment["id"]})
    db.unit_of_work(complete_without_entries)
    result = flask(env, "reconcile")
    assert result.returncode != 0
    assert f"payment {payment['id']}: completed, captured 1, with 0 ledger entries" in result.stderr


def test_api_key_create_authenticates(fresh_database_url, broker_url):
    env = make_env(fresh_database_url, broker_url)
    settings = make_settings(fresh_database_url, broker_url, api_key_hashes=frozenset())
    app = create_app(settings)
    try:
        anonymous = app.test_client()
        assert_error(anonymous.get("/accounts", headers=AUTH), 401, "unauthorized")  # env keys not accepted here
        result = flask(env, "api-key", "create", "--name", "ci")
        assert result.returncode == 0, result.stderr
        key = result.stdout.strip().splitlines()[-1]
        assert key.startswith("wk_") and len(key) > 30
        # The API re-reads database keys every few seconds: poll, as a client would retry.
        wait_until(lambda: anonymous.get("/accounts", headers={"Authorization": f"Bearer {key}"}).status_code == 200,
                   15, "the new key to be accepted")
        created = anonymous.post("/accounts", json={"name": "k", "currency": "USD"},
                                 headers={"Authorization": f"Bearer {key}"})
        assert created.status_code == 201
        assert_error(anonymous.get("/accounts", headers={"Authorization": f"Bearer {key}x"}), 401, "unauthorized")
        assert_error(anonymous.get("/accounts"), 401, "unauthorized")
        with app.extensions["wallet"].db.read() as s:
            stored = s.execute(text("SELECT name, key_hash FROM api_keys")).all()
        assert [(n, len(h)) for n, h in stored] == [("ci", 64)]
        assert key not in str(stored)  # only the hash is kept
    finally:
        app.extensions["wallet"].db.dispose()
