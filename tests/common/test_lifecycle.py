"""Holds, captures, cancels, expiry and refunds (SPEC 9), on a real PostgreSQL, each test in a
transaction rolled back afterwards."""
from decimal import Decimal

import pytest
from sqlalchemy import text

from common import ledger
from common.errors import FailureCode, InvalidAmount, InvalidState, RefundExceedsPayment, ValidationFailed


@pytest.fixture
def currencies(session):
    return ledger.Currencies.load(session)


def open_(session, currencies, amount, name="a"):
    row, _ = ledger.open_account(session, currencies.by_id[1], name, Decimal(amount))
    return row["id"]


def submit(session, currencies, buyer, seller, amount, **kw):
    return ledger.submit_payment(session, currencies, ledger.PaymentRequest(buyer, seller, amount, **kw))[0]


def hold(session, currencies, buyer, seller, amount, **kw):
    payment = submit(session, currencies, buyer, seller, amount, capture_method="manual", **kw)
    [outcome] = ledger.apply_payments(session, [payment["id"]])
    return payment["id"], outcome


def account(session, account_id):
    return session.execute(text("SELECT balance, held FROM accounts WHERE id = :id"),
                           {"id": account_id}).one()


def payment(session, payment_id):
    return session.execute(text(f"SELECT {ledger.PAYMENT_COLUMNS} FROM payments WHERE id = :id"),
                           {"id": payment_id}).mappings().one()


def entries(session, payment_id):
    return session.execute(text("SELECT account_id, amount FROM ledger_entries WHERE payment_id = :p"
                                " ORDER BY id"), {"p": payment_id}).all()


def expire_now(session, payment_id):
    session.execute(text("UPDATE payments SET authorization_expires_at = now() - interval '1 second'"
                         " WHERE id = :id"), {"id": payment_id})


def test_manual_payment_holds_without_moving(session, currencies):
    buyer, seller = open_(session, currencies, "100"), open_(session, currencies, "0")
    payment_id, outcome = hold(session, currencies, buyer, seller, "30")
    assert outcome.status == "authorized"
    p = payment(session, payment_id)
    assert (p["status"], p["completed_at"], p["amount_captured"]) == ("authorized", None, None)
    assert p["authorization_expires_at"] is not None
    assert tuple(account(session, buyer)) == (Decimal("100"), Decimal("30"))
    assert entries(session, payment_id) == []  # holds write no entries
    assert ledger.reconcile(session) == []


def test_every_payment_needs_the_available_balance(session, currencies):
    buyer, seller = open_(session, currencies, "100"), open_(session, currencies, "0")
    hold(session, currencies, buyer, seller, "80")
    automatic = submit(session, currencies, buyer, seller, "30")
    [outcome] = ledger.apply_payments(session, [automatic["id"]])
    assert outcome.failure_code == FailureCode.INSUFFICIENT_FUNDS  # balance 100 but only 20 available
    _, second_hold = hold(session, currencies, buyer, seller, "21")
    assert second_hold.failure_code == FailureCode.INSUFFICIENT_FUNDS
    assert tuple(account(session, buyer)) == (Decimal("100"), Decimal("80"))


def test_partial_capture_moves_part_and_releases_the_rest(session, currencies):
    buyer, seller = open_(session, currencies, "100"), open_(session, currencies, "0")
    payment_id, _ = hold(session, currencies, buyer, seller, "30")
    row, captured = ledger.capture_payment(session, currencies, payment_id, "12.5")
    assert captured and (row["status"], row["amount_captured"]) == ("completed", Decimal("12.5"))
    assert row["completed_at"] is not None
    assert tuple(account(session, buyer)) == (Decimal("87.5"), Decimal("0"))
    assert tuple(account(session, seller)) == (Decimal("12.5"), Decimal("0"))
    assert entries(session, payment_id) == [(buyer, Decimal("-12.5")), (seller, Decimal("12.5"))]
    assert ledger.reconcile(session) == []


