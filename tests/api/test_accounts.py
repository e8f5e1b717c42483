"""Accounts: open, read, list with cursors and filters, freeze/unfreeze, ledger entries, idempotency."""
from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import text

from tests.api.conftest import assert_error, row_counts
from tests.support.api import open_account, pay, wait_terminal


def create(client, body: dict | bytes, headers=None):
    if isinstance(body, bytes):
        return client.post("/accounts", data=body, content_type="application/json", headers=headers or {})
    return client.post("/accounts", json=body, headers=headers or {})


def test_create_by_currency_id_defaults_to_zero(client):
    response = create(client, {"name": "alice", "currency_id": 1})
    assert response.status_code == 201
    account = response.get_json()
    assert response.headers["Location"] == f"/accounts/{account['id']}"
    assert set(account) == {"id", "name", "currency_id", "currency", "balance", "held", "available",
                            "status", "metadata", "created_at"}
    assert (account["name"], account["currency_id"], account["currency"], account["balance"],
            account["status"]) == ("alice", 1, "USD", "0", "active")
    assert isinstance(account["id"], int) and account["id"] > 0
    datetime.fromisoformat(account["created_at"])
    assert client.get(f"/accounts/{account['id']}/entries").get_json() == {"entries": [], "next_cursor": None}


def test_create_by_currency_code_any_case(client):
    for code in ("EUR", "eur"):
        account = create(client, {"name": "bob", "currency": code, "amount": "12.50"}).get_json()
        assert (account["currency"], account["currency_id"], account["balance"]) == ("EUR", 2, "12.5")


def test_create_with_matching_id_and_code(client):
    response = create(client, {"name": "c", "currency_id": 3, "currency": "BTC", "amount": "0.00000001"})
    assert response.status_code == 201
    assert response.get_json()["balance"] == "0.00000001"


def test_opening_number_is_exact(client, db):
    response = create(client, b'{"name": "exact", "currency": "USD", "amount": 500.1}')
    assert response.status_code == 201
    account = response.get_json()
    assert account["balance"] == "500.1"
    with db.read() as s:
        assert str(s.execute(text("SELECT balance FROM accounts WHERE id = :id"),
                             {"id": account["id"]}).scalar_one().normalize()) == "500.1"


def test_unicode_name_round_trips(client):
    name = "Zoë 名前 \u20ac"
    account = create(client, {"name": name, "currency": "USD"}).get_json()
    assert client.get(f"/accounts/{account['id']}").get_json()["name"] == name


def test_get_account_both_paths(client):
    account = open_account(client, "7.25", name="getme")
    plural = client.get(f"/accounts/{account['id']}")
    singular = client.get(f"/account/{account['id']}")
    assert plural.status_code == singular.status_code == 200
    assert plural.get_json() == singular.get_json() == account


def test_issuance_accounts_are_not_exposed(client):
    # issuance accounts have ids -currency_id: not reachable by URL, never listed
    assert_error(client.get("/accounts/-1"), 404, "not_found")
    listed = _all_accounts(client, "limit=1000")
    assert all(a["id"] > 0 for a in listed)


def _all_accounts(client, query: str) -> list[dict]:
    rows, url, pages = [], f"/accounts?{query}", 0
    while True:
        response = client.get(url)
        assert response.status_code == 200, response.get_data(as_text=True)
        body = response.get_json()
        assert set(body) == {"accounts", "next_cursor"}
        rows += body["accounts"]
        pages += 1
        assert pages < 10_000
        if body["next_cursor"] is None:
            return rows
        cursor = body["next_cursor"]
        assert isinstance(cursor, str) and cursor and not cursor.isdigit()  # opaque, not a raw id
        url = f"/accounts?{query}&cursor={cursor}"


def test_list_pagination_every_row_once(client, db):
    for i in range(7):
        open_account(client, name=f"page-{i}")
    with db.read() as s:
        expected = list(s.execute(text("SELECT id FROM accounts WHERE kind = 'customer' ORDER BY id")).scalars())
    first = client.get("/accounts?limit=3").get_json()
    assert len(first["accounts"]) == 3 and first["next_cursor"] is not None
    rows = _all_accounts(client, "limit=3")
    ids = [a["id"] for a in rows]
    assert ids == expected  # ascending, every row exactly once
    assert len(set(ids)) == len(ids)


def test_list_default_and_max_limit(client, db):
    for i in range(3):
        open_account(client, name=f"lim-{i}")
    with db.read() as s:
        total = s.execute(text("SELECT count(*) FROM accounts WHERE kind = 'customer'")).scalar_one()
    default = client.get("/accounts").get_json()
    assert len(default["accounts"]) == min(50, total)
    assert (default["next_cursor"] is None) == (total <= 50)
    everything = client.get("/accounts?limit=1000").get_json()
    assert len(everything["accounts"]) == min(1000, total)


def test_last_page_cursor_is_null(client, db):
    with db.read() as s:
        total = s.execute(text("SELECT count(*) FROM accounts WHERE kind = 'customer'")).scalar_one()
    assert client.get(f"/accounts?limit={total}").get_json()["next_cursor"] is None
    if total > 1:
        assert client.get(f"/accounts?limit={total - 1}").get_json()["next_cursor"] is not None


