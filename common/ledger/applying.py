"""Applying accepted payments, in the worker's transactions.

Locking discipline (what makes concurrent application race-free and deadlock-free):
payments are locked before accounts, each set in ascending id order, accounts with
`FOR NO KEY UPDATE` (which does not block the `FOR KEY SHARE` locks that foreign-key checks
take). Captures, cancels and expiries (common.ledger.holds) lock their
payments first and then their accounts too; a completed refund also updates its original payment,
after the accounts, and the refund request (common.ledger.refunds) locks that original without
waiting for any account lock, so no cycle can form.

A manual payment is applied like any other but moves nothing: its amount joins the buyer's `held`
(status `authorized`). Every payment, held or not, needs the buyer's available balance
(`balance - held`).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, localcontext
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from common import money, pgarray
from common.errors import FailureCode
from common.ledger.entries import INSERT_ENTRIES, entry_params
from common.ledger.events import APPLY_EVENTS, record_batch_finished


@dataclass(frozen=True)
class Outcome:
    payment_id: int
    failure_code: FailureCode | None  # None: completed, or authorized when `held`
    held: bool = False  # a manual payment whose amount is now reserved

    @property
    def status(self) -> str:
        if self.failure_code is not None:
            return "failed"
        return "authorized" if self.held else "completed"


_LOCK_PENDING = (
    "SELECT p.id, p.buyer_account_id AS buyer, p.seller_account_id AS seller, p.amount,"
    " p.capture_method = 'manual' AS manual, p.refund_of"
    " FROM payments p WHERE {where} AND p.status = 'pending'"
    " ORDER BY p.id FOR UPDATE OF p{skip}"
)


# None of the apply statements is PREPAREd, though planning them is ~1 ms a transaction (8 % of
# PostgreSQL's time with single payments): a generic plan is made once, from the statistics of
# that moment, and kept. Made while `payments` was nearly empty, the write statement's reached
# each payment through a full scan of another index (then `payments_status_idx`, a condition on `id`),
# and the payment locks' read every pending payment through the status index; the scaling table
# collapsed (batch ~1,000/s, completion p99 1.4-2.7 s, bench/NOTES.md 2026-12-02 afternoon).
_LOCK_SINGLES = text(_LOCK_PENDING.format(skip=" SKIP LOCKED", where=(
    "p.id = ANY(CAST(:ids AS bigint[])) AND (p.batch_id IS NULL"
    " OR NOT (SELECT b.atomic FROM batches b WHERE b.id = p.batch_id))")))
_LOCK_BATCH = text(_LOCK_PENDING.format(skip="", where="p.batch_id = :batch_id"))


# Every statement of an apply transaction reaches its rows by primary key (or the batch index):
# from a few rows to a few thousand, of tables of any size. Left to its default costs
# (random_page_cost 4, meant for disks) and to statistics taken while a table was small, the
# planner seq-scanned `payments` and `accounts` into hash joins instead: tens of milliseconds per
# transaction, with the accounts locked all the while, so the other workers queued behind it and
# throughput fell 5-8x (bench/NOTES.md, 2026-12-02). A sequential scan is never the right plan
# here: it is ruled out for the transaction (SET LOCAL ends with it).
_NO_SEQSCAN = text("SET LOCAL enable_seqscan = off")


def apply_payments(session: Session, payment_ids: Sequence[int]) -> list[Outcome]:
    """Apply the still-pending payments among `payment_ids`, each on its own merits, in id order.

    Payments already terminal are skipped, so a redelivered or re-swept message is harmless.
    Payments of atomic batches are left to `apply_atomic_batch`.
    """
    # SKIP LOCKED: a payment locked right now is being applied by another transaction (a
    # redelivered or re-swept copy of its message); waiting for it would only find it terminal.
    # Should that transaction roll back instead, the payment is still pending and is swept again.
    session.execute(_NO_SEQSCAN)
    payments = session.execute(_LOCK_SINGLES, {"ids": pgarray.integers(payment_ids)}).all()
    return _apply(session, payments, atomic=False)


def apply_atomic_batch(session: Session, batch_id: int) -> list[Outcome]:
    """All payments of an atomic batch complete together, or all fail together."""
    # No SKIP LOCKED here: an atomic batch must see all of its payments, so it waits.
    session.execute(_NO_SEQSCAN)
    payments = session.execute(_LOCK_BATCH, {"batch_id": batch_id}).all()
    return _apply(session, payments, atomic=True)


@dataclass
class _Accounts:
    """The locked accounts of one transaction: what they were, and what they become."""
    rows: Mapping[int, Any]
    balance: dict[int, Decimal]
    held: dict[int, Decimal]

    @classmethod
    def lock(cls, session: Session, account_ids: Sequence[int]) -> "_Accounts":
        rows = {row.id: row for row in session.execute(text(
            "SELECT id, balance, held, status FROM accounts WHERE id = ANY(CAST(:ids AS bigint[]))"
            " ORDER BY id FOR NO KEY UPDATE"
        ), {"ids": pgarray.integers(sorted(account_ids))})}
        return cls(rows, {i: r.balance for i, r in rows.items()}, {i: r.held for i, r in rows.items()})

    def available(self, account_id: int) -> Decimal:
        return self.balance[account_id] - self.held[account_id]

    def reset(self) -> None:
        self.balance = {i: r.balance for i, r in self.rows.items()}
        self.held = {i: r.held for i, r in self.rows.items()}

    def changed(self) -> list[tuple[int, Decimal, Decimal]]:
        return [(i, self.balance[i], self.held[i]) for i, r in self.rows.items()
                if (self.balance[i], self.held[i]) != (r.balance, r.held)]


def _apply(session: Session, payments: Sequence[Any], *, atomic: bool) -> list[Outcome]:
    if not payments:
        return []
    accounts = _Accounts.lock(session, {i for p in payments for i in (p.buyer, p.seller)})
    outcomes, entries, refunded = [], [], defaultdict(Decimal)
    with localcontext(money.MONEY_CONTEXT):
        for p in payments:
            code = _refusal(p, accounts)
            outcomes.append(Outcome(p.id, code, held=p.manual and code is None))
            if code is not None:
                continue
            if p.manual:  # a hold: reserved now, moved (or released) by capture or cancel
                accounts.held[p.buyer] += p.amount
                continue
            accounts.balance[p.buyer] -= p.amount
            accounts.balance[p.seller] += p.amount
            entries.append((p.buyer, p.id, -p.amount, accounts.balance[p.buyer]))
            entries.append((p.seller, p.id, p.amount, accounts.balance[p.seller]))
            if p.refund_of is not None:
                refunded[p.refund_of] += p.amount
    if atomic and any(o.failure_code for o in outcomes):
        outcomes = [Outcome(o.payment_id, o.failure_code or FailureCode.BATCH_FAILED) for o in outcomes]
        entries, refunded = [], {}
        accounts.reset()
    _write(session, accounts.changed(), entries, outcomes, refunded)
    return outcomes


# One round trip for all the writes: balances and holds, entries, payment statuses, and their
# events (common.ledger.events), which answers the ids of the batches it finished. Each UPDATE
# names its ids twice: joined to unnest() alone, the planner cannot tell how few rows match and
# seq-scans a small table into a hash join (10,000 accounts, 82 of them changed: 0.9-1.3 ms
# against 0.35-0.5 ms by the primary key, EXPLAIN ANALYZE); `id = ANY(...)` gives it the count.
_WRITE = (
    "WITH balances AS ("
    "  UPDATE accounts a SET balance = v.balance, held = v.held, updated_at = now()"
    "  FROM unnest(CAST(:account_ids AS bigint[]), CAST(:balances AS numeric[]),"
    "              CAST(:helds AS numeric[])) AS v(id, balance, held)"
    "  WHERE a.id = v.id AND a.id = ANY(CAST(:account_ids AS bigint[])) RETURNING 1),"
    f" entries AS ({INSERT_ENTRIES} RETURNING 1){{refunds}},"
    " paid AS (UPDATE payments p SET status = v.status, failure_code = v.code,"
    "   completed_at = CASE WHEN v.status = 'authorized' THEN NULL ELSE now() END,"
    "   amount_captured = CASE WHEN v.status = 'completed' THEN p.amount END"
    " FROM unnest(CAST(:ids AS bigint[]), CAST(:statuses AS text[]), CAST(:codes AS text[]))"
    "      AS v(id, status, code)"
    " WHERE p.id = v.id AND p.id = ANY(CAST(:ids AS bigint[])) RETURNING p.*)" + APPLY_EVENTS.replace("{", "{{").replace("}", "}}")
)
# Only when refunds completed: the originals' amount_refunded grows (they are completed, so never
# among the pending payments this statement updates).
_REFUNDS = (
    ", refunds AS ("
    "  UPDATE payments o SET amount_refunded = o.amount_refunded + v.amount"
    "  FROM unnest(CAST(:originals AS bigint[]), CAST(:refunded AS numeric[])) AS v(id, amount)"
    "  WHERE o.id = v.id RETURNING 1)"
)
_WRITE_PLAIN = text(_WRITE.format(refunds=""))
_WRITE_WITH_REFUNDS = text(_WRITE.format(refunds=_REFUNDS))
# Its lists leave as array literals (common.pgarray): ~6 values per payment, 500 payments a set.
_WRITE_ARRAYS = pgarray.ArrayParams(_WRITE_WITH_REFUNDS.text)


def _write(session: Session, changed: Sequence[tuple[int, Decimal, Decimal]], entries: Sequence[tuple],
           outcomes: Sequence[Outcome], refunded: Mapping[int, Decimal]) -> None:
    account_ids, balances, helds = (list(c) for c in zip(*changed)) if changed else ([], [], [])
    params = {"account_ids": account_ids, "balances": balances, "helds": helds, **entry_params(entries),
              "ids": [o.payment_id for o in outcomes], "statuses": [o.status for o in outcomes],
              "codes": [o.failure_code and str(o.failure_code) for o in outcomes]}
    if refunded:
        result = session.execute(_WRITE_WITH_REFUNDS, _WRITE_ARRAYS({
            **params, "originals": list(refunded), "refunded": list(refunded.values())}))
    else:
        result = session.execute(_WRITE_PLAIN, _WRITE_ARRAYS(params))
    record_batch_finished(session, result.scalars().all())


def _refusal(p: Any, accounts: _Accounts) -> FailureCode | None:
    rows = accounts.rows
    if rows[p.buyer].status != "active" or rows[p.seller].status != "active":
        return FailureCode.ACCOUNT_FROZEN
    if accounts.available(p.buyer) < p.amount:
        return FailureCode.INSUFFICIENT_FUNDS
    return None


_LOCK_ANY = text(_LOCK_PENDING.format(skip="", where="p.id = ANY(:ids)"))


def apply_as_one_set(session: Session, payment_ids: Sequence[int]) -> list[Outcome]:
    """Apply the still-pending payments among `payment_ids` as one all-or-nothing set, payments of
    atomic batches included. For diagnosis only (which payment of a transaction that keeps
    failing raises?): the caller rolls the transaction back."""
    session.execute(_NO_SEQSCAN)
    payments = session.execute(_LOCK_ANY, {"ids": list(payment_ids)}).all()
    return _apply(session, payments, atomic=True)