def test_capture_defaults_to_the_whole_amount_and_refuses_more(session, currencies):
    buyer, seller = open_(session, currencies, "100"), open_(session, currencies, "0")
    payment_id, _ = hold(session, currencies, buyer, seller, "30")
    with pytest.raises(InvalidAmount):
        ledger.capture_payment(session, currencies, payment_id, "30.01")
    with pytest.raises(InvalidAmount):
        ledger.capture_payment(session, currencies, payment_id, "1.001")  # past USD's scale
    row, _ = ledger.capture_payment(session, currencies, payment_id, None)
    assert row["amount_captured"] == Decimal("30")


def test_cancel_releases_the_hold(session, currencies):
    buyer, seller = open_(session, currencies, "100"), open_(session, currencies, "0")
    payment_id, _ = hold(session, currencies, buyer, seller, "30")
    row, _ = ledger.cancel_payment(session, payment_id)
    assert (row["status"], row["cancellation_reason"]) == ("canceled", "requested")
    assert tuple(account(session, buyer)) == (Decimal("100"), Decimal("0"))
    assert ledger.reconcile(session) == []


@pytest.mark.parametrize("first", ["capture", "cancel"])
def test_a_decided_hold_cannot_be_decided_again(session, currencies, first):
    buyer, seller = open_(session, currencies, "100"), open_(session, currencies, "0")
    payment_id, _ = hold(session, currencies, buyer, seller, "30")
    decide = {"capture": lambda: ledger.capture_payment(session, currencies, payment_id, None),
              "cancel": lambda: ledger.cancel_payment(session, payment_id)}
    decide[first]()
    for again in decide.values():
        with pytest.raises(InvalidState) as refused:
            again()
        assert refused.value.details["status"] == ("completed" if first == "capture" else "canceled")


def test_capture_and_cancel_of_a_pending_or_automatic_payment_are_refused(session, currencies):
    buyer, seller = open_(session, currencies, "100"), open_(session, currencies, "0")
    pending = submit(session, currencies, buyer, seller, "5", capture_method="manual")
    with pytest.raises(InvalidState):
        ledger.capture_payment(session, currencies, pending["id"], None)
    automatic = submit(session, currencies, buyer, seller, "5")
    ledger.apply_payments(session, [automatic["id"]])
    with pytest.raises(InvalidState):
        ledger.cancel_payment(session, automatic["id"])


def test_expiry_wins_once_its_time_has_passed(session, currencies):
    buyer, seller = open_(session, currencies, "100"), open_(session, currencies, "0")
    payment_id, _ = hold(session, currencies, buyer, seller, "30", authorization_expires_in=60)
    expire_now(session, payment_id)
    with pytest.raises(InvalidState) as refused:  # before the sweeper ran
        ledger.capture_payment(session, currencies, payment_id, None)
    assert refused.value.details == {"status": "authorized", "expired": True}
    assert payment_id in ledger.expire_authorizations(session)
    row = payment(session, payment_id)
    assert (row["status"], row["cancellation_reason"]) == ("canceled", "expired")
    assert tuple(account(session, buyer)) == (Decimal("100"), Decimal("0"))
    assert payment_id not in ledger.expire_authorizations(session)
    assert ledger.reconcile(session) == []


def test_frozen_account_blocks_new_holds_not_their_capture(session, currencies):
    buyer, seller = open_(session, currencies, "100"), open_(session, currencies, "0")
    payment_id, _ = hold(session, currencies, buyer, seller, "30")
    ledger.set_account_status(session, buyer, "frozen")
    _, refused = hold(session, currencies, buyer, seller, "1")
    assert refused.failure_code == FailureCode.ACCOUNT_FROZEN
    row, _ = ledger.capture_payment(session, currencies, payment_id, None)
    assert row["status"] == "completed"


def test_atomic_batch_of_holds_is_all_or_nothing(session, currencies):
    buyer, seller = open_(session, currencies, "50"), open_(session, currencies, "0")
    reqs = [ledger.PaymentRequest(buyer, seller, amount, capture_method="manual") for amount in ("20", "20")]
    batch_id, _, _ = ledger.submit_batch(session, currencies, reqs, atomic=True)
    assert {o.status for o in ledger.apply_atomic_batch(session, batch_id)} == {"authorized"}
    assert tuple(account(session, buyer)) == (Decimal("50"), Decimal("40"))
    reqs.append(ledger.PaymentRequest(buyer, seller, "20", capture_method="manual"))
    batch_id, _, _ = ledger.submit_batch(session, currencies, reqs, atomic=True)
    outcomes = ledger.apply_atomic_batch(session, batch_id)
    assert {o.status for o in outcomes} == {"failed"}
    assert tuple(account(session, buyer)) == (Decimal("50"), Decimal("40"))  # nothing more held


