"""POST /payments/batch, atomic batches, GET /batches/<id>; and the meta endpoints."""
from __future__ import annotations

import uuid

from sqlalchemy import text

from tests.api.conftest import assert_error, row_counts
from tests.support.api import open_account
from tests.support.processes import wait_until


def item(buyer, seller, amount) -> dict:
    return {"buyer_account_id": buyer["id"], "seller_account_id": seller["id"], "amount": amount}


def balances(client, *accounts) -> list[str]:
    return [client.get(f"/accounts/{a['id']}").get_json()["balance"] for a in accounts]


def wait_finished(client, batch_id: int, timeout_s: float = 30) -> dict:
    def finished():
        body = client.get(f"/batches/{batch_id}").get_json()
        return body if body["finished"] else None
    return wait_until(finished, timeout_s, f"batch {batch_id} to finish")


def entries_of(db, *accounts) -> int:
    with db.read() as s:
        return s.execute(text("SELECT count(*) FROM ledger_entries WHERE account_id = ANY(:ids)"),
                         {"ids": [a["id"] for a in accounts]}).scalar_one()


def test_batch_202_returns_every_payment(client, db):
    a, b, c = open_account(client, "100", name="b1"), open_account(client, name="b2"), open_account(client, name="b3")
    items = [item(a, b, "1"), item(a, c, "2.5"), item(a, b, 3)]
    response = client.post("/payments/batch", json={"payments": items})
    assert response.status_code == 202
    body = response.get_json()
    assert set(body) == {"batch_id", "atomic", "payments"}
    assert body["atomic"] is False
    assert response.headers["Location"] == f"/batches/{body['batch_id']}"
    payments = body["payments"]
    assert [(p["buyer_account_id"], p["seller_account_id"], p["amount"], p["status"], p["batch_id"])
            for p in payments] == [(a["id"], b["id"], "1", "pending", body["batch_id"]),
                                   (a["id"], c["id"], "2.5", "pending", body["batch_id"]),
                                   (a["id"], b["id"], "3", "pending", body["batch_id"])]
    assert [p["id"] for p in payments] == sorted(p["id"] for p in payments)
    with db.read() as s:
        stored = s.execute(text("SELECT count(*) FROM payments WHERE batch_id = :b"),
                           {"b": body["batch_id"]}).scalar_one()
    assert stored == 3


def test_batch_completes_and_counts(client, worker):
    a, b = open_account(client, "10", name="c1"), open_account(client, name="c2")
    batch = client.post("/payments/batch", json={"payments": [item(a, b, "4"), item(a, b, "4"), item(a, b, "4")],
                                                 "atomic": False}).get_json()
    done = wait_finished(client, batch["batch_id"])
    assert done == {**done, "id": batch["batch_id"], "atomic": False, "total": 3, "finished": True,
                    "counts": {"pending": 0, "completed": 2, "failed": 1, "authorized": 0, "canceled": 0}}
    statuses = [client.get(f"/payments/{p['id']}").get_json() for p in batch["payments"]]
    # each on its own merits, in order: the third finds 2 left
    assert [(p["status"], p["failure_code"]) for p in statuses] == [
        ("completed", None), ("completed", None), ("failed", "insufficient_funds")]
    assert balances(client, a, b) == ["2", "8"]


def test_invalid_item_lists_indexes_and_writes_nothing(client, db):
    a, b = open_account(client, "10", name="v1"), open_account(client, name="v2")
    before = row_counts(db)
    items = [item(a, b, "1"), item(a, b, "-1"), item(a, b, "1"), {"buyer_account_id": a["id"]},
             item(a, {"id": 987654321}, "1")]
    error = assert_error(client.post("/payments/batch", json={"payments": items}), 422, "validation_error")
    assert [(d["index"], d["code"]) for d in error["details"]] == [
        (1, "invalid_amount"), (3, "validation_error"), (4, "unknown_account")]
    assert all(isinstance(d["message"], str) and d["message"] for d in error["details"])
    assert row_counts(db) == before


def test_only_db_level_problems_are_listed_too(client, db):
    a, b = open_account(client, "10", name="d1"), open_account(client, name="d2")
    eur = open_account(client, "10", currency_id=2, name="d3")
    before = row_counts(db)
    items = [item(a, b, "1"), item(a, eur, "1"), item(a, b, "0.001"), item(a, b, "1")]
    error = assert_error(client.post("/payments/batch", json={"payments": items}), 422, "validation_error")
    assert [(d["index"], d["code"]) for d in error["details"]] == [(1, "currency_mismatch"), (2, "invalid_amount")]
    assert row_counts(db) == before


def test_item_limit(app, client, db):
    a, b = open_account(client, "10", name="m1"), open_account(client, name="m2")
    limit = app.extensions["wallet"].settings.max_batch_items
    assert limit == 1000
    before = row_counts(db)
    too_many = client.post("/payments/batch", json={"payments": [item(a, b, "0.01")] * (limit + 1)})
    assert_error(too_many, 422, "validation_error")
    assert row_counts(db) == before
    # over the byte limit: 413 before any parsing
    padded = {**item(a, b, "0.01"), "pad": "x" * 2000}
    assert_error(client.post("/payments/batch", json={"payments": [padded] * 600}), 413, "request_too_large")
    assert row_counts(db) == before
    exactly = client.post("/payments/batch", json={"payments": [item(a, b, "0.01")] * limit})
    assert exactly.status_code == 202
    assert len(exactly.get_json()["payments"]) == limit


