"""Invariant checks over a set of accounts and the payments clients saw accepted (SPEC section 5)."""
from __future__ import annotations

from collections import defaultdict
from decimal import Decimal

from sqlalchemy import text

from tests.support.processes import wait_until


def wait_all_terminal(db, payment_ids: list[int], timeout_s: float) -> None:
    def pending():
        with db.read() as s:
            return s.execute(text(
                "SELECT count(*) FROM payments WHERE id = ANY(:ids) AND status = 'pending'"
            ), {"ids": payment_ids}).scalar_one()
    wait_until(lambda: pending() == 0, timeout_s, f"{len(payment_ids)} payments to be terminal",
               interval_s=0.2)


def check(db, openings: dict[int, Decimal], accepted: dict[int, tuple[int, int, Decimal]]) -> dict:
    """openings: account id -> opening amount; accepted: payment id -> (buyer, seller, amount) as
    the clients sent them. Asserts invariants 1-4 and returns a few counts for the test to use."""
    ids = list(accepted)
    with db.read() as s:
        rows = {r.id: r for r in s.execute(text(
            "SELECT id, status, buyer_account_id, seller_account_id, amount FROM payments"
            " WHERE id = ANY(:ids)"), {"ids": ids})}
        balances = dict(s.execute(text("SELECT id, balance FROM accounts WHERE id = ANY(:ids)"),
                                  {"ids": list(openings)}).all())
        entry_sums = dict(s.execute(text(
            "SELECT account_id, sum(amount) FROM ledger_entries WHERE account_id = ANY(:ids)"
            " GROUP BY account_id"), {"ids": list(openings)}).all())
        entries_per_payment = dict(s.execute(text(
            "SELECT payment_id, count(*) FROM ledger_entries WHERE payment_id = ANY(:ids)"
            " GROUP BY payment_id"), {"ids": ids}).all())

    assert set(rows) == set(ids), "an accepted payment is missing from the database"
    expected = dict(openings)
    for pid, (buyer, seller, amount) in accepted.items():
        row = rows[pid]
        assert (row.buyer_account_id, row.seller_account_id, row.amount) == (buyer, seller, amount)
        assert row.status in ("completed", "failed"), f"payment {pid} is {row.status}"
        applied = entries_per_payment.get(pid, 0)
        assert applied == (2 if row.status == "completed" else 0), f"payment {pid} has {applied} entries"
        if row.status == "completed":
            expected[buyer] -= amount
            expected[seller] += amount
    for account, balance in balances.items():
        assert balance >= 0, f"account {account} is negative: {balance}"
        assert balance == expected[account], f"account {account}: {balance} != expected {expected[account]}"
        assert balance == entry_sums.get(account, 0), f"account {account}: balance != sum of entries"
    assert sum(balances.values()) == sum(openings.values()), "money created or destroyed"
    counts = defaultdict(int)
    for row in rows.values():
        counts[row.status] += 1
    return dict(counts)