def completed(session, currencies, buyer, seller, amount):
    p = submit(session, currencies, buyer, seller, amount)
    ledger.apply_payments(session, [p["id"]])
    return p["id"]


def test_refunds_partial_then_the_rest(session, currencies):
    buyer, seller = open_(session, currencies, "100"), open_(session, currencies, "0")
    original = completed(session, currencies, buyer, seller, "40")
    first, created = ledger.refund_payment(session, currencies, original, "15", reference="r-1",
                                           metadata={"why": "damaged"})
    assert created and (first["buyer_account_id"], first["seller_account_id"]) == (seller, buyer)
    assert (first["refund_of"], first["amount"], first["reference"], first["metadata"]) == (
        original, Decimal("15"), "r-1", {"why": "damaged"})
    rest, _ = ledger.refund_payment(session, currencies, original, None)
    assert rest["amount"] == Decimal("25")  # the default: what is left
    with pytest.raises(RefundExceedsPayment):
        ledger.refund_payment(session, currencies, original, "0.01")
    assert payment(session, original)["amount_refunded"] == 0  # nothing completed yet
    ledger.apply_payments(session, [first["id"], rest["id"]])
    assert payment(session, original)["amount_refunded"] == Decimal("40")
    assert account(session, buyer).balance == Decimal("100")
    assert ledger.reconcile(session) == []


def test_a_failed_refund_frees_its_amount(session, currencies):
    buyer, seller = open_(session, currencies, "100"), open_(session, currencies, "0")
    original = completed(session, currencies, buyer, seller, "40")
    spend = completed(session, currencies, seller, buyer, "30")  # the seller spends most of it
    assert spend
    refund, _ = ledger.refund_payment(session, currencies, original, "40")
    [outcome] = ledger.apply_payments(session, [refund["id"]])
    assert outcome.failure_code == FailureCode.INSUFFICIENT_FUNDS  # never a negative balance
    again, _ = ledger.refund_payment(session, currencies, original, "10")
    assert again["amount"] == Decimal("10")
    assert ledger.reconcile(session) == []


def test_refund_of_a_captured_hold_is_capped_by_the_captured_amount(session, currencies):
    buyer, seller = open_(session, currencies, "100"), open_(session, currencies, "0")
    payment_id, _ = hold(session, currencies, buyer, seller, "30")
    with pytest.raises(InvalidState):  # authorized: nothing to refund yet
        ledger.refund_payment(session, currencies, payment_id, None)
    ledger.capture_payment(session, currencies, payment_id, "10")
    with pytest.raises(RefundExceedsPayment):
        ledger.refund_payment(session, currencies, payment_id, "10.01")
    refund, _ = ledger.refund_payment(session, currencies, payment_id, None)
    assert refund["amount"] == Decimal("10")
    with pytest.raises(ValidationFailed):  # a refund of a refund
        ledger.refund_payment(session, currencies, refund["id"], None)


def test_reconcile_finds_a_held_amount_without_its_authorization(session, currencies):
    buyer, seller = open_(session, currencies, "100"), open_(session, currencies, "0")
    hold(session, currencies, buyer, seller, "30")
    session.execute(text("UPDATE accounts SET held = held + 1 WHERE id = :id"), {"id": buyer})
    assert any(f"account {buyer}: held 31" in p for p in ledger.reconcile(session))


def test_reconcile_finds_an_over_refunded_payment(session, currencies):
    buyer, seller = open_(session, currencies, "100"), open_(session, currencies, "0")
    original = completed(session, currencies, buyer, seller, "40")
    refund, _ = ledger.refund_payment(session, currencies, original, "40")
    session.execute(text("UPDATE payments SET amount = 41 WHERE id = :id"), {"id": refund["id"]})
    assert any(f"payment {original}: captured 40, refunds claim 41" in p for p in ledger.reconcile(session))
