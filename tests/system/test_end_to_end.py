"""The README's walk-through, through real gunicorn and a real Celery worker."""
from decimal import Decimal

from tests.support.api import open_account, pay, wait_terminal


def test_walkthrough(http):
    buyer = open_account(http, "1000", name="buyer")
    seller = open_account(http, name="seller")
    response = http.post("/payments", json={"buyer_account_id": buyer["id"],
                                            "seller_account_id": seller["id"], "amount": 500.1})
    assert response.status_code == 202
    payment = response.json()
    assert response.headers["Location"] == f"/payments/{payment['id']}"
    assert (payment["status"], payment["amount"]) == ("pending", "500.1")

    done = wait_terminal(http, payment["id"])
    assert done["status"] == "completed" and done["completed_at"] is not None
    assert http.get(f"/accounts/{buyer['id']}").json()["balance"] == "499.9"
    assert http.get(f"/account/{seller['id']}").json()["balance"] == "500.1"

    entries = http.get(f"/accounts/{buyer['id']}/entries").json()["entries"]
    assert [(e["amount"], e["balance_after"], e["payment_id"]) for e in entries] == [
        ("-500.1", "499.9", payment["id"]), ("1000", "1000", None)]


def test_insufficient_funds(http):
    buyer, seller = open_account(http, "10"), open_account(http)
    payment = pay(http, buyer["id"], seller["id"], "10.01")
    done = wait_terminal(http, payment["id"])
    assert (done["status"], done["failure_code"]) == ("failed", "insufficient_funds")
    assert Decimal(http.get(f"/accounts/{buyer['id']}").json()["balance"]) == 10


def test_listing_filters_by_account(http):
    a, b, c = open_account(http, "5"), open_account(http), open_account(http)
    mine = [pay(http, a["id"], b["id"], "1")["id"], pay(http, c["id"], a["id"], "1")["id"]]
    pay(http, b["id"], c["id"], "1")
    listed = http.get("/payments", params={"account_id": a["id"]}).json()["payments"]
    assert [p["id"] for p in listed] == sorted(mine, reverse=True)
