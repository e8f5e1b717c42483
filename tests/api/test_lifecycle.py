"""The lifecycle endpoints (SPEC 9) through the Flask app: holds, capture, cancel, refunds,
metadata and reference. Payments are applied in-process with the worker's ledger function."""
from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from sqlalchemy import text

from common import ledger
from tests.api.conftest import assert_error
from tests.support.api import open_account, pay
from tests.support.db import committing


@pytest.fixture
def apply(db):
    def run(*payment_ids: int) -> None:
        with committing(db) as s:
            ledger.apply_payments(s, list(payment_ids))
    return run


def get(client, path):
    response = client.get(path)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def authorized(client, apply, amount="30", opening="100", **extra):
    buyer, seller = open_account(client, opening, name="hb"), open_account(client, name="hs")
    payment = pay(client, buyer["id"], seller["id"], amount, capture_method="manual", **extra)
    apply(payment["id"])
    return get(client, f"/payments/{payment['id']}"), buyer, seller


def test_manual_payment_is_authorized_and_held(client, apply):
    payment, buyer, _ = authorized(client, apply, authorization_expires_in=3600)
    assert (payment["status"], payment["capture_method"], payment["amount_captured"]) == (
        "authorized", "manual", None)
    expires = datetime.fromisoformat(payment["authorization_expires_at"])
    created = datetime.fromisoformat(payment["created_at"])
    assert timedelta(seconds=3599) < expires - created < timedelta(seconds=3601)
    account = get(client, f"/accounts/{buyer['id']}")
    assert (account["balance"], account["held"], account["available"]) == ("100", "30", "70")


def test_default_expiry_is_seven_days(client, apply):
    payment, _, _ = authorized(client, apply)
    delta = datetime.fromisoformat(payment["authorization_expires_at"]) - datetime.fromisoformat(
        payment["created_at"])
    assert abs(delta - timedelta(days=7)) < timedelta(seconds=1)


def test_capture_part_answers_200_completed(client, apply):
    payment, buyer, seller = authorized(client, apply)
    response = client.post(f"/payments/{payment['id']}/capture", json={"amount": "12.5"})
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert (body["status"], body["amount_captured"], body["amount"]) == ("completed", "12.5", "30")
    assert get(client, f"/accounts/{buyer['id']}")["balance"] == "87.5"
    assert get(client, f"/accounts/{buyer['id']}")["held"] == "0"
    assert get(client, f"/accounts/{seller['id']}")["balance"] == "12.5"


def test_capture_without_body_takes_all(client, apply):
    payment, _, _ = authorized(client, apply)
    response = client.post(f"/payments/{payment['id']}/capture")
    assert response.status_code == 200 and response.get_json()["amount_captured"] == "30"


def test_cancel_then_capture_is_409_with_status(client, apply):
    payment, buyer, _ = authorized(client, apply)
    response = client.post(f"/payments/{payment['id']}/cancel")
    assert response.status_code == 200
    assert (response.get_json()["status"], response.get_json()["cancellation_reason"]) == ("canceled", "requested")
    assert get(client, f"/accounts/{buyer['id']}")["available"] == "100"
    error = assert_error(client.post(f"/payments/{payment['id']}/capture"), 409, "invalid_state")
    assert error["details"]["status"] == "canceled"
    assert_error(client.post(f"/payments/{payment['id']}/cancel"), 409, "invalid_state")


def test_capture_above_the_authorized_amount_is_422(client, apply):
    payment, _, _ = authorized(client, apply)
    assert_error(client.post(f"/payments/{payment['id']}/capture", json={"amount": "30.01"}), 422,
                 "invalid_amount")
    assert get(client, f"/payments/{payment['id']}")["status"] == "authorized"


def test_expired_authorization_refuses_capture_before_the_sweeper(client, apply, db):
    payment, _, _ = authorized(client, apply)
    with committing(db) as s:
        s.execute(text("UPDATE payments SET authorization_expires_at = now() WHERE id = :id"),
                  {"id": payment["id"]})
    error = assert_error(client.post(f"/payments/{payment['id']}/capture"), 409, "invalid_state")
    assert error["details"] == {"status": "authorized", "expired": True}


