"""Helpers for the API tests: row-count snapshots ("nothing was written") and the error shape."""
from __future__ import annotations

import pytest
from sqlalchemy import text

COUNTED = ("accounts", "payments", "batches", "idempotency_keys")


def row_counts(db) -> dict[str, int]:
    """Rows only the API writes. Ledger entries are counted as opening entries (payment_id NULL,
    written only by POST /accounts) plus entries of payments newer than the snapshot: a worker may
    legitimately still be applying payments made by earlier tests."""
    with db.read() as s:
        counts = {t: s.execute(text(f"SELECT count(*) FROM {t}")).scalar_one() for t in COUNTED}
        counts["max_payment_id"] = s.execute(text("SELECT coalesce(max(id), 0) FROM payments")).scalar_one()
        counts["opening_entries"] = s.execute(text(
            "SELECT count(*) FROM ledger_entries WHERE payment_id IS NULL")).scalar_one()
    return counts


def new_payment_entries(db, after_payment_id: int) -> int:
    with db.read() as s:
        return s.execute(text("SELECT count(*) FROM ledger_entries WHERE payment_id > :p"),
                         {"p": after_payment_id}).scalar_one()


@pytest.fixture
def nothing_written(db):
    """Asserts, after the test, that no row was added to any table the API writes."""
    before = row_counts(db)
    yield before
    after = row_counts(db)
    assert after == before, f"rows were written: before {before}, after {after}"
    assert new_payment_entries(db, before["max_payment_id"]) == 0


def assert_error(response, status: int, code: str | None = None) -> dict:
    """The response is `status` with exactly {"error": {"code": str, "message": str, "details": ...}}."""
    body = response.get_json(silent=True) if hasattr(response, "get_json") else response.json()
    assert response.status_code == status, (response.status_code, body)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"code", "message", "details"}, body
    assert isinstance(error["code"], str) and error["code"], body
    assert isinstance(error["message"], str) and error["message"], body
    if code is not None:
        assert error["code"] == code, body
    return error
