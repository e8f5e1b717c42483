"""open_payments (migration 0006): the database keeps one row per pending or authorized payment,
whoever writes the payment, and applying a payment is a heap-only (HOT) update of its row. Each
test in a transaction rolled back afterwards."""
from sqlalchemy import text

from common import ledger
from tests.common.test_lifecycle import currencies, open_, submit  # noqa: F401 (currencies: a fixture)


def pay(session, currencies, buyer, seller, amount, **kw):
    return submit(session, currencies, buyer, seller, amount, **kw)["id"]


def listed(session, buyer):
    """The open_payments rows of this buyer's payments (other tests may leave theirs)."""
    return dict(session.execute(text(
        "SELECT o.payment_id, o.status FROM open_payments o JOIN payments p ON p.id = o.payment_id"
        " WHERE p.buyer_account_id = :buyer"), {"buyer": buyer}).all())


def test_open_payments_follow_every_status_change(session, currencies):
    buyer, seller = open_(session, currencies, "100"), open_(session, currencies, "0", "b")
    paid = pay(session, currencies, buyer, seller, "10")
    refused = pay(session, currencies, buyer, seller, "1000")
    held = [pay(session, currencies, buyer, seller, "5", capture_method="manual") for _ in range(3)]
    assert listed(session, buyer) == {i: "pending" for i in [paid, refused, *held]}

    ledger.apply_payments(session, [paid, refused, *held])
    assert listed(session, buyer) == {i: "authorized" for i in held}
    expiry = session.execute(text("SELECT authorization_expires_at FROM payments WHERE id = :id"),
                             {"id": held[0]}).scalar_one()
    assert session.execute(text("SELECT authorization_expires_at FROM open_payments WHERE payment_id = :id"),
                           {"id": held[0]}).scalar_one() == expiry

    ledger.capture_payment(session, currencies, held[0], None)
    ledger.cancel_payment(session, held[1])
    session.execute(text("UPDATE payments SET authorization_expires_at = now() - interval '1 second'"
                         " WHERE id = :id"), {"id": held[2]})
    assert held[2] in ledger.expire_authorizations(session)  # found through open_payments' expiry
    assert listed(session, buyer) == {}

    # Any writer, not only the ledger's statements: the triggers keep the rows.
    batch = ledger.submit_payments(session, currencies, [ledger.PaymentRequest(buyer, seller, "1")] * 3)
    ids = [p["id"] for p in batch]
    session.execute(text("UPDATE payments SET status = 'failed', failure_code = 'insufficient_funds',"
                         " completed_at = now() WHERE id = :id"), {"id": ids[0]})
    assert listed(session, buyer) == {ids[1]: "pending", ids[2]: "pending"}
    assert not [p for p in ledger.reconcile(session, events=False) if "open_payments" in p]


def test_applying_a_payment_is_a_heap_only_update(session, currencies):
    """No index of payments names a column the apply UPDATE changes, and the page has room for
    the new version (fillfactor): PostgreSQL writes no index entry for it. An index on `status`
    (or on `completed_at`, `failure_code`...) would make these counts differ."""
    buyer, seller = open_(session, currencies, "100"), open_(session, currencies, "0", "b")
    ids = [pay(session, currencies, buyer, seller, "1") for _ in range(20)]

    def updates():  # this transaction's own counts, up to date at once
        return session.execute(text(
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables WHERE relname = 'payments'"
        )).one()

    before = updates()
    outcomes = ledger.apply_payments(session, ids)
    after = updates()
    assert [o.status for o in outcomes] == ["completed"] * 20
    assert after.n_tup_upd - before.n_tup_upd == 20
    assert after.n_tup_hot_upd - before.n_tup_hot_upd == 20


def test_reconcile_reports_open_payments_out_of_step(session, currencies):
    buyer, seller = open_(session, currencies, "100"), open_(session, currencies, "0", "b")
    pending = pay(session, currencies, buyer, seller, "1")
    done = pay(session, currencies, buyer, seller, "1")
    ledger.apply_payments(session, [done])
    session.execute(text("DELETE FROM open_payments WHERE payment_id = :id"), {"id": pending})
    session.execute(text("INSERT INTO open_payments (payment_id, status) VALUES (:id, 'pending')"),
                    {"id": done})
    problems = ledger.reconcile(session)
    assert f"payment {pending}: pending, but listed in open_payments as nothing" in problems
    assert f"payment {done}: not open, but listed in open_payments as pending" in problems
