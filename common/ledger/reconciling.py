"""Reconciliation: the invariants, checked over the whole database."""
from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.orm import Session

def reconcile(session: Session) -> list[str]:
    """Check invariants 1-3 (and the entry/payment correspondence); returns the violations."""
    problems = []
    for row in session.execute(text(
        "SELECT c.code, sum(a.balance) AS total FROM accounts a JOIN currencies c ON c.id = a.currency_id"
        " GROUP BY c.code HAVING sum(a.balance) <> 0"
    )):
        problems.append(f"{row.code}: balances sum to {row.total}, not 0: money was created or destroyed")
    for row in session.execute(text(
        "SELECT id, balance FROM accounts WHERE kind = 'customer' AND balance < 0"
    )):
        problems.append(f"account {row.id}: negative balance {row.balance}")
    for row in session.execute(text(
        "SELECT a.id, a.balance, coalesce(e.total, 0) AS entries FROM accounts a"
        " LEFT JOIN (SELECT account_id, sum(amount) AS total FROM ledger_entries GROUP BY account_id) e"
        "   ON e.account_id = a.id"
        " WHERE a.balance <> coalesce(e.total, 0)"
    )):
        problems.append(f"account {row.id}: balance {row.balance} but its entries sum to {row.entries}")
    for row in session.execute(text(
        "SELECT p.id, p.status, count(e.id) AS entries FROM payments p"
        " LEFT JOIN ledger_entries e ON e.payment_id = p.id GROUP BY p.id, p.status"
        " HAVING count(e.id) <> CASE WHEN p.status = 'completed' THEN 2 ELSE 0 END"
    )):
        problems.append(f"payment {row.id}: {row.status} with {row.entries} ledger entries")
    return problems
