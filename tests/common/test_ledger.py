"""The ledger's rules, on a real PostgreSQL, each test in a transaction rolled back afterwards."""
from decimal import Decimal

import pytest
from sqlalchemy import text

from common import ledger
from common.errors import (
    CurrencyMismatch, FailureCode, IdempotencyConflict, InvalidAmount, SameAccount, UnknownAccount,
    ValidationFailed,
)


@pytest.fixture
def currencies(session):
    return ledger.Currencies.load(session)


def open_(session, currencies, amount, currency_id=1, name="a"):
    row, created = ledger.open_account(session, currencies.by_id[currency_id], name, Decimal(amount))
    assert created
    return row["id"]


def pay(session, currencies, buyer, seller, amount, currency_id=None):
    return ledger.submit_payment(session, currencies,
                                 ledger.PaymentRequest(buyer, seller, amount, currency_id))[0]


def balance(session, account_id):
    return session.execute(text("SELECT balance FROM accounts WHERE id = :id"), {"id": account_id}).scalar_one()


def test_seeded_currencies(currencies):
    assert currencies.by_id[1].code == "USD"
    assert {c.code: c.scale for c in currencies.by_id.values()} == {"USD": 2, "EUR": 2, "BTC": 8, "ETH": 18}


def test_opening_balance_is_an_entry_from_issuance(session, currencies):
    account = open_(session, currencies, "1000")
    entries = session.execute(text(
        "SELECT account_id, amount, payment_id FROM ledger_entries WHERE account_id IN (:a, -1)"
        " ORDER BY id DESC LIMIT 2"), {"a": account}).all()
    assert {(e.account_id, e.amount, e.payment_id) for e in entries} == {
        (account, Decimal("1000"), None), (-1, Decimal("-1000"), None)}
    assert ledger.reconcile(session) == []


def test_apply_moves_money_and_writes_entries(session, currencies):
    buyer, seller = open_(session, currencies, "1000"), open_(session, currencies, "0")
    payment = pay(session, currencies, buyer, seller, Decimal("500.1"))
    assert payment["status"] == "pending"
    [outcome] = ledger.apply_payments(session, [payment["id"]])
    assert outcome.status == "completed"
    assert (balance(session, buyer), balance(session, seller)) == (Decimal("499.9"), Decimal("500.1"))
    assert ledger.reconcile(session) == []


def test_apply_is_idempotent(session, currencies):
    buyer, seller = open_(session, currencies, "10"), open_(session, currencies, "0")
    payment = pay(session, currencies, buyer, seller, "10")
    assert len(ledger.apply_payments(session, [payment["id"]])) == 1
    assert ledger.apply_payments(session, [payment["id"]]) == []  # redelivered: nothing happens
    assert balance(session, seller) == 10


def test_insufficient_funds_fails_without_moving_money(session, currencies):
    buyer, seller = open_(session, currencies, "5"), open_(session, currencies, "0")
    payment = pay(session, currencies, buyer, seller, "5.01")
    [outcome] = ledger.apply_payments(session, [payment["id"]])
    assert outcome.failure_code == FailureCode.INSUFFICIENT_FUNDS
    assert (balance(session, buyer), balance(session, seller)) == (5, 0)
    assert ledger.reconcile(session) == []


def test_each_payment_judged_in_order_as_if_alone(session, currencies):
    a, b, c = (open_(session, currencies, x) for x in ("10", "0", "0"))
    p1 = pay(session, currencies, a, b, "6")
    p2 = pay(session, currencies, a, c, "6")   # only 4 left after p1
    p3 = pay(session, currencies, b, c, "6")   # b received 6 from p1
    outcomes = ledger.apply_payments(session, [p3["id"], p1["id"], p2["id"]])
    assert [(o.payment_id, o.failure_code) for o in outcomes] == [
        (p1["id"], None), (p2["id"], FailureCode.INSUFFICIENT_FUNDS), (p3["id"], None)]
    assert [balance(session, x) for x in (a, b, c)] == [4, 0, 6]


def test_frozen_account_fails_payment(session, currencies):
    buyer, seller = open_(session, currencies, "10"), open_(session, currencies, "0")
    ledger.set_account_status(session, seller, "frozen")
    payment = pay(session, currencies, buyer, seller, "1")
    [outcome] = ledger.apply_payments(session, [payment["id"]])
    assert outcome.failure_code == FailureCode.ACCOUNT_FROZEN


