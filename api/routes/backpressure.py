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

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from flask import current_app, g, request
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
        if g.pop("wallet_admitted", None) != len(reqs):  # not already by refuse_again_at_once
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
        if key is None:
            _refused_bodies().remember(_body_digest(resource_type), len(reqs))
        raise


def refuse_again_at_once(resource_type: str) -> None:
    """Raises Overloaded, before any parsing, for a body that this process has already validated
    in full and refused, while admission control still refuses (after waiting for room, as any
    request does): the full path would answer the same 429. Its validity cannot have changed: it
    rests on the body's bytes, the currencies and the accounts' currencies, none of which ever
    change (common.ledger.directory). A client refused sends the same request again, so under
    overload most refusals are of this kind, and they then cost about what an empty request
    does. A request with an Idempotency-Key always takes the full path: it may be a replay, to
    be answered."""
    refused = _refused_bodies()
    if not refused or "Idempotency-Key" in request.headers:
        return
    count = refused.count(_body_digest(resource_type))
    if count is not None:  # it waits for room like any other; once admitted, it is counted in
        wallet().admission.admit(count)
        g.wallet_admitted = count


class RefusedBodies:
    """Digests of valid bodies refused with 429, each with its number of payments. Bounded: when
    full it is emptied (a forgotten body only costs its next refusal the full path)."""

    def __init__(self, max_bodies: int = 4096):
        self._max_bodies = max_bodies
        self._counts: dict[bytes, int] = {}  # single dict operations: atomic under the GIL

    def remember(self, digest: bytes, count: int) -> None:
        if len(self._counts) >= self._max_bodies:
            self._counts.clear()
        self._counts[digest] = count

    def count(self, digest: bytes) -> int | None:
        return self._counts.get(digest)

    def __len__(self) -> int:
        return len(self._counts)


def _refused_bodies() -> RefusedBodies:
    return current_app.extensions.setdefault("wallet_refused_bodies", RefusedBodies())


def _body_digest(resource_type: str) -> bytes:
    return hashlib.blake2b(request.get_data(cache=True), digest_size=16,
                           person=resource_type.encode()[:16]).digest()


def batch_replay(session: Session, batch_id: int) -> Mapping[str, Any]:
    from common import queries
    return {"id": batch_id, "payments": queries.batch_payments(session, batch_id)}
