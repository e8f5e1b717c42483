"""Rows to JSON-ready dicts. Amounts leave as exact strings, times as ISO 8601."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from common.ledger import Currencies
from common.money import format_amount


def _time(value) -> str | None:
    return value.isoformat() if value is not None else None


def account(row: Mapping[str, Any], currencies: Currencies) -> dict[str, Any]:
    return {
        "id": row["id"],
        "name": row["name"],
        "currency_id": row["currency_id"],
        "currency": currencies.by_id[row["currency_id"]].code,
        "balance": format_amount(row["balance"]),
        "status": row["status"],
        "created_at": _time(row["created_at"]),
    }


def payment(row: Mapping[str, Any], currencies: Currencies) -> dict[str, Any]:
    return {
        "id": row["id"],
        "status": row["status"],
        "buyer_account_id": row["buyer_account_id"],
        "seller_account_id": row["seller_account_id"],
        "amount": format_amount(row["amount"]),
        "currency_id": row["currency_id"],
        "currency": currencies.by_id[row["currency_id"]].code,
        "failure_code": row["failure_code"],
        "batch_id": row["batch_id"],
        "created_at": _time(row["created_at"]),
        "completed_at": _time(row["completed_at"]),
    }


def entry(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "payment_id": row["payment_id"],
        "account_id": row["account_id"],
        "amount": format_amount(row["amount"]),
        "balance_after": format_amount(row["balance_after"]),
        "created_at": _time(row["created_at"]),
    }


def batch(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "atomic": row["atomic"],
        "total": row["total"],
        "counts": {"pending": row["pending"], "completed": row["completed"], "failed": row["failed"]},
        "finished": row["pending"] == 0,
        "created_at": _time(row["created_at"]),
    }