def test_capture_and_cancel_honour_idempotency_keys(client, apply):
    payment, _, _ = authorized(client, apply)
    path = f"/payments/{payment['id']}/capture"
    first = client.post(path, json={"amount": "10"}, headers={"Idempotency-Key": "cap-1"})
    again = client.post(path, json={"amount": "10.00"}, headers={"Idempotency-Key": "cap-1"})
    assert first.status_code == again.status_code == 200
    assert first.get_json() == again.get_json()
    assert_error(client.post(path, json={"amount": "11"}, headers={"Idempotency-Key": "cap-1"}), 409,
                 "idempotency_conflict")


def test_refunds_through_the_api(client, apply):
    buyer, seller = open_account(client, "100", name="rb"), open_account(client, name="rs")
    original = pay(client, buyer["id"], seller["id"], "40", reference="order-7")
    apply(original["id"])
    response = client.post(f"/payments/{original['id']}/refunds", json={"amount": "15"})
    assert response.status_code == 202, response.get_data(as_text=True)
    refund = response.get_json()
    assert response.headers["Location"] == f"/payments/{refund['id']}"
    assert (refund["status"], refund["refund_of"], refund["buyer_account_id"], refund["amount"]) == (
        "pending", original["id"], seller["id"], "15")
    error = assert_error(client.post(f"/payments/{original['id']}/refunds", json={"amount": "25.01"}),
                         422, "refund_exceeds_payment")
    assert error["details"]["refundable"] == "25"
    apply(refund["id"])
    assert get(client, f"/payments/{original['id']}")["amount_refunded"] == "15"
    listed = get(client, f"/payments?refund_of={original['id']}")["payments"]
    assert [p["id"] for p in listed] == [refund["id"]]
    assert_error(client.post(f"/payments/{refund['id']}/refunds"), 422, "validation_error")


def test_refund_of_a_pending_payment_is_409(client):
    buyer, seller = open_account(client, "100", name="pb"), open_account(client, name="ps")
    pending = pay(client, buyer["id"], seller["id"], "5")
    error = assert_error(client.post(f"/payments/{pending['id']}/refunds"), 409, "invalid_state")
    assert error["details"]["status"] == "pending"


def test_unknown_payment_is_404_for_every_action(client):
    for action in ("capture", "cancel", "refunds"):
        assert_error(client.post(f"/payments/987654321/{action}"), 404, "not_found")


def test_metadata_and_reference_round_trip_and_filter(client):
    meta = {"order_id": "A-1001", "k.e-y_9": "v" * 500}
    response = client.post("/accounts", json={"name": "m", "currency": "USD", "amount": "5", "metadata": meta})
    assert response.status_code == 201 and response.get_json()["metadata"] == meta
    account = response.get_json()
    assert get(client, f"/accounts/{account['id']}")["metadata"] == meta
    seller = open_account(client, name="ms")
    reference = "ref " + datetime.now().isoformat()
    payment = pay(client, account["id"], seller["id"], "1", reference=reference, metadata={"a": "b"})
    assert (payment["reference"], payment["metadata"]) == (reference, {"a": "b"})
    assert seller["metadata"] == {}
    listed = get(client, f"/payments?reference={reference}")["payments"]
    assert [p["id"] for p in listed] == [payment["id"]]


def test_batch_items_take_the_lifecycle_fields(client, db):
    buyer, seller, fee = (open_account(client, "100", name="sb"), open_account(client, name="ss"),
                          open_account(client, name="fee"))
    response = client.post("/payments/batch", json={"atomic": True, "payments": [
        {"buyer_account_id": buyer["id"], "seller_account_id": seller["id"], "amount": "95",
         "capture_method": "manual", "reference": "split-1"},
        {"buyer_account_id": buyer["id"], "seller_account_id": fee["id"], "amount": "5",
         "capture_method": "manual", "reference": "split-1", "metadata": {"kind": "fee"}},
    ]})
    assert response.status_code == 202, response.get_data(as_text=True)
    batch = response.get_json()
    with committing(db) as s:
        ledger.apply_atomic_batch(s, batch["batch_id"])
    counts = get(client, f"/batches/{batch['batch_id']}")
    assert counts["counts"]["authorized"] == 2 and counts["finished"] is True
    assert get(client, f"/accounts/{buyer['id']}")["available"] == "0"