# (request made from accounts a and b in USD, x in EUR; the error it must raise)
REFUSALS = [
    (lambda a, b, x: ledger.PaymentRequest(a, a, "1"), SameAccount),
    (lambda a, b, x: ledger.PaymentRequest(a, 10**15, "1"), UnknownAccount),
    (lambda a, b, x: ledger.PaymentRequest(a, x, "1"), CurrencyMismatch),
    (lambda a, b, x: ledger.PaymentRequest(a, b, "1", currency_id=2), CurrencyMismatch),
    (lambda a, b, x: ledger.PaymentRequest(a, b, "1.001"), InvalidAmount),
]


@pytest.mark.parametrize("make, error", REFUSALS)
def test_submit_refuses_and_writes_nothing(session, currencies, make, error):
    a, b = open_(session, currencies, "10"), open_(session, currencies, "0")
    eur = open_(session, currencies, "0", currency_id=2)
    before = session.execute(text("SELECT count(*) FROM payments")).scalar_one()
    with pytest.raises(error):
        ledger.submit_payment(session, currencies, make(a, b, eur))
    assert session.execute(text("SELECT count(*) FROM payments")).scalar_one() == before


def test_batch_lists_every_bad_item(session, currencies):
    a, b = open_(session, currencies, "10"), open_(session, currencies, "0")
    reqs = [ledger.PaymentRequest(a, b, "1"), ledger.PaymentRequest(a, 10**15, "1"),
            ledger.PaymentRequest(a, b, "1"), ledger.PaymentRequest(b, b, "1")]
    with pytest.raises(ValidationFailed) as err:
        ledger.submit_batch(session, currencies, reqs, atomic=False)
    assert [(d["index"], d["code"]) for d in err.value.details] == [(1, "unknown_account"), (3, "same_account")]


def test_atomic_batch_all_or_nothing(session, currencies):
    a, b, c = (open_(session, currencies, x) for x in ("10", "0", "0"))
    reqs = [ledger.PaymentRequest(a, b, "5"), ledger.PaymentRequest(b, c, "5"),   # chain A->B->C
            ledger.PaymentRequest(c, a, "100")]                                   # cannot pay
    batch_id, rows, _ = ledger.submit_batch(session, currencies, reqs, atomic=True)
    assert ledger.apply_payments(session, [r["id"] for r in rows]) == []  # not on the single path
    outcomes = ledger.apply_atomic_batch(session, batch_id)
    assert [o.failure_code for o in outcomes] == [
        FailureCode.BATCH_FAILED, FailureCode.BATCH_FAILED, FailureCode.INSUFFICIENT_FUNDS]
    assert [balance(session, x) for x in (a, b, c)] == [10, 0, 0]
    assert ledger.reconcile(session) == []


def test_atomic_chain_completes(session, currencies):
    a, b, c = (open_(session, currencies, x) for x in ("10", "0", "0"))
    reqs = [ledger.PaymentRequest(a, b, "5"), ledger.PaymentRequest(b, c, "5")]
    batch_id, _, _ = ledger.submit_batch(session, currencies, reqs, atomic=True)
    assert [o.status for o in ledger.apply_atomic_batch(session, batch_id)] == ["completed"] * 2
    assert [balance(session, x) for x in (a, b, c)] == [5, 0, 5]


def test_idempotency_key_replays_and_conflicts(session, currencies):
    a, b = open_(session, currencies, "10"), open_(session, currencies, "0")
    req = ledger.PaymentRequest(a, b, "1")
    key = ledger.IdempotencyKey.for_request("client", "k1", "payment", req.canonical(Decimal(1)))
    first, created = ledger.submit_payment(session, currencies, req, key)
    again, created_again = ledger.submit_payment(session, currencies, req, key)
    assert (created, created_again, again["id"]) == (True, False, first["id"])
    other = ledger.IdempotencyKey.for_request("client", "k1", "payment", req.canonical(Decimal(2)))
    with pytest.raises(IdempotencyConflict):
        ledger.submit_payment(session, currencies, ledger.PaymentRequest(a, b, "2"), other)


def test_reconcile_reports_violations(session, currencies):
    account = open_(session, currencies, "10")
    session.execute(text("UPDATE accounts SET balance = balance + 1 WHERE id = :id"), {"id": account})
    problems = ledger.reconcile(session)
    assert any("USD: balances sum to 1" in p for p in problems)
    assert any(f"account {account}: balance 11 but its entries sum to 10" in p for p in problems)


