"""The 202 answer of an accepted payment is built from the request and the few columns the INSERT
returns (common.ledger.accepting._accepted_rows): it must be what reading the row gives."""
from __future__ import annotations

import uuid

from api import render
from common import queries
from tests.support.api import open_account

# Set by the worker once it applies the payment (one may run during the session).
APPLIED_LATER = {"status", "failure_code", "completed_at", "amount_captured", "amount_refunded",
                 "cancellation_reason"}


def _stored(app, db, payment_id: int) -> dict:
    with db.read() as s:
        return render.payment(queries.get_payment(s, payment_id), app.extensions["wallet"].currencies)


def _assert_as_stored(app, db, answered: dict) -> None:
    stored = _stored(app, db, answered["id"])
    assert set(answered) == set(stored)
    assert {k: v for k, v in answered.items() if k not in APPLIED_LATER} == \
           {k: v for k, v in stored.items() if k not in APPLIED_LATER}
    assert answered["status"] == "pending" and answered["amount_refunded"] == "0"
    assert answered["completed_at"] is None and answered["amount_captured"] is None
    assert answered["failure_code"] is None and answered["cancellation_reason"] is None


def test_batch_answer_is_the_stored_rows(app, client, db):
    a, b, c = (open_account(client, "1000", name=f"r{i}") for i in range(3))
    eth_a, eth_b = (open_account(client, "1", currency_id=4, name=f"e{i}") for i in range(2))
    items = [
        {"buyer_account_id": a["id"], "seller_account_id": b["id"], "amount": "1.50"},
        {"buyer_account_id": a["id"], "seller_account_id": c["id"], "amount": 2, "currency_id": 1,
         "reference": 'ref, with "quotes" and \\ {braces}', "metadata": {"z": "1", "a": "NULL", "b.c": "é \"q\" {x}"}},
        {"buyer_account_id": b["id"], "seller_account_id": a["id"], "amount": "0.01",
         "capture_method": "manual", "authorization_expires_in": 3600},
        {"buyer_account_id": eth_a["id"], "seller_account_id": eth_b["id"],
         "amount": "0.123456789012345678"},
        {"buyer_account_id": c["id"], "seller_account_id": b["id"], "amount": "3",
         "capture_method": "manual"},
    ]
    response = client.post("/payments/batch", json={"payments": items})
    assert response.status_code == 202, response.get_json()
    body = response.get_json()
    for answered in body["payments"]:
        assert answered["batch_id"] == body["batch_id"]
        _assert_as_stored(app, db, answered)
    assert body["payments"][3]["currency"] == "ETH"
    assert body["payments"][3]["amount"] == "0.123456789012345678"
    assert body["payments"][2]["authorization_expires_at"] is not None
    assert body["payments"][0]["authorization_expires_at"] is None


def test_single_answer_is_the_stored_row(app, client, db):
    a, b = open_account(client, "10", name="s1"), open_account(client, name="s2")
    for extra in ({}, {"reference": "x", "metadata": {"k": "v"}, "capture_method": "manual"}):
        for headers in ({}, {"Idempotency-Key": uuid.uuid4().hex}):
            response = client.post("/payments", headers=headers, json={
                "buyer_account_id": a["id"], "seller_account_id": b["id"], "amount": "0.10", **extra})
            assert response.status_code == 202, response.get_json()
            _assert_as_stored(app, db, response.get_json())
            if headers:  # the replay reads the row: the same answer
                again = client.post("/payments", headers=headers, json={
                    "buyer_account_id": a["id"], "seller_account_id": b["id"], "amount": "0.10", **extra})
                replayed = again.get_json()
                assert {k: v for k, v in replayed.items() if k not in APPLIED_LATER} == \
                       {k: v for k, v in response.get_json().items() if k not in APPLIED_LATER}
