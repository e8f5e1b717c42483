"""Failing what cannot be applied: a payment whose application raises an error that is not
retried (a data bug, a constraint, a trigger), again and again, ends `failed` with
`internal_error`, so that it never holds up the others of its message (SPEC section 12).

The worker decides which payments those are (worker.tasks); this only records it.
"""
from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import text
from sqlalchemy.orm import Session

from common.errors import FailureCode
from common.ledger.applying import Outcome
from common.ledger.events import record_payment_events

_FAIL = text(
    "UPDATE payments p SET status = 'failed', failure_code = v.code, completed_at = now()"
    " FROM unnest(CAST(:ids AS bigint[]), CAST(:codes AS text[])) AS v(id, code)"
    " WHERE p.id = v.id AND p.status = 'pending'"
    " RETURNING p.id, v.code"
)


def fail_payments(session: Session, codes: Mapping[int, FailureCode]) -> list[Outcome]:
    """Mark these payments failed with their code, those still pending only (the UPDATE waits for
    a transaction applying one and then skips it if it ended terminal). Moves no money and writes
    no ledger entry; writes their events. Returns the outcomes of the payments it failed, in id order."""
    ids = sorted(codes)
    rows = session.execute(_FAIL, {"ids": ids, "codes": [str(codes[i]) for i in ids]}).all()
    record_payment_events(session, [row.id for row in rows])  # in this transaction: the outbox
    return sorted((Outcome(row.id, FailureCode(row.code)) for row in rows), key=lambda o: o.payment_id)
