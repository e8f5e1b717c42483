"""Reads: single resources and keyset-paginated lists. Writes live in common.ledger."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from common.errors import NotFound
from common.ledger.accepting import PAYMENT_COLUMNS
from common.ledger.accounts import ACCOUNT_COLUMNS


@dataclass(frozen=True)
class Page:
    rows: list[Mapping[str, Any]]
    next_after: int | None  # the id to continue after, None at the end


def _page(rows: list[Mapping[str, Any]], limit: int) -> Page:
    if len(rows) > limit:
        return Page(rows[:limit], rows[limit - 1]["id"])
    return Page(rows, None)


def get_account(session: Session, account_id: int) -> Mapping[str, Any]:
    row = session.execute(text(
        f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = :id AND kind = 'customer'"
    ), {"id": account_id}).mappings().first()
    if row is None:
        raise NotFound(f"account {account_id} does not exist")
    return row


def list_accounts(session: Session, *, after: int | None, limit: int,
                  currency_id: int | None = None) -> Page:
    rows = session.execute(text(
        f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE kind = 'customer'"
        " AND id > coalesce(:after, 0)"
        " AND (CAST(:currency_id AS smallint) IS NULL OR currency_id = :currency_id)"
        " ORDER BY id LIMIT :limit"
    ), {"after": after, "limit": limit + 1, "currency_id": currency_id}).mappings().all()
    return _page(list(rows), limit)


def get_payment(session: Session, payment_id: int) -> Mapping[str, Any]:
    row = session.execute(text(f"SELECT {PAYMENT_COLUMNS} FROM payments WHERE id = :id"),
                          {"id": payment_id}).mappings().first()
    if row is None:
        raise NotFound(f"payment {payment_id} does not exist")
    return row


# No index of `payments` names `status` (migration 0006): each status is found through what
# does. Completed payments, most of the table, are found along the primary key.
_OPEN = "status = :status AND id IN (SELECT payment_id FROM open_payments WHERE status = :status)"
_STATUS_FILTER = {
    "pending": _OPEN,
    "authorized": _OPEN,
    "failed": "status = :status AND failure_code IS NOT NULL",  # payments_failed_idx
    "canceled": "status = :status AND cancellation_reason IS NOT NULL",  # payments_canceled_idx
}


def list_payments(session: Session, *, after: int | None, limit: int, account_id: int | None = None,
                  status: str | None = None, batch_id: int | None = None,
                  refund_of: int | None = None, reference: str | None = None) -> Page:
    """Newest first. With an account, the union of its two indexed sides beats an OR scan."""
    where = ["id < coalesce(:after, 9223372036854775807)"]
    if status is not None:
        where.append(_STATUS_FILTER.get(status, "status = :status"))
    if batch_id is not None:
        where.append("batch_id = :batch_id")
    if refund_of is not None:
        where.append("refund_of = :refund_of")
    if reference is not None:
        where.append("reference = :reference")
    cond = " AND ".join(where)
    if account_id is None:
        sql = f"SELECT {PAYMENT_COLUMNS} FROM payments WHERE {cond} ORDER BY id DESC LIMIT :limit"
    else:
        sql = (
            f"SELECT {PAYMENT_COLUMNS} FROM ("
            f" (SELECT * FROM payments WHERE buyer_account_id = :account AND {cond}"
            "   ORDER BY id DESC LIMIT :limit)"
            " UNION"
            f" (SELECT * FROM payments WHERE seller_account_id = :account AND {cond}"
            "   ORDER BY id DESC LIMIT :limit)"
            ") p ORDER BY id DESC LIMIT :limit"
        )
    rows = session.execute(text(sql), {
        "after": after, "limit": limit + 1, "status": status, "batch_id": batch_id,
        "account": account_id, "refund_of": refund_of, "reference": reference,
    }).mappings().all()
    return _page(list(rows), limit)


def batch_payments(session: Session, batch_id: int) -> list[Mapping[str, Any]]:
    """Every payment of a batch, in id order (the order they were submitted in)."""
    return list(session.execute(text(
        f"SELECT {PAYMENT_COLUMNS} FROM payments WHERE batch_id = :id ORDER BY id"
    ), {"id": batch_id}).mappings())


def list_entries(session: Session, account_id: int, *, after: int | None, limit: int) -> Page:
    get_account(session, account_id)
    rows = session.execute(text(
        "SELECT id, payment_id, account_id, amount, balance_after, created_at FROM ledger_entries"
        " WHERE account_id = :account AND id < coalesce(:after, 9223372036854775807)"
        " ORDER BY id DESC LIMIT :limit"
    ), {"account": account_id, "after": after, "limit": limit + 1}).mappings().all()
    return _page(list(rows), limit)


def get_batch(session: Session, batch_id: int) -> Mapping[str, Any]:
    row = session.execute(text(
        "SELECT b.id, b.atomic, b.total, b.created_at,"
        " count(*) FILTER (WHERE p.status = 'pending') AS pending,"
        " count(*) FILTER (WHERE p.status = 'completed') AS completed,"
        " count(*) FILTER (WHERE p.status = 'failed') AS failed,"
        " count(*) FILTER (WHERE p.status = 'authorized') AS authorized,"
        " count(*) FILTER (WHERE p.status = 'canceled') AS canceled"
        " FROM batches b LEFT JOIN payments p ON p.batch_id = b.id"
        " WHERE b.id = :id GROUP BY b.id"
    ), {"id": batch_id}).mappings().first()
    if row is None:
        raise NotFound(f"batch {batch_id} does not exist")
    return row
