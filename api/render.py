"""Rows to JSON-ready dicts. Amounts leave as exact strings, times as ISO 8601."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from common.ledger import Currencies
from common.money import format_amount


def _time(value) -> str | None:
    return value.isoformat() if value is not None else None


def _amount(value) -> str | None:
    return format_amount(value) if value is not None else None


def account(row: Mapping[str, Any], currencies: Currencies) -> dict[str, Any]:
    return {
        "id": row["id"],
        "name": row["name"],
        "currency_id": row["currency_id"],
        "currency": currencies.by_id[row["currency_id"]].code,
        "balance": format_amount(row["balance"]),
        "held": format_amount(row["held"]),
        "available": format_amount(row["balance"] - row["held"]),
        "status": row["status"],
        "metadata": row["metadata"],
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
        "capture_method": row["capture_method"],
        "amount_captured": _amount(row["amount_captured"]),
        "amount_refunded": format_amount(row["amount_refunded"]),
        "refund_of": row["refund_of"],
        "authorization_expires_at": _time(row["authorization_expires_at"]),
        "cancellation_reason": row["cancellation_reason"],
        "reference": row["reference"],
        "metadata": row["metadata"],
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
        "counts": {status: row[status] for status in ("pending", "completed", "failed", "authorized", "canceled")},
        "finished": row["pending"] == 0,
        "created_at": _time(row["created_at"]),
    }