def test_reconcile_reports_a_payment_naming_no_account_of_its_currency(session, currencies):
    usd, eur = open_(session, currencies, "10"), open_(session, currencies, "10", currency_id=2)
    other = open_(session, currencies, "10")
    stray = sorted(session.execute(text(
        "INSERT INTO payments (buyer_account_id, seller_account_id, currency_id, amount)"
        " VALUES (:usd, :eur, 1, 1), (:usd, 999999999, 1, 1), (:usd, :other, 1, 1) RETURNING id"
    ), {"usd": usd, "eur": eur, "other": other}).scalars().all())
    message = "payment {}: its buyer or seller is not an account of its currency"
    about_these = set(ledger.reconcile(session, events=False)) & {message.format(i) for i in stray}
    assert about_these == {message.format(i) for i in stray[:2]}


def test_reconcile_reports_a_payment_naming_a_missing_batch(session, currencies):
    """payments.batch_id has no foreign key (migration 0007): reconcile checks it."""
    buyer, seller = open_(session, currencies, "10"), open_(session, currencies, "0")
    batch = session.execute(text("INSERT INTO batches (atomic, total) VALUES (false, 2) RETURNING id")).scalar_one()
    stray, fine = session.execute(text(
        "INSERT INTO payments (buyer_account_id, seller_account_id, currency_id, amount, batch_id)"
        " VALUES (:b, :s, 1, 1, 999999999), (:b, :s, 1, 1, :batch) RETURNING id"
    ), {"b": buyer, "s": seller, "batch": batch}).scalars().all()
    problems = ledger.reconcile(session, events=False)
    assert f"payment {stray}: its batch does not exist" in problems
    assert not any(p.startswith(f"payment {fine}:") for p in problems)


@pytest.mark.parametrize("table", ["accounts", "currencies"])
def test_accounts_and_currencies_are_never_removed(session, currencies, table):
    """Payments name them without a foreign key (migration 0004): the database refuses to remove
    one, row by row or all at once, even one that no payment names yet."""
    row_id = open_(session, currencies, "0") if table == "accounts" else 4
    for statement in (f"DELETE FROM {table} WHERE id = {row_id}", f"TRUNCATE {table} CASCADE"):
        with pytest.raises(Exception, match="never removed") as caught:
            with session.begin_nested():
                session.execute(text(statement))
        assert caught.value.orig.pgcode == "23001"  # restrict_violation


def test_reconcile_reports_a_ledger_entry_naming_a_missing_account_or_payment(session, currencies):
    account = open_(session, currencies, "10")
    payment = pay(session, currencies, account, open_(session, currencies, "0"), "1")["id"]
    stray = sorted(session.execute(text(
        "INSERT INTO ledger_entries (account_id, payment_id, amount, balance_after)"
        " VALUES (999999999, NULL, 1, 1), (:a, 999999999, 1, 11), (:a, :p, 1, 12) RETURNING id"
    ), {"a": account, "p": payment}).scalars().all())
    message = "ledger entry {}: its account or its payment does not exist"
    about_these = set(ledger.reconcile(session, events=False)) & {message.format(i) for i in stray}
    assert about_these == {message.format(i) for i in stray[:2]}


@pytest.mark.parametrize("statement", [
    "DELETE FROM payments WHERE id = {payment}", "TRUNCATE payments CASCADE",
    "UPDATE ledger_entries SET amount = amount + 1 WHERE payment_id = {payment}",
    "DELETE FROM ledger_entries WHERE payment_id = {payment}", "TRUNCATE ledger_entries",
    "DELETE FROM batches WHERE id = {batch}", "TRUNCATE batches CASCADE",
])
def test_the_ledger_is_append_only(session, currencies, statement):
    """Entries name their payment and account without a foreign key (migration 0005), payments their
    batch (0007): payments and batches are never removed, entries never changed nor removed."""
    payment = pay(session, currencies, open_(session, currencies, "10"), open_(session, currencies, "0"), "1")["id"]
    ledger.apply_payments(session, [payment])
    batch = session.execute(text("INSERT INTO batches (atomic, total) VALUES (false, 0) RETURNING id")).scalar_one()
    with pytest.raises(Exception, match="the ledger is append-only") as caught:
        with session.begin_nested():
            session.execute(text(statement.format(payment=payment, batch=batch)))
    assert caught.value.orig.pgcode == "23001"  # restrict_violation


