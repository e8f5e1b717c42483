"""Ledger entries: one row per balance change, written set-based.

No foreign key checks an entry's account and payment (migration 0005): whoever writes entries
holds their accounts locked and writes or updates their payments in the same transaction. Entries
are append-only (triggers refuse UPDATE and DELETE), and reconcile reports any that names a
missing row."""
from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import text
from sqlalchemy.orm import Session

INSERT_ENTRIES = (
    "INSERT INTO ledger_entries (account_id, payment_id, amount, balance_after)"
    " SELECT e.account_id, e.payment_id, e.amount, e.balance_after"
    " FROM unnest(CAST(:entry_accounts AS bigint[]), CAST(:entry_payments AS bigint[]),"
    "             CAST(:entry_amounts AS numeric[]), CAST(:entry_after AS numeric[]))"
    "      WITH ORDINALITY AS e(account_id, payment_id, amount, balance_after, n)"
    " ORDER BY e.n"
)


def entry_params(entries: Sequence[tuple]) -> dict[str, list]:
    """entries: (account_id, payment_id, signed amount, balance after), in the order they happened."""
    columns = [list(col) for col in zip(*entries)] or [[], [], [], []]
    return dict(zip(("entry_accounts", "entry_payments", "entry_amounts", "entry_after"), columns))


def insert_entries(session: Session, entries: Sequence[tuple]) -> None:
    session.execute(text(INSERT_ENTRIES), entry_params(entries))
