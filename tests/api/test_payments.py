"""Payments: accept (202), read, list with filters and cursors, idempotency (also concurrent)."""
from __future__ import annotations

import threading
import uuid
from datetime import datetime

import httpx
from sqlalchemy import event, text

from tests.api.conftest import assert_error, row_counts
from api import create_app
from tests.conftest import AUTH, make_settings
from tests.support.api import open_account, pay, wait_terminal
from tests.support.processes import wait_until


def post_raw(client, body: bytes, headers=None):
    return client.post("/payments", data=body, content_type="application/json", headers=headers or {})


def test_accept_is_202_pending_with_location(client):
    a, b = open_account(client, "1000", name="pa"), open_account(client, name="pb")
    response = post_raw(client, f'{{"buyer_account_id": {a["id"]}, "seller_account_id": {b["id"]},'
                                f' "amount": 500.1}}'.encode())
    assert response.status_code == 202
    payment = response.get_json()
    assert response.headers["Location"] == f"/payments/{payment['id']}"
    assert set(payment) == {"id", "status", "buyer_account_id", "seller_account_id", "amount", "currency_id",
                            "currency", "failure_code", "batch_id", "created_at", "completed_at",
                            "capture_method", "amount_captured", "amount_refunded", "refund_of",
                            "authorization_expires_at", "cancellation_reason", "reference", "metadata"}
    assert (payment["status"], payment["amount"], payment["buyer_account_id"], payment["seller_account_id"],
            payment["currency_id"], payment["currency"], payment["failure_code"], payment["batch_id"]) == (
        "pending", "500.1", a["id"], b["id"], 1, "USD", None, None)
    datetime.fromisoformat(payment["created_at"])
    fetched = client.get(f"/payments/{payment['id']}").get_json()
    assert fetched["id"] == payment["id"] and fetched["amount"] == "500.1"


def test_amount_forms_are_exact(client, db):
    a, b = open_account(client, "100", currency_id=3, name="btc-a"), open_account(client, currency_id=3)
    for raw, shown in (("0.00000001", "0.00000001"), ('"0.10000000"', "0.1"), ("1E-8", "0.00000001"),
                       ("12", "12"), ('"12.5"', "12.5"), ("2.50", "2.5")):
        response = post_raw(client, f'{{"buyer_account_id": {a["id"]}, "seller_account_id": {b["id"]},'
                                    f' "amount": {raw}, "currency_id": 3}}'.encode())
        assert response.status_code == 202, (raw, response.get_json())
        payment = response.get_json()
        assert payment["amount"] == shown, raw
        with db.read() as s:
            stored = s.execute(text("SELECT amount FROM payments WHERE id = :id"), {"id": payment["id"]}).scalar_one()
        assert format(stored.normalize(), "f") == shown


def test_payment_completes_with_worker(http):
    a, b = open_account(http, "1000", name="wa"), open_account(http, name="wb")
    done = wait_terminal(http, pay(http, a["id"], b["id"], "0.01")["id"])
    assert done["status"] == "completed" and done["failure_code"] is None and done["completed_at"]
    assert http.get(f"/accounts/{a['id']}").json()["balance"] == "999.99"
    assert http.get(f"/accounts/{b['id']}").json()["balance"] == "0.01"


def _pages(client, query: str, limit: int) -> list[list[dict]]:
    pages, cursor = [], None
    while True:
        url = f"/payments?{query}&limit={limit}" + (f"&cursor={cursor}" if cursor else "")
        response = client.get(url)
        assert response.status_code == 200, response.get_data(as_text=True)
        body = response.get_json()
        assert set(body) == {"payments", "next_cursor"}
        pages.append(body["payments"])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages
        assert len(body["payments"]) == limit
        assert len(pages) < 10_000


def _ids(pages) -> list[int]:
    return [p["id"] for page in pages for p in page]


def test_list_filters_and_pagination(http, client):
    a, b, c = (open_account(http, "100", name=n) for n in ("la", "lb", "lc"))
    a_ids = [pay(http, a["id"], b["id"], "1")["id"] for _ in range(4)]
    a_ids += [pay(http, c["id"], a["id"], "1")["id"] for _ in range(3)]
    other = pay(http, b["id"], c["id"], "1")["id"]
    failing = pay(http, a["id"], c["id"], "1000")["id"]
    a_ids.append(failing)
    for pid in a_ids + [other]:
        wait_terminal(http, pid)

    ids = _ids(_pages(client, f"account_id={a['id']}", 3))
    assert ids == sorted(a_ids, reverse=True)  # newest first, each once, both sides of the account
    assert other not in ids

    failed = _ids(_pages(client, f"account_id={a['id']}&status=failed", 2))
    assert failed == [failing]
    completed = _ids(_pages(client, f"account_id={a['id']}&status=completed", 2))
    assert completed == sorted(set(a_ids) - {failing}, reverse=True)
    assert _pages(client, f"account_id={a['id']}&status=pending", 5) == [[]]

    listed = client.get(f"/payments?account_id={a['id']}&status=failed").get_json()["payments"]
    assert listed[0]["failure_code"] == "insufficient_funds"


