"""The lifecycle's settled details (SPEC 9) end to end, through gunicorn and a worker: holds in an
atomic batch, the available balance refusing payments, a frozen buyer's hold still capturable,
a failed refund freeing its amount for another, a capture's Idempotency-Key replayed later."""
from __future__ import annotations

from tests.support.api import open_account, pay, wait_terminal


def balances(http, account_id: int) -> tuple[str, str, str]:
    a = http.get(f"/accounts/{account_id}").json()
    return a["balance"], a["held"], a["available"]


def test_hold_lifecycle_details(http):
    a = open_account(http, "100", name="flow-a")["id"]
    b = open_account(http, "0", name="flow-b")["id"]
    hold = {"buyer_account_id": a, "seller_account_id": b, "capture_method": "manual"}

    # An atomic batch with a hold: all or nothing, the hold included.
    r = http.post("/payments/batch", json={"atomic": True, "payments": [
        {**hold, "amount": "10"}, {"buyer_account_id": a, "seller_account_id": b, "amount": "95"}]})
    assert r.status_code == 202, r.text
    got = [wait_terminal(http, p["id"]) for p in r.json()["payments"]]
    assert [(g["status"], g["failure_code"]) for g in got] == [("failed", "batch_failed"),
                                                                ("failed", "insufficient_funds")]
    assert balances(http, a) == ("100", "0", "100")
    r = http.post("/payments/batch", json={"atomic": True, "payments": [
        {**hold, "amount": "10"}, {"buyer_account_id": a, "seller_account_id": b, "amount": "5"}]})
    got = [wait_terminal(http, p["id"]) for p in r.json()["payments"]]
    assert [g["status"] for g in got] == ["authorized", "completed"]
    assert balances(http, a) == ("95", "10", "85")
    batch = http.get(f"/batches/{r.json()['batch_id']}").json()
    assert batch["counts"] == {"pending": 0, "completed": 1, "failed": 0, "authorized": 1, "canceled": 0}
    assert batch["finished"] is True
    held_id = got[0]["id"]

    # The available balance, not the balance, is what a payment may spend.
    assert wait_terminal(http, pay(http, a, b, "90")["id"])["failure_code"] == "insufficient_funds"
    assert wait_terminal(http, pay(http, a, b, "90", capture_method="manual")["id"])["failure_code"] == \
        "insufficient_funds"

    # A frozen buyer blocks new payments, not the capture of its hold; the rest is released.
    assert http.post(f"/accounts/{a}/freeze").status_code == 200
    assert wait_terminal(http, pay(http, a, b, "1")["id"])["failure_code"] == "account_frozen"
    r = http.post(f"/payments/{held_id}/capture", json={"amount": "4"}, headers={"Idempotency-Key": "flow-cap"})
    assert (r.status_code, r.json()["status"], r.json()["amount_captured"]) == (200, "completed", "4"), r.text
    assert balances(http, a) == ("91", "0", "91")
    assert http.post(f"/accounts/{a}/unfreeze").status_code == 200

    # A refund that fails (the seller is frozen) frees its amount for another.
    assert http.post(f"/accounts/{b}/freeze").status_code == 200
    r = http.post(f"/payments/{held_id}/refunds", json={"amount": "3"})
    assert r.status_code == 202, r.text
    failed = wait_terminal(http, r.json()["id"])
    assert (failed["status"], failed["failure_code"], failed["refund_of"]) == ("failed", "account_frozen", held_id)
    assert http.post(f"/accounts/{b}/unfreeze").status_code == 200
    r = http.post(f"/payments/{held_id}/refunds")  # default: all that is left, the failed 3 included
    assert (r.status_code, r.json()["amount"]) == (202, "4"), r.text
    assert wait_terminal(http, r.json()["id"])["status"] == "completed"
    original = http.get(f"/payments/{held_id}").json()
    assert (original["amount_captured"], original["amount_refunded"]) == ("4", "4")
    assert http.post(f"/payments/{held_id}/refunds").json()["error"]["code"] == "refund_exceeds_payment"

    # The capture's key, replayed after all that, answers the payment as it is now; with another
    # body it is a conflict.
    r = http.post(f"/payments/{held_id}/capture", json={"amount": "4"}, headers={"Idempotency-Key": "flow-cap"})
    assert (r.status_code, r.json()["id"], r.json()["amount_refunded"]) == (200, held_id, "4"), r.text
    r = http.post(f"/payments/{held_id}/capture", json={"amount": "5"}, headers={"Idempotency-Key": "flow-cap"})
    assert (r.status_code, r.json()["error"]["code"]) == (409, "idempotency_conflict"), r.text
    refunds = http.get("/payments", params={"refund_of": held_id}).json()["payments"]
    assert sorted(p["status"] for p in refunds) == ["completed", "failed"]
    assert balances(http, a) == ("95", "0", "95") and balances(http, b)[0] == "5"
