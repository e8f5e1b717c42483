"""Applying accepted payments, in the worker's transactions.

Locking discipline (what makes concurrent application race-free and deadlock-free):
payments are locked before accounts, each set in ascending id order, accounts with
`FOR NO KEY UPDATE` (which does not block the `FOR KEY SHARE` locks that payment inserts take
through their foreign keys).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, localcontext
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from common import money
from common.errors import FailureCode
from common.ledger.entries import INSERT_ENTRIES, entry_params

@dataclass(frozen=True)
class Outcome:
    payment_id: int
    failure_code: FailureCode | None  # None: completed

    @property
    def status(self) -> str:
        return "completed" if self.failure_code is None else "failed"


_LOCK_PENDING = (
    "SELECT p.id, p.buyer_account_id AS buyer, p.seller_account_id AS seller, p.amount"
    " FROM payments p WHERE {where} AND p.status = 'pending'"
    " ORDER BY p.id FOR UPDATE OF p{skip}"
)


_LOCK_SINGLES = text(_LOCK_PENDING.format(skip=" SKIP LOCKED", where=(
    "p.id = ANY(:ids) AND (p.batch_id IS NULL"
    " OR NOT (SELECT b.atomic FROM batches b WHERE b.id = p.batch_id))")))
_LOCK_BATCH = text(_LOCK_PENDING.format(skip="", where="p.batch_id = :batch_id"))


def apply_payments(session: Session, payment_ids: Sequence[int]) -> list[Outcome]:
    """Apply the still-pending payments among `payment_ids`, each on its own merits, in id order.

    Payments already terminal are skipped, so a redelivered or re-swept message is harmless.
    Payments of atomic batches are left to `apply_atomic_batch`.
    """
    # SKIP LOCKED: a payment locked right now is being applied by another transaction (a
    # redelivered or re-swept copy of its message); waiting for it would only find it terminal.
    # Should that transaction roll back instead, the payment is still pending and is swept again.
    payments = session.execute(_LOCK_SINGLES, {"ids": list(payment_ids)}).all()
    return _apply(session, payments, atomic=False)


def apply_atomic_batch(session: Session, batch_id: int) -> list[Outcome]:
    """All payments of an atomic batch complete together, or all fail together."""
    # No SKIP LOCKED here: an atomic batch must see all of its payments, so it waits.
    payments = session.execute(_LOCK_BATCH, {"batch_id": batch_id}).all()
    return _apply(session, payments, atomic=True)


def _apply(session: Session, payments: Sequence[Any], *, atomic: bool) -> list[Outcome]:
    if not payments:
        return []
    account_ids = sorted({i for p in payments for i in (p.buyer, p.seller)})
    accounts = {row.id: row for row in session.execute(text(
        "SELECT id, balance, status FROM accounts WHERE id = ANY(:ids)"
        " ORDER BY id FOR NO KEY UPDATE"
    ), {"ids": account_ids})}
    balances = {i: row.balance for i, row in accounts.items()}
    outcomes, entries = [], []
    with localcontext(money.MONEY_CONTEXT):
        for p in payments:
            code = _refusal(p, accounts, balances)
            outcomes.append(Outcome(p.id, code))
            if code is None:
                balances[p.buyer] -= p.amount
                balances[p.seller] += p.amount
                entries.append((p.buyer, p.id, -p.amount, balances[p.buyer]))
                entries.append((p.seller, p.id, p.amount, balances[p.seller]))
    if atomic and any(o.failure_code for o in outcomes):
        outcomes = [Outcome(o.payment_id, o.failure_code or FailureCode.BATCH_FAILED) for o in outcomes]
        entries, balances = [], {i: row.balance for i, row in accounts.items()}
    changed = {i: b for i, b in balances.items() if b != accounts[i].balance}
    # One round trip for all the writes: balances, entries and payment statuses.
    session.execute(text(
        "WITH balances AS ("
        "  UPDATE accounts a SET balance = v.balance, updated_at = now()"
        "  FROM unnest(CAST(:account_ids AS bigint[]), CAST(:balances AS numeric[])) AS v(id, balance)"
        "  WHERE a.id = v.id RETURNING 1),"
        f" entries AS ({INSERT_ENTRIES} RETURNING 1)"
        " UPDATE payments p SET status = v.status, failure_code = v.code, completed_at = now()"
        " FROM unnest(CAST(:ids AS bigint[]), CAST(:statuses AS text[]), CAST(:codes AS text[]))"
        "      AS v(id, status, code)"
        " WHERE p.id = v.id"
    ), {"account_ids": list(changed), "balances": list(changed.values()), **entry_params(entries),
        "ids": [o.payment_id for o in outcomes], "statuses": [o.status for o in outcomes],
        "codes": [o.failure_code and str(o.failure_code) for o in outcomes]})
    return outcomes


def _refusal(p: Any, accounts: Mapping[int, Any], balances: Mapping[int, Decimal]) -> FailureCode | None:
    if accounts[p.buyer].status != "active" or accounts[p.seller].status != "active":
        return FailureCode.ACCOUNT_FROZEN
    if balances[p.buyer] < p.amount:
        return FailureCode.INSUFFICIENT_FUNDS
    return None


_LOCK_ANY = text(_LOCK_PENDING.format(skip="", where="p.id = ANY(:ids)"))


def apply_as_one_set(session: Session, payment_ids: Sequence[int]) -> list[Outcome]:
    """Apply the still-pending payments among `payment_ids` as one all-or-nothing set, payments of
    atomic batches included. For diagnosis only (which payment of a transaction that keeps
    failing raises?): the caller rolls the transaction back."""
    payments = session.execute(_LOCK_ANY, {"ids": list(payment_ids)}).all()
    return _apply(session, payments, atomic=True)
