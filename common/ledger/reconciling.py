"""Reconciliation: the invariants, checked over the whole database."""
from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.orm import Session

from common.ledger.events import event_problems

def reconcile(session: Session, *, events: bool = True) -> list[str]:
    """Check invariants 1-3, the holds and refunds (SPEC 9), the entry/payment correspondence and
    (unless `events` is False) the outbox; returns the violations."""
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
        "SELECT id, balance, held FROM accounts WHERE kind = 'customer' AND balance - held < 0"
    )):
        problems.append(f"account {row.id}: available balance {row.balance - row.held} is negative")
    for row in session.execute(text(
        "SELECT a.id, a.held, coalesce(h.total, 0) AS authorized FROM accounts a"
        " LEFT JOIN (SELECT buyer_account_id AS id, sum(amount) AS total FROM payments"
        "            WHERE status = 'authorized' GROUP BY buyer_account_id) h ON h.id = a.id"
        " WHERE a.held <> coalesce(h.total, 0)"
    )):
        problems.append(f"account {row.id}: held {row.held} but its authorized payments sum to {row.authorized}")
    # Its accounts exist, of its currency: what the INSERT checked, and triggers keep true (no
    # foreign key does since migration 0004).
    for row in session.execute(text(
        "SELECT p.id FROM payments p"
        " LEFT JOIN accounts b ON b.id = p.buyer_account_id AND b.currency_id = p.currency_id"
        " LEFT JOIN accounts s ON s.id = p.seller_account_id AND s.currency_id = p.currency_id"
        " WHERE b.id IS NULL OR s.id IS NULL ORDER BY p.id"
    )):
        problems.append(f"payment {row.id}: its buyer or seller is not an account of its currency")
    # Its batch exists, if it names one: what the batch's own transaction holds (no foreign key
    # since migration 0007).
    for row in session.execute(text(
        "SELECT p.id FROM payments p LEFT JOIN batches b ON b.id = p.batch_id"
        " WHERE p.batch_id IS NOT NULL AND b.id IS NULL ORDER BY p.id"
    )):
        problems.append(f"payment {row.id}: its batch does not exist")
    # Its account exists, and its payment if it names one: what the writing statement holds, and
    # triggers keep true (no foreign key does since migration 0005).
    for row in session.execute(text(
        "SELECT e.id FROM ledger_entries e"
        " LEFT JOIN accounts a ON a.id = e.account_id LEFT JOIN payments p ON p.id = e.payment_id"
        " WHERE a.id IS NULL OR (e.payment_id IS NOT NULL AND p.id IS NULL) ORDER BY e.id"
    )):
        problems.append(f"ledger entry {row.id}: its account or its payment does not exist")
    # open_payments is exactly the pending and authorized payments (its triggers, migration 0006).
    for row in session.execute(text(
        "SELECT coalesce(p.id, o.payment_id) AS id, p.status, o.status AS listed FROM"
        " (SELECT id, status, authorization_expires_at FROM payments"
        "  WHERE status IN ('pending', 'authorized')) p"
        " FULL JOIN open_payments o ON o.payment_id = p.id"
        " WHERE p.id IS NULL OR o.payment_id IS NULL OR o.status <> p.status"
        "    OR o.authorization_expires_at IS DISTINCT FROM p.authorization_expires_at ORDER BY 1"
    )):
        problems.append(f"payment {row.id}: {row.status or 'not open'}, but listed in open_payments"
                        f" as {row.listed or 'nothing'}")
    # A completed payment has two entries moving its captured amount; any other payment has none.
    for row in session.execute(text(
        "SELECT p.id, p.status, count(e.id) AS entries, coalesce(sum(e.amount) FILTER (WHERE e.amount > 0), 0) AS moved,"
        " p.amount_captured FROM payments p"
        " LEFT JOIN ledger_entries e ON e.payment_id = p.id GROUP BY p.id, p.status"
        " HAVING count(e.id) <> CASE WHEN p.status = 'completed' THEN 2 ELSE 0 END"
        "   OR coalesce(sum(e.amount), 0) <> 0"
        "   OR coalesce(sum(e.amount) FILTER (WHERE e.amount > 0), 0) <> coalesce(p.amount_captured, 0)"
    )):
        problems.append(f"payment {row.id}: {row.status}, captured {row.amount_captured}, with {row.entries}"
                        f" ledger entries moving {row.moved}")
    for row in session.execute(text(
        "SELECT o.id, o.amount_captured, o.amount_refunded, coalesce(r.claimed, 0) AS claimed,"
        " coalesce(r.completed, 0) AS completed"
        " FROM payments o LEFT JOIN ("
        "   SELECT refund_of, sum(amount) FILTER (WHERE status <> 'failed') AS claimed,"
        "          sum(amount) FILTER (WHERE status = 'completed') AS completed"
        "   FROM payments WHERE refund_of IS NOT NULL GROUP BY refund_of) r ON r.refund_of = o.id"
        " WHERE (r.refund_of IS NOT NULL OR o.amount_refunded <> 0)"
        "   AND (coalesce(r.claimed, 0) > coalesce(o.amount_captured, 0)"
        "        OR coalesce(r.completed, 0) <> o.amount_refunded)"
    )):
        problems.append(f"payment {row.id}: captured {row.amount_captured}, refunds claim {row.claimed},"
                        f" completed refunds {row.completed} but amount_refunded {row.amount_refunded}")
    if events:  # the outbox: every status change has its event
        problems += event_problems(session)
    return problems
