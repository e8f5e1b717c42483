"""Refunds: a payment of its own, seller to buyer, linked to the original by `refund_of`.

The refund request locks the original payment's row, so concurrent refunds of one payment are
decided one after another: the refunds that are not `failed` never add up to more than what was
captured. A refund that fails later (the seller's available balance was short) frees its amount
for another. The original's `amount_refunded` (completed refunds) is kept by the worker
(common.ledger.applying) in the transaction that completes the refund.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from common import money
from common.errors import InvalidState, NotFound, RefundExceedsPayment, ValidationFailed
from common.ledger.accepting import PaymentRequest, payment_rows, submit_payments
from common.ledger.currencies import Currencies, parse_amount
from common.ledger.idempotency import IdempotencyKey, idempotent


def refund_payment(session: Session, currencies: Currencies, payment_id: int, amount_raw: object,
                   reference: str | None = None, metadata: Mapping[str, str] | None = None,
                   key: IdempotencyKey | None = None) -> tuple[Mapping[str, Any], bool]:
    """Record a refund as `pending` (default amount: what is left to refund). Returns (refund
    payment row, created now?)."""
    def create() -> Mapping[str, Any]:
        original = _lock_refundable(session, payment_id)
        left = original.amount_captured - session.execute(text(
            "SELECT coalesce(sum(amount), 0) FROM payments WHERE refund_of = :id AND status <> 'failed'"
        ), {"id": payment_id}).scalar_one()
        amount = left if amount_raw is None else parse_amount(amount_raw, currencies.by_id[original.currency_id])
        if amount <= 0 or amount > left:
            raise RefundExceedsPayment(
                f"payment {payment_id} has {money.format_amount(left)} left to refund",
                {"refundable": money.format_amount(left), "requested": money.format_amount(amount)})
        req = PaymentRequest(original.seller, original.buyer, amount, original.currency_id,
                             reference=reference, metadata=metadata, refund_of=payment_id)
        return submit_payments(session, currencies, [req])[0]

    return idempotent(session, key, "refund", create=create,
                      load=lambda refund_id: payment_rows(session, [refund_id])[0])


def _lock_refundable(session: Session, payment_id: int) -> Any:
    original = session.execute(text(
        "SELECT id, status, buyer_account_id AS buyer, seller_account_id AS seller, currency_id,"
        " amount_captured, refund_of FROM payments WHERE id = :id FOR NO KEY UPDATE"
    ), {"id": payment_id}).first()
    if original is None:
        raise NotFound(f"payment {payment_id} does not exist")
    if original.refund_of is not None:
        raise ValidationFailed("a refund cannot be refunded", {"refund_of": original.refund_of})
    if original.status != "completed":
        raise InvalidState(f"payment {payment_id} is {original.status}; only a completed payment "
                           "can be refunded", {"status": original.status})
    return original