def test_list_by_batch(client):
    a, b = open_account(client, "100", name="ba"), open_account(client, name="bb")
    item = {"buyer_account_id": a["id"], "seller_account_id": b["id"], "amount": "1"}
    batch = client.post("/payments/batch", json={"payments": [item] * 5}).get_json()
    pay(client, a["id"], b["id"], "1")  # not in the batch
    ids = _ids(_pages(client, f"batch_id={batch['batch_id']}", 2))
    assert ids == sorted((p["id"] for p in batch["payments"]), reverse=True)
    assert client.get("/payments?batch_id=987654321").get_json() == {"payments": [], "next_cursor": None}


def test_list_unfiltered_every_row_once(client, db):
    a, b = open_account(client, "100", name="ua"), open_account(client, name="ub")
    for _ in range(5):
        pay(client, a["id"], b["id"], "1")
    with db.read() as s:
        expected = list(s.execute(text("SELECT id FROM payments ORDER BY id DESC")).scalars())
    assert _ids(_pages(client, "", 37)) == expected
    default = client.get("/payments").get_json()
    assert len(default["payments"]) == min(50, len(expected))


def test_pagination_while_inserting(app, client, db):
    a, b = open_account(client, "1000000", name="ins-a"), open_account(client, name="ins-b")
    for _ in range(40):
        pay(client, a["id"], b["id"], "1")
    with db.read() as s:
        existing_all = set(s.execute(text("SELECT id FROM payments")).scalars())
        existing_a = set(s.execute(text("SELECT id FROM payments WHERE buyer_account_id = :a"),
                                   {"a": a["id"]}).scalars())
    inserted: list[int] = []
    stop = threading.Event()

    def insert():
        writer = app.test_client()
        writer.environ_base["HTTP_AUTHORIZATION"] = AUTH["Authorization"]
        while not stop.is_set():
            inserted.append(pay(writer, a["id"], b["id"], "1")["id"])

    thread = threading.Thread(target=insert, daemon=True)
    thread.start()
    listings = []
    try:
        wait_until(lambda: len(inserted) >= 3, 20, "the inserter to start")
        for query, limit, existing in ((f"account_id={a['id']}", 3, existing_a), ("", 7, existing_all)):
            during = len(inserted)
            listings.append((_ids(_pages(client, query, limit)), existing))
            assert len(inserted) > during, "nothing was inserted while paging"
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()
    for ids, existing in listings:
        assert len(ids) == len(set(ids)), "a row was returned twice"
        assert ids == sorted(ids, reverse=True)
        assert existing <= set(ids), f"missing rows: {sorted(existing - set(ids))[:10]}"
        assert set(ids) - existing <= set(inserted), "rows that are neither old nor inserted"


def test_idempotent_payment(client, db):
    a, b = open_account(client, "100", name="ia"), open_account(client, name="ib")
    key = str(uuid.uuid4())
    body = f'{{"buyer_account_id": {a["id"]}, "seller_account_id": {b["id"]}, "amount": 500.1}}'.encode()
    first = post_raw(client, body, {"Idempotency-Key": key})
    assert first.status_code == 202
    before = row_counts(db)
    for replay in (body, f'{{"amount": "500.10", "seller_account_id": {b["id"]},'
                         f' "buyer_account_id": {a["id"]}}}'.encode()):
        again = post_raw(client, replay, {"Idempotency-Key": key})
        assert again.status_code == 202
        assert again.get_json()["id"] == first.get_json()["id"]
        assert again.headers["Location"] == first.headers["Location"]
    assert row_counts(db) == before
    for other in (f'{{"buyer_account_id": {a["id"]}, "seller_account_id": {b["id"]}, "amount": 500.2}}',
                  f'{{"buyer_account_id": {b["id"]}, "seller_account_id": {a["id"]}, "amount": 500.1}}',
                  f'{{"buyer_account_id": {a["id"]}, "seller_account_id": {b["id"]}, "amount": 500.1,'
                  f' "currency_id": 1}}'):
        assert_error(post_raw(client, other.encode(), {"Idempotency-Key": key}), 409, "idempotency_conflict")
    assert row_counts(db) == before


