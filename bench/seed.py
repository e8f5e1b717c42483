"""Funded accounts in bulk, keeping the ledger's invariants: each opening balance is moved from
the currency's issuance account with its two ledger entries, as common.ledger.create_account
does one at a time, but set-based (10,000 accounts in well under a second)."""
from __future__ import annotations

from decimal import Decimal

from sqlalchemy import text
from sqlalchemy.orm import Session

from common.ledger import issuance_account_id

USD = 1


def seed_accounts(session: Session, count: int, opening: Decimal, hot_opening: Decimal,
                  currency_id: int = USD) -> list[int]:
    """Open `count` accounts in one transaction (the caller commits). The first one gets
    `hot_opening` (the hot buyer); returns the ids in order."""
    issuer = issuance_account_id(currency_id)
    ids = list(session.execute(text(
        "INSERT INTO accounts (name, currency_id, balance)"
        " SELECT 'bench-' || g, :cid, CASE WHEN g = 1 THEN :hot ELSE :opening END"
        " FROM generate_series(1, :n) AS g ORDER BY g RETURNING id"
    ), {"cid": currency_id, "hot": hot_opening, "opening": opening, "n": count}).scalars())
    ids.sort()
    before = session.execute(text(
        "SELECT balance FROM accounts WHERE id = :id AND kind = 'issuance' FOR NO KEY UPDATE"
    ), {"id": issuer}).scalar_one()
    # For each new account, in id order: the issuer's entry (its running balance after), then
    # the account's own; the same entries create_account writes.
    session.execute(text(
        "INSERT INTO ledger_entries (account_id, payment_id, amount, balance_after)"
        " SELECT x.account_id, NULL, x.amount, x.after FROM ("
        "   SELECT a.id AS ord, 0 AS k, CAST(:issuer AS bigint) AS account_id, -a.balance AS amount,"
        "          :before - sum(a.balance) OVER (ORDER BY a.id) AS after"
        "   FROM accounts a WHERE a.id = ANY(:ids)"
        "   UNION ALL"
        "   SELECT a.id, 1, a.id, a.balance, a.balance FROM accounts a WHERE a.id = ANY(:ids)"
        " ) x ORDER BY x.ord, x.k"
    ), {"issuer": issuer, "before": before, "ids": ids})
    session.execute(text(
        "UPDATE accounts SET balance = balance - (SELECT sum(balance) FROM accounts WHERE id = ANY(:ids)),"
        " updated_at = now() WHERE id = :issuer"
    ), {"issuer": issuer, "ids": ids})
    return ids


def seed_pending_payments(session: Session, count: int, buyer: int, seller: int,
                          currency_id: int = USD) -> tuple[int, int]:
    """Pending payment rows for the pgbench reference to complete; returns (first id, last id)."""
    first, last = session.execute(text(
        "WITH p AS (INSERT INTO payments (buyer_account_id, seller_account_id, currency_id, amount)"
        " SELECT :buyer, :seller, :cid, 0.01 FROM generate_series(1, :n) RETURNING id)"
        " SELECT min(id), max(id) FROM p"
    ), {"buyer": buyer, "seller": seller, "cid": currency_id, "n": count}).one()
    if last - first + 1 != count:
        raise RuntimeError("pending payments for the reference are not contiguous ids")
    return first, last