def test_filter_by_currency(client, db):
    eur = {open_account(client, currency_id=2, name=f"eur-{i}")["id"] for i in range(3)}
    usd = open_account(client, currency_id=1, name="usd")["id"]
    rows = _all_accounts(client, "currency=EUR&limit=2")
    ids = [a["id"] for a in rows]
    assert eur <= set(ids) and usd not in ids
    assert {a["currency"] for a in rows} == {"EUR"}
    with db.read() as s:
        expected = list(s.execute(text(
            "SELECT id FROM accounts WHERE kind = 'customer' AND currency_id = 2 ORDER BY id")).scalars())
    assert ids == expected
    assert [a["id"] for a in _all_accounts(client, "currency=eur&limit=1000")] == expected


def test_freeze_and_unfreeze(client):
    account = open_account(client, "5", name="icy")
    frozen = client.post(f"/accounts/{account['id']}/freeze")
    assert frozen.status_code == 200
    assert frozen.get_json() == {**account, "status": "frozen"}
    assert client.get(f"/accounts/{account['id']}").get_json()["status"] == "frozen"
    assert client.post(f"/accounts/{account['id']}/freeze").get_json()["status"] == "frozen"  # idempotent
    thawed = client.post(f"/accounts/{account['id']}/unfreeze")
    assert thawed.status_code == 200 and thawed.get_json()["status"] == "active"
    assert client.get(f"/accounts/{account['id']}").get_json() == account


def test_payment_touching_frozen_account_fails(http):
    a, b = open_account(http, "100", name="fa"), open_account(http, "100", name="fb")
    assert http.post(f"/accounts/{b['id']}/freeze").json()["status"] == "frozen"
    as_seller = pay(http, a["id"], b["id"], "10")
    as_buyer = pay(http, b["id"], a["id"], "10")
    for payment in (as_seller, as_buyer):
        done = wait_terminal(http, payment["id"])
        assert (done["status"], done["failure_code"]) == ("failed", "account_frozen")
    assert http.get(f"/accounts/{a['id']}").json()["balance"] == "100"
    assert http.get(f"/accounts/{b['id']}").json()["balance"] == "100"
    assert http.post(f"/accounts/{b['id']}/unfreeze").json()["status"] == "active"
    done = wait_terminal(http, pay(http, a["id"], b["id"], "10")["id"])
    assert done["status"] == "completed"
    assert http.get(f"/accounts/{b['id']}").json()["balance"] == "110"


def test_entries_newest_first_with_opening_and_pages(http):
    a, b = open_account(http, "100", name="ea"), open_account(http, name="eb")
    p1 = wait_terminal(http, pay(http, a["id"], b["id"], "30.5")["id"])
    p2 = wait_terminal(http, pay(http, b["id"], a["id"], "0.25")["id"])
    assert p1["status"] == p2["status"] == "completed"
    body = http.get(f"/accounts/{a['id']}/entries").json()
    assert body["next_cursor"] is None
    entries = body["entries"]
    assert [(e["payment_id"], e["amount"], e["balance_after"]) for e in entries] == [
        (p2["id"], "0.25", "69.75"), (p1["id"], "-30.5", "69.5"), (None, "100", "100")]
    assert all(e["account_id"] == a["id"] for e in entries)
    assert [e["id"] for e in entries] == sorted((e["id"] for e in entries), reverse=True)
    for e in entries:
        datetime.fromisoformat(e["created_at"])
    # one per page
    seen, cursor = [], None
    while True:
        page = http.get(f"/accounts/{a['id']}/entries", params={"limit": 1, **({"cursor": cursor} if cursor else {})}).json()
        assert len(page["entries"]) == 1
        seen += page["entries"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == entries


def test_idempotent_create(client, db):
    key = str(uuid.uuid4())
    body = {"name": "idem", "currency": "USD", "amount": "10"}
    first = create(client, body, {"Idempotency-Key": key})
    assert first.status_code == 201
    before = row_counts(db)
    again = create(client, body, {"Idempotency-Key": key})
    assert again.status_code == 201
    assert again.get_json() == first.get_json()
    assert again.headers["Location"] == first.headers["Location"]
    # the same request spelled differently (currency by id, amount as a number) is the same request
    same = create(client, b'{"amount": 10.00, "currency_id": 1, "name": "idem"}', {"Idempotency-Key": key})
    assert same.status_code == 201 and same.get_json()["id"] == first.get_json()["id"]
    assert row_counts(db) == before
    conflict = create(client, {**body, "amount": "11"}, {"Idempotency-Key": key})
    assert_error(conflict, 409, "idempotency_conflict")
    assert row_counts(db) == before
    other = create(client, body, {"Idempotency-Key": key + "-other"})
    assert other.status_code == 201 and other.get_json()["id"] != first.get_json()["id"]


def test_idempotency_key_is_not_shared_between_resource_types(client, db):
    key = str(uuid.uuid4())
    a = create(client, {"name": "k", "currency": "USD", "amount": "5"}, {"Idempotency-Key": key}).get_json()
    b = open_account(client, name="k2")
    before = row_counts(db)
    response = client.post("/payments", json={"buyer_account_id": a["id"], "seller_account_id": b["id"],
                                              "amount": "1"}, headers={"Idempotency-Key": key})
    assert_error(response, 409, "idempotency_conflict")
    assert row_counts(db) == before