def test_idempotent_replay_after_completion(http):
    a, b = open_account(http, "10", name="ra"), open_account(http, name="rb")
    key = str(uuid.uuid4())
    body = {"buyer_account_id": a["id"], "seller_account_id": b["id"], "amount": "4"}
    first = http.post("/payments", json=body, headers={"Idempotency-Key": key})
    assert first.status_code == 202
    wait_terminal(http, first.json()["id"])
    again = http.post("/payments", json=body, headers={"Idempotency-Key": key})
    assert again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.json()["status"] == "completed"
    assert http.get(f"/accounts/{a['id']}").json()["balance"] == "6"  # applied once


def test_failed_request_does_not_burn_the_key(client, db):
    a, b = open_account(client, "10", name="fa"), open_account(client, name="fb")
    key = str(uuid.uuid4())
    bad = client.post("/payments", json={"buyer_account_id": a["id"], "seller_account_id": 987654321,
                                         "amount": "1"}, headers={"Idempotency-Key": key})
    assert_error(bad, 422, "unknown_account")
    good = client.post("/payments", json={"buyer_account_id": a["id"], "seller_account_id": b["id"],
                                          "amount": "1"}, headers={"Idempotency-Key": key})
    assert good.status_code == 202


def test_concurrent_first_requests_with_one_key(api_url, db):
    with httpx.Client(base_url=api_url, headers=AUTH, timeout=10) as c:
        a = open_account(c, "100", name="ca")
        b = open_account(c, name="cb")
    key = str(uuid.uuid4())
    body = {"buyer_account_id": a["id"], "seller_account_id": b["id"], "amount": "1"}
    threads_n = 12
    barrier = threading.Barrier(threads_n)
    results: list[tuple[int, int]] = []

    def fire():
        with httpx.Client(base_url=api_url, headers={**AUTH, "Idempotency-Key": key}, timeout=20) as c:
            barrier.wait(timeout=20)
            response = c.post("/payments", json=body)
            results.append((response.status_code, response.json().get("id")))

    threads = [threading.Thread(target=fire) for _ in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == threads_n
    assert {status for status, _ in results} == {202}, results
    assert len({pid for _, pid in results}) == 1, results
    with db.read() as s:
        assert s.execute(text("SELECT count(*) FROM payments WHERE buyer_account_id = :a"),
                         {"a": a["id"]}).scalar_one() == 1


def _overload_app(database_url, broker_url, *, fill=True):
    """An app whose backlog holds one payment (max_pending 1, no worker on this database, the
    count re-read on every request, refusing without waiting for room), full once `fill` has
    sent its first payment: (client, its wallet, a payment body between two funded accounts)."""
    app = create_app(make_settings(database_url, broker_url, max_pending=1, admission_wait_ms=0))
    client = app.test_client()
    a = client.post("/accounts", json={"name": "a", "amount": "10", "currency_id": 1}, headers=AUTH).get_json()
    b = client.post("/accounts", json={"name": "b", "amount": "0", "currency_id": 1}, headers=AUTH).get_json()
    one = {"buyer_account_id": a["id"], "seller_account_id": b["id"], "amount": "1"}
    wallet = app.extensions["wallet"]
    wallet.admission._refresh_s = 0
    if fill:
        assert client.post("/payments", json=one, headers=AUTH).status_code == 202
    return client, wallet, one

def test_backlog_full_answers_429_and_records_nothing(fresh_database_url, broker_url):
    client, wallet, one = _overload_app(fresh_database_url, broker_url)
    for path, body in (("/payments", one), ("/payments/batch", {"payments": [one, one]})):
        response = client.post(path, json=body, headers=AUTH)
        error = assert_error(response, 429, "backlog_full")
        assert error["details"] == {"pending": 1, "max_pending": 1}
        assert response.headers["Retry-After"] == "1"
    with wallet.db.read() as s:
        assert s.execute(text("SELECT count(*) FROM payments")).scalar_one() == 1
    wallet.db.dispose()


def test_backlog_full_still_answers_replays_and_bad_requests(fresh_database_url, broker_url):
    """Admission control refuses new work only: a retry of an accepted payment or batch (same
    Idempotency-Key and body) gets its original answer, a key reused with another body its 409,
    and an invalid request its 422, even while new payments answer 429."""
    client, wallet, one = _overload_app(fresh_database_url, broker_url, fill=False)
    # No worker on this database: what is accepted stays pending. The batch fits (empty backlog).
    batch = client.post("/payments/batch", json={"payments": [one, one]},
                        headers={**AUTH, "Idempotency-Key": "batch-1"})
    assert batch.status_code == 202
    first = client.post("/payments", json=one, headers={**AUTH, "Idempotency-Key": "pay-1"})
    assert first.status_code == 429  # the backlog is full now
    # ...so this one is accepted only with the bound lifted, then the bound is back.
    wallet.admission.max_pending = 0
    first = client.post("/payments", json=one, headers={**AUTH, "Idempotency-Key": "pay-1"})
    assert first.status_code == 202
    wallet.admission.max_pending = 1

    replay = client.post("/payments", json=one, headers={**AUTH, "Idempotency-Key": "pay-1"})
    assert replay.status_code == 202, replay.get_json()
    assert replay.get_json() == first.get_json()
    assert replay.headers["Location"] == first.headers["Location"]
    replay = client.post("/payments/batch", json={"payments": [one, one]},
                         headers={**AUTH, "Idempotency-Key": "batch-1"})
    assert replay.status_code == 202, replay.get_json()
    assert replay.get_json() == batch.get_json()

    other = {**one, "amount": "2"}
    assert_error(client.post("/payments", json=other, headers={**AUTH, "Idempotency-Key": "pay-1"}),
                 409, "idempotency_conflict")
    assert_error(client.post("/payments", json=other, headers={**AUTH, "Idempotency-Key": "pay-2"}),
                 429, "backlog_full")
    assert_error(client.post("/payments", json=other, headers=AUTH), 429, "backlog_full")
    unknown = {**one, "seller_account_id": 987654321}
    assert_error(client.post("/payments", json=unknown, headers=AUTH), 422, "unknown_account")
    assert_error(client.post("/payments", json=unknown, headers={**AUTH, "Idempotency-Key": "pay-3"}),
                 422, "unknown_account")
    error = assert_error(client.post("/payments/batch", json={"payments": [one, unknown]}, headers=AUTH),
                         422, "validation_error")
    assert [d["index"] for d in error["details"]] == [1]
    with wallet.db.read() as s:
        assert s.execute(text("SELECT count(*) FROM payments")).scalar_one() == 3
        assert s.execute(text("SELECT count(*) FROM idempotency_keys")).scalar_one() == 2
    wallet.db.dispose()


def test_refusals_read_no_account_twice(fresh_database_url, broker_url):
    """Under overload a client retries refused batches; explaining each refusal (422 before 429)
    reads the accounts only the first time this process sees them (common.ledger.directory)."""
    client, wallet, one = _overload_app(fresh_database_url, broker_url)
    statements = []
    event.listen(wallet.db.engine, "before_cursor_execute",
                 lambda conn, cursor, sql, *args: statements.append(sql))
    reads_accounts = lambda: [s for s in statements if "FROM accounts" in s]  # noqa: E731
    assert_error(client.post("/payments/batch", json={"payments": [one, one]}, headers=AUTH), 429, "backlog_full")
    assert len(reads_accounts()) == 1
    for path, body in (("/payments/batch", {"payments": [one, one]}), ("/payments", one)):
        assert_error(client.post(path, json=body, headers=AUTH), 429, "backlog_full")
    assert len(reads_accounts()) == 1
    # An account it has not seen is read, and an unknown one still gets its 422.
    unknown = {**one, "seller_account_id": 987654321}
    assert_error(client.post("/payments", json=unknown, headers=AUTH), 422, "unknown_account")
    assert_error(client.post("/payments", json=unknown, headers=AUTH), 422, "unknown_account")
    assert len(reads_accounts()) == 3
    wallet.db.dispose()


def test_a_refused_body_sent_again_is_refused_before_it_is_parsed(fresh_database_url, broker_url, monkeypatch):
    """A client refused sends the same request again: a body this process validated in full and
    refused gets its 429 again without being parsed, while the backlog is full; once there is
    room it is accepted like any other. Requests with an Idempotency-Key always take the full path."""
    import api.routes.payments as routes
    client, wallet, one = _overload_app(fresh_database_url, broker_url)
    parsed = []
    real_parse_body = routes.parse_body
    monkeypatch.setattr(routes, "parse_body", lambda model: parsed.append(model) or real_parse_body(model))
    batch = {"payments": [one, one]}
    for path, body in (("/payments/batch", batch), ("/payments", one)):
        assert_error(client.post(path, json=body, headers=AUTH), 429, "backlog_full")
        assert len(parsed) == 1
        assert_error(client.post(path, json=body, headers=AUTH), 429, "backlog_full")
        assert len(parsed) == 1  # refused again at once
        parsed.clear()
    assert_error(client.post("/payments/batch", json={"payments": [one]}, headers=AUTH), 429, "backlog_full")
    assert len(parsed) == 1  # another body: validated in full
    assert_error(client.post("/payments/batch", json=batch, headers={**AUTH, "Idempotency-Key": "k-1"}),
                 429, "backlog_full")
    assert len(parsed) == 2
    wallet.admission.max_pending = 0  # room again
    assert client.post("/payments/batch", json=batch, headers=AUTH).status_code == 202
    with wallet.db.read() as s:
        assert s.execute(text("SELECT count(*) FROM payments")).scalar_one() == 3
    wallet.db.dispose()