def test_database_refuses_negative_customer_balance(session, currencies):
    account = open_(session, currencies, "1")
    with pytest.raises(Exception, match="accounts_customer_(balance|available)_nonnegative"):
        with session.begin_nested():
            session.execute(text("UPDATE accounts SET balance = -1 WHERE id = :id"), {"id": account})


def test_micro_batch_gives_the_same_result_as_one_by_one(session, currencies):
    """The same payments over two identical sets of accounts: applied all in one transaction, or
    each alone in its own call, end with the same outcomes and balances."""
    import random
    rng = random.Random(3)
    openings = ["30", "5", "12.5", "0", "7"]
    plan = [(rng.randrange(5), rng.randrange(5), rng.choice(["1", "2.5", "6", "11", "0.01"]))
            for _ in range(200)]
    plan = [(b, s, a) for b, s, a in plan if b != s]

    def run(apply_together: bool):
        ids = [open_(session, currencies, x) for x in openings]
        reqs = [ledger.PaymentRequest(ids[b], ids[s], a) for b, s, a in plan]
        rows = ledger.submit_payments(session, currencies, reqs)
        payment_ids = [r["id"] for r in rows]
        if apply_together:
            outcomes = ledger.apply_payments(session, payment_ids)
        else:
            outcomes = [o for pid in payment_ids for o in ledger.apply_payments(session, [pid])]
        return [o.failure_code for o in outcomes], [balance(session, i) for i in ids]

    together, alone = run(True), run(False)
    assert together == alone
    assert FailureCode.INSUFFICIENT_FUNDS in together[0] and None in together[0]
    assert ledger.reconcile(session) == []


@pytest.mark.parametrize("make, error", REFUSALS)
def test_accept_alone_refuses_like_submit_and_writes_nothing(db, make, error):
    """accept_payment without a key runs the INSERT alone (autocommit, prepared): same checks."""
    def setup(s):
        currencies = ledger.Currencies.load(s)
        a, b = open_(s, currencies, "10"), open_(s, currencies, "0")
        eur = open_(s, currencies, "0", currency_id=2)
        before = s.execute(text("SELECT count(*) FROM payments")).scalar_one()
        return currencies, a, b, eur, before
    currencies, a, b, eur, before = db.unit_of_work(setup)
    with pytest.raises(error):
        ledger.accept_payment(db, currencies, make(a, b, eur))
    with db.read() as s:
        assert s.execute(text("SELECT count(*) FROM payments")).scalar_one() == before


def test_accept_alone_records_a_pending_payment(db):
    def setup(s):
        currencies = ledger.Currencies.load(s)
        a, b = open_(s, currencies, "10"), open_(s, currencies, "0")
        return currencies, a, b
    currencies, a, b = db.unit_of_work(setup)
    row, created = ledger.accept_payment(db, currencies, ledger.PaymentRequest(a, b, "2.50"))
    assert created and row["status"] == "pending" and row["amount"] == Decimal("2.50")
    assert (row["buyer_account_id"], row["seller_account_id"], row["currency_id"]) == (a, b, 1)
    with db.read() as s:
        assert s.execute(text("SELECT status FROM payments WHERE id = :id"), {"id": row["id"]}).scalar_one() == "pending"


def test_apply_never_scans_a_table_whatever_the_planner_costs(session, currencies):
    """An apply transaction reaches its rows by key: even with costs that make every index look
    ruinous (so the planner would seq-scan accounts and payments into hash joins, as it did with
    statistics taken while the tables were small), it reads no table sequentially."""
    accounts = [open_(session, currencies, "100", name=f"s{i}") for i in range(6)]
    payments = [pay(session, currencies, accounts[i], accounts[(i + 1) % 6], "1")["id"] for i in range(6)]
    session.execute(text("SET LOCAL random_page_cost = 100000"))

    def seq_scans():
        return dict(session.execute(text(
            "SELECT relname, seq_scan FROM pg_stat_xact_user_tables"
            " WHERE relname IN ('accounts', 'payments', 'ledger_entries', 'batches')")).tuples().all())

    before = seq_scans()
    outcomes = ledger.apply_payments(session, payments)
    assert [o.status for o in outcomes] == ["completed"] * 6
    assert seq_scans() == before
