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


def check(db, openings: dict[int, Decimal], accepted: dict[int, tuple[int, int, Decimal]],
          captured: dict[int, Decimal] | None = None, statuses=("completed", "failed")) -> dict:
    """openings: account id -> opening amount; accepted: payment id -> (buyer, seller, amount) as
    the clients sent them; captured: payment id -> the amount a client's capture moved (SPEC 9;
    absent: the whole amount). Asserts invariants 1-4 and, for holds, that `held` is the sum of
    the authorized amounts and `available` never negative; a completed payment moves its
    captured amount in two entries, any other none. Returns the counts by status."""
    captured = captured or {}
    ids = list(accepted)
    with db.read() as s:
        rows = {r.id: r for r in s.execute(text(
            "SELECT id, status, buyer_account_id, seller_account_id, amount, amount_captured FROM payments"
            " WHERE id = ANY(:ids)"), {"ids": ids})}
        accounts = {r.id: r for r in s.execute(text(
            "SELECT id, balance, held FROM accounts WHERE id = ANY(:ids)"), {"ids": list(openings)})}
        entry_sums = dict(s.execute(text(
            "SELECT account_id, sum(amount) FROM ledger_entries WHERE account_id = ANY(:ids)"
            " GROUP BY account_id"), {"ids": list(openings)}).all())
        entries_per_payment = {r.payment_id: r for r in s.execute(text(
            "SELECT payment_id, count(*) AS n, sum(amount) AS total,"
            " coalesce(sum(amount) FILTER (WHERE amount > 0), 0) AS moved FROM ledger_entries"
            " WHERE payment_id = ANY(:ids) GROUP BY payment_id"), {"ids": ids})}

    assert set(rows) == set(ids), "an accepted payment is missing from the database"
    expected = dict(openings)
    held = defaultdict(Decimal)
    for pid, (buyer, seller, amount) in accepted.items():
        row = rows[pid]
        assert (row.buyer_account_id, row.seller_account_id, row.amount) == (buyer, seller, amount)
        assert row.status in statuses, f"payment {pid} is {row.status}"
        entries = entries_per_payment.get(pid)
        applied = entries.n if entries else 0
        assert applied == (2 if row.status == "completed" else 0), f"payment {pid} has {applied} entries"
        if row.status == "completed":
            moved = captured.get(pid, amount)
            assert row.amount_captured == moved, f"payment {pid} captured {row.amount_captured}, not {moved}"
            assert (entries.total, entries.moved) == (0, moved), f"payment {pid}: entries {entries}"
            expected[buyer] -= moved
            expected[seller] += moved
        else:
            assert row.amount_captured is None, f"payment {pid} is {row.status} but captured {row.amount_captured}"
        if row.status == "authorized":
            held[buyer] += amount
    for account, a in accounts.items():
        assert a.balance >= 0, f"account {account} is negative: {a.balance}"
        assert a.balance == expected[account], f"account {account}: {a.balance} != expected {expected[account]}"
        assert a.balance == entry_sums.get(account, 0), f"account {account}: balance != sum of entries"
        assert a.held == held[account], f"account {account}: held {a.held}, authorized {held[account]}"
        assert a.balance - a.held >= 0, f"account {account}: available {a.balance - a.held}"
    assert sum(a.balance for a in accounts.values()) == sum(openings.values()), "money created or destroyed"
    counts = defaultdict(int)
    for row in rows.values():
        counts[row.status] += 1
    return dict(counts)
