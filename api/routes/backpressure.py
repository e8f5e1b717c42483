"""Admission control for new work only (SPEC section 12).

The hot path is `Admission.admit`, an in-memory comparison most of the time. Only when it would
refuse does the request pay for a read transaction, to answer what a 429 must not hide: a
retried request whose Idempotency-Key already made its resource gets that resource (or its 409),
and a request that is invalid gets its 422. Nothing is written on this path, so a refusal costs
two indexed reads at most (the key; the accounts, only those this process has not seen before:
common.ledger.directory), never an INSERT rolled back. A refusal is much of the API's work
under overload (clients retry them), so it must stay far cheaper than the work it refuses.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from sqlalchemy.orm import Session

from api.wallet import wallet
from common import ledger
from common.errors import Overloaded

T = TypeVar("T")


def admit_new_work(reqs: Sequence[ledger.PaymentRequest], key: ledger.IdempotencyKey | None,
                   resource_type: str, load: Callable[[Session, int], T]) -> T | None:
    """None when the request may go on as new work; the replayed resource (`load` of its id) when
    its key already made one. Raises IdempotencyConflict, the request's 422, or Overloaded."""
    w = wallet()
    try:
        w.admission.admit(len(reqs))
        return None
    except Overloaded:
        with w.db.read() as session:
            if key is not None:
                resource_id = ledger.replayed(session, key, resource_type)
                if resource_id is not None:
                    return load(session, resource_id)
            problems = ledger.payment_problems(session, w.currencies, reqs, w.accounts)
        if problems:
            raise problems[0][1] if resource_type == "payment" else ledger.batch_refused(
                problems, len(reqs)) from None
        raise


def batch_replay(session: Session, batch_id: int) -> Mapping[str, Any]:
    from common import queries
    return {"id": batch_id, "payments": queries.batch_payments(session, batch_id)}