def test_atomic_batch_with_one_failure_changes_nothing(client, worker, db):
    a = open_account(client, "100", name="x1")
    b, c = open_account(client, name="x2"), open_account(client, name="x3")
    before = entries_of(db, a, b, c)
    items = [item(a, b, "10"), item(a, c, "50"), item(c, b, "1000"), item(b, a, "5")]
    response = client.post("/payments/batch", json={"payments": items, "atomic": True})
    assert response.status_code == 202
    batch = response.get_json()
    assert batch["atomic"] is True
    done = wait_finished(client, batch["batch_id"])
    assert done["counts"] == {"pending": 0, "completed": 0, "failed": 4, "authorized": 0, "canceled": 0} and done["atomic"] is True
    outcomes = [client.get(f"/payments/{p['id']}").get_json() for p in batch["payments"]]
    assert [(p["status"], p["failure_code"]) for p in outcomes] == [
        ("failed", "batch_failed"), ("failed", "batch_failed"), ("failed", "insufficient_funds"),
        ("failed", "batch_failed")]
    assert balances(client, a, b, c) == ["100", "0", "0"]
    assert entries_of(db, a, b, c) == before


def test_atomic_chain_completes(client, worker):
    a = open_account(client, "100", name="ch1")
    b, c = open_account(client, name="ch2"), open_account(client, name="ch3")
    items = [item(a, b, "60"), item(b, c, "60"), item(c, a, "0.5")]
    batch = client.post("/payments/batch", json={"payments": items, "atomic": True}).get_json()
    done = wait_finished(client, batch["batch_id"])
    assert done["counts"] == {"pending": 0, "completed": 3, "failed": 0, "authorized": 0, "canceled": 0}
    assert balances(client, a, b, c) == ["40.5", "0", "59.5"]
    entries = client.get(f"/accounts/{b['id']}/entries").get_json()["entries"]
    assert [(e["amount"], e["balance_after"]) for e in entries] == [("-60", "0"), ("60", "60")]


def test_atomic_batch_with_frozen_account(client, worker):
    a, b = open_account(client, "100", name="fz1"), open_account(client, name="fz2")
    c = open_account(client, name="fz3")
    client.post(f"/accounts/{c['id']}/freeze")
    batch = client.post("/payments/batch", json={"payments": [item(a, b, "1"), item(a, c, "1")],
                                                 "atomic": True}).get_json()
    wait_finished(client, batch["batch_id"])
    outcomes = [client.get(f"/payments/{p['id']}").get_json()["failure_code"] for p in batch["payments"]]
    assert outcomes == ["batch_failed", "account_frozen"]
    assert balances(client, a, b, c) == ["100", "0", "0"]


def test_batch_idempotency(client, db):
    a, b = open_account(client, "100", name="bi1"), open_account(client, name="bi2")
    key = str(uuid.uuid4())
    body = {"payments": [item(a, b, "1"), item(a, b, "2")], "atomic": True}
    first = client.post("/payments/batch", json=body, headers={"Idempotency-Key": key})
    assert first.status_code == 202
    before = row_counts(db)
    again = client.post("/payments/batch", json=body, headers={"Idempotency-Key": key})
    assert again.status_code == 202
    assert again.get_json()["batch_id"] == first.get_json()["batch_id"]
    assert [p["id"] for p in again.get_json()["payments"]] == [p["id"] for p in first.get_json()["payments"]]
    assert row_counts(db) == before
    for other in ({**body, "atomic": False}, {"payments": body["payments"][:1], "atomic": True},
                  {"payments": body["payments"][::-1], "atomic": True}):
        assert_error(client.post("/payments/batch", json=other, headers={"Idempotency-Key": key}),
                     409, "idempotency_conflict")
    assert row_counts(db) == before


def test_get_batch_unknown(client):
    assert_error(client.get("/batches/987654321"), 404, "not_found")


# --- meta ----------------------------------------------------------------------------------------

def test_currencies(client):
    response = client.get("/currencies")
    assert response.status_code == 200
    assert response.get_json() == {"currencies": [
        {"id": 1, "code": "USD", "name": "US Dollar", "scale": 2},
        {"id": 2, "code": "EUR", "name": "Euro", "scale": 2},
        {"id": 3, "code": "BTC", "name": "Bitcoin", "scale": 8},
        {"id": 4, "code": "ETH", "name": "Ether", "scale": 18}]}


def test_health_needs_no_auth(app):
    anonymous = app.test_client()
    response = anonymous.get("/health")
    assert response.status_code == 200 and response.get_json() == {"status": "ok"}
    assert_error(anonymous.get("/ready"), 401, "unauthorized")


def test_ready(client):
    response = client.get("/ready")
    assert response.status_code == 200
    body = response.get_json()
    assert (body["status"], body["checks"]) == ("ready", {"database": True, "broker": True})
