"""Holds: capturing, canceling and expiring authorized (manual-capture) payments.

These run in the API's unit of work (capture, cancel) and the sweeper's (expiry), not in a
worker: which of concurrent capture, cancel and expiry wins is decided by the payment's row lock,
at once, so the losers can be told 409 instead of a 2xx for something that will not happen.
Each locks the payment first, then its accounts in id order, as the worker does.
"""
from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from common.errors import InvalidAmount, InvalidState, NotFound
from common.ledger.accepting import PAYMENT_COLUMNS, payment_rows
from common.ledger.currencies import Currencies, parse_amount
from common.ledger.entries import insert_entries
from common.ledger.events import record_payment_events
from common.ledger.idempotency import IdempotencyKey, idempotent

EXPIRE_LIMIT = 1000  # authorizations expired per sweep transaction

_LOCK_PAYMENT = text(
    "SELECT id, status, buyer_account_id AS buyer, seller_account_id AS seller, amount, currency_id,"
    " authorization_expires_at, authorization_expires_at <= now() AS expired"
    " FROM payments WHERE id = :id FOR NO KEY UPDATE"
)


def lock_payment(session: Session, payment_id: int) -> Any:
    row = session.execute(_LOCK_PAYMENT, {"id": payment_id}).first()
    if row is None:
        raise NotFound(f"payment {payment_id} does not exist")
    return row


def _require_authorized(p: Any) -> None:
    # Once its expiry time has passed, expiry has won, even before the sweeper has run.
    if p.status != "authorized" or p.expired:
        status = "expired" if p.status == "authorized" else p.status
        raise InvalidState(f"payment {p.id} is {status}, not authorized",
                           {"status": p.status, "expired": bool(p.expired)})


def capture_payment(session: Session, currencies: Currencies, payment_id: int, amount_raw: object,
                    key: IdempotencyKey | None = None) -> tuple[Mapping[str, Any], bool]:
    """Move the captured amount (default: all of it) buyer to seller and release the hold.
    Returns (payment row, captured now?)."""
    return idempotent(session, key, "capture",
                      create=lambda: _capture(session, currencies, payment_id, amount_raw),
                      load=lambda pid: payment_rows(session, [pid])[0])


def _capture(session: Session, currencies: Currencies, payment_id: int, amount_raw: object
             ) -> Mapping[str, Any]:
    p = lock_payment(session, payment_id)
    _require_authorized(p)
    amount = p.amount if amount_raw is None else parse_amount(amount_raw, currencies.by_id[p.currency_id])
    if amount > p.amount:
        raise InvalidAmount("the capture is larger than the authorized amount",
                            {"reason": "exceeds_authorized", "authorized": str(p.amount)})
    # A frozen account does not block this: the hold was granted while it was active.
    balances = _lock_and_update(session, [
        (p.buyer, -amount, -p.amount),  # (account, balance change, held change)
        (p.seller, amount, Decimal(0)),
    ])
    insert_entries(session, [(p.buyer, p.id, -amount, balances[p.buyer]),
                             (p.seller, p.id, amount, balances[p.seller])])
    row = session.execute(text(
        "UPDATE payments SET status = 'completed', amount_captured = :amount, completed_at = now()"
        f" WHERE id = :id RETURNING {PAYMENT_COLUMNS}"
    ), {"id": p.id, "amount": amount}).mappings().one()
    record_payment_events(session, [p.id], settled=False)
    return row


def cancel_payment(session: Session, payment_id: int, key: IdempotencyKey | None = None
                   ) -> tuple[Mapping[str, Any], bool]:
    """Release the hold: status `canceled`, reason `requested`. Returns (payment row, now?)."""
    def create() -> Mapping[str, Any]:
        p = lock_payment(session, payment_id)
        _require_authorized(p)
        _lock_and_update(session, [(p.buyer, Decimal(0), -p.amount)])
        row = session.execute(text(
            "UPDATE payments SET status = 'canceled', cancellation_reason = 'requested',"
            f" completed_at = now() WHERE id = :id RETURNING {PAYMENT_COLUMNS}"
        ), {"id": p.id}).mappings().one()
        record_payment_events(session, [p.id], settled=False)
        return row

    return idempotent(session, key, "cancel", create=create,
                      load=lambda pid: payment_rows(session, [pid])[0])


def expire_authorizations(session: Session, limit: int = EXPIRE_LIMIT) -> list[int]:
    """Cancel authorizations past their expiry (reason `expired`); returns their ids. Those a
    capture or cancel holds right now are skipped: that transaction decides them."""
    due = session.execute(text(
        "SELECT p.id, p.buyer_account_id AS buyer, p.amount"
        " FROM open_payments o JOIN payments p ON p.id = o.payment_id"
        " WHERE o.status = 'authorized' AND o.authorization_expires_at <= now()"
        "   AND p.status = 'authorized' AND p.authorization_expires_at <= now()"
        " ORDER BY o.payment_id LIMIT :limit FOR NO KEY UPDATE OF p SKIP LOCKED"
    ), {"limit": limit}).all()
    if not due:
        return []
    released: dict[int, Decimal] = {}
    for p in due:
        released[p.buyer] = released.get(p.buyer, Decimal(0)) - p.amount
    _lock_and_update(session, [(a, Decimal(0), change) for a, change in released.items()])
    ids = [p.id for p in due]
    session.execute(text(
        "UPDATE payments SET status = 'canceled', cancellation_reason = 'expired', completed_at = now()"
        " WHERE id = ANY(:ids)"
    ), {"ids": ids})
    record_payment_events(session, ids, settled=False)
    return ids


def _lock_and_update(session: Session, changes: list[tuple[int, Decimal, Decimal]]) -> dict[int, Decimal]:
    """Lock the accounts in id order, apply (balance change, held change) to each; returns the
    new balances."""
    changes = sorted(changes)
    session.execute(text(
        "SELECT id FROM accounts WHERE id = ANY(:ids) ORDER BY id FOR NO KEY UPDATE"
    ), {"ids": [c[0] for c in changes]}).all()
    rows = session.execute(text(
        "UPDATE accounts a SET balance = a.balance + v.balance, held = a.held + v.held,"
        " updated_at = now()"
        " FROM unnest(CAST(:ids AS bigint[]), CAST(:balances AS numeric[]), CAST(:helds AS numeric[]))"
        "      AS v(id, balance, held)"
        " WHERE a.id = v.id RETURNING a.id, a.balance"
    ), {"ids": [c[0] for c in changes], "balances": [c[1] for c in changes],
        "helds": [c[2] for c in changes]}).all()
    return {row.id: row.balance for row in rows}

