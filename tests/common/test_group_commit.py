"""Group commit (common.group_commit) with real threads: who runs alone, who shares a run, and
that nobody is left waiting whatever a run does."""
from __future__ import annotations

import threading
from decimal import Decimal

import pytest
from sqlalchemy import text

from common import ledger
from common.errors import InvalidAmount, UnknownAccount
from common.group_commit import GroupCommit
from scripts.procs import wait_until


class Gate:
    """A run that records its groups and holds the first one until released, so that the threads
    submitting meanwhile are certain to queue behind it."""

    def __init__(self, fail_on: int | None = None, short: bool = False):
        self.groups: list[list[int]] = []
        self.first_started = threading.Event()
        self.release = threading.Event()
        self.fail_on = fail_on  # raise for the group holding this item
        self.short = short  # answer one result too few

    def __call__(self, items):
        self.groups.append(list(items))
        if len(self.groups) == 1:
            self.first_started.set()
            assert self.release.wait(10)
        if self.fail_on in items:
            raise ValueError(f"refused {self.fail_on}")
        results = [item * 10 for item in items]
        return results[:-1] if self.short else results


def submit_in_thread(commit: GroupCommit, item: int, outcomes: dict):
    def go():
        try:
            outcomes[item] = commit.submit(item)
        except Exception as exc:  # noqa: BLE001 - recorded for the assertions
            outcomes[item] = exc
    thread = threading.Thread(target=go)
    thread.start()
    return thread


def queue_behind_first(commit: GroupCommit, gate: Gate, items: list[int]) -> tuple[dict, list[threading.Thread]]:
    """Item 1 runs (held by the gate); `items` queue behind it, in this order; then release."""
    outcomes: dict = {}
    threads = [submit_in_thread(commit, 1, outcomes)]
    assert gate.first_started.wait(10)
    for n, item in enumerate(items, start=1):
        threads.append(submit_in_thread(commit, item, outcomes))
        wait_until(lambda: commit.waiting == n, 10, f"{n} waiting")
    gate.release.set()
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()
    return outcomes, threads


def test_a_submit_with_nothing_running_runs_alone_at_once():
    gate = Gate()
    gate.release.set()
    commit = GroupCommit(gate, max_items=8)
    assert commit.submit(3) == 30
    assert commit.submit(4) == 40
    assert gate.groups == [[3], [4]]


@pytest.mark.parametrize("max_items, groups", [
    (8, [[1], [2, 3, 4, 5]]),
    (2, [[1], [2, 3], [4, 5]]),
    (1, [[1], [2], [3], [4], [5]]),
])
def test_those_waiting_behind_a_run_share_the_next_one(max_items, groups):
    gate = Gate()
    sizes = []
    commit = GroupCommit(gate, max_items=max_items, on_group=sizes.append)
    outcomes, _ = queue_behind_first(commit, gate, [2, 3, 4, 5])
    assert gate.groups == groups
    assert outcomes == {item: item * 10 for item in range(1, 6)}
    assert sizes == [len(g) for g in groups]
    assert commit.waiting == 0


def test_a_failed_run_raises_in_each_of_its_threads_only_and_the_next_runs():
    gate = Gate(fail_on=4)
    commit = GroupCommit(gate, max_items=2)
    outcomes, _ = queue_behind_first(commit, gate, [2, 3, 4, 5])
    assert gate.groups == [[1], [2, 3], [4, 5]]
    assert outcomes[1] == 10 and outcomes[2] == 20 and outcomes[3] == 30
    for item in (4, 5):
        assert isinstance(outcomes[item], ValueError) and str(outcomes[item]) == "refused 4"
    assert outcomes[4] is not outcomes[5]  # each thread raises an exception of its own
    assert commit.submit(6) == 60  # nothing is left marked running


def test_a_run_answering_the_wrong_number_of_results_fails_its_group():
    gate = Gate(short=True)
    gate.release.set()
    commit = GroupCommit(gate, max_items=4)
    with pytest.raises(AssertionError, match="a group of 1 got 0 results"):
        commit.submit(1)


def test_max_items_must_be_positive():
    with pytest.raises(ValueError):
        GroupCommit(lambda items: items, max_items=0)


# The accepting INSERT of single payments (common.ledger.accepting), on the real PostgreSQL: an
# open transaction holding `payments` in EXCLUSIVE mode stops the first INSERT, so the payments
# submitted meanwhile are certain to share the next one.

def _accounts(db):
    def setup(s):
        currencies = ledger.Currencies.load(s)
        ids = [ledger.create_account(s, currencies.by_id[1], f"g{i}", Decimal("10")) for i in range(6)]
        return currencies, ids
    return db.unit_of_work(setup)


def _accept_behind_a_lock(db, requests):
    """The first request's INSERT waits for a lock on `payments`; the others queue behind it.
    Returns each request's outcome (row or exception), in order."""

    with db.read() as s:
        currencies = ledger.Currencies.load(s)
    together = ledger.single_inserts(db, 32)
    outcomes: dict = {}

    def accept(n, req):
        try:
            outcomes[n] = ledger.accept_payment(db, currencies, req, together=together)[0]
        except Exception as exc:  # noqa: BLE001 - recorded for the assertions
            outcomes[n] = exc

    with db.engine.connect() as blocker:
        blocker.begin()
        blocker.execute(text("LOCK TABLE payments IN EXCLUSIVE MODE"))
        threads = [threading.Thread(target=accept, args=(0, requests[0]))]
        threads[0].start()
        wait_until(lambda: _inserts_waiting_for_a_lock(db) == 1, 10, "the first INSERT waiting")
        for n, req in enumerate(requests[1:], start=1):
            threads.append(threading.Thread(target=accept, args=(n, req)))
            threads[-1].start()
        wait_until(lambda: together.waiting == len(requests) - 1, 10, "the rest queued")
        blocker.rollback()
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()
    return [outcomes[n] for n in range(len(requests))]


def _inserts_waiting_for_a_lock(db) -> int:
    # PREPARE (a connection's first) or EXECUTE. A transaction of its own: pg_stat_activity is
    # read once per transaction.
    with db.read() as s:
        return s.execute(text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                              " AND query LIKE '% wallet_insert_payments %'")).scalar_one()


def _transactions(db, rows):
    with db.read() as s:
        return dict(s.execute(text("SELECT id, xmin::text FROM payments WHERE id = ANY(:ids)"),
                              {"ids": [r["id"] for r in rows]}).all())


def test_single_payments_queued_behind_an_insert_share_the_next_one(db):
    _, ids = _accounts(db)
    requests = [ledger.PaymentRequest(ids[i], ids[i + 1], f"0.0{i + 1}") for i in range(5)]
    rows = _accept_behind_a_lock(db, requests)
    for req, row in zip(requests, rows):
        assert row["status"] == "pending"
        assert (row["buyer_account_id"], row["seller_account_id"], row["amount"]) == (
            req.buyer_account_id, req.seller_account_id, Decimal(req.amount_raw))
    xmin = _transactions(db, rows)
    assert len(xmin) == 5
    # The first alone; the four that queued in one transaction (one INSERT, one commit).
    assert xmin[rows[0]["id"]] not in {xmin[r["id"]] for r in rows[1:]}
    assert len({xmin[r["id"]] for r in rows[1:]}) == 1
    assert len({r["created_at"] for r in rows[1:]}) == 1


def test_a_refused_payment_in_a_group_answers_for_itself_only(db):
    _, ids = _accounts(db)
    requests = [ledger.PaymentRequest(ids[0], ids[1], "1"),
                ledger.PaymentRequest(ids[1], ids[2], "2"),
                ledger.PaymentRequest(ids[2], 10**15, "3"),  # no such seller
                ledger.PaymentRequest(ids[3], ids[4], "4.001"),  # past USD's scale (the INSERT's check)
                ledger.PaymentRequest(ids[4], ids[5], "5")]
    outcomes = _accept_behind_a_lock(db, requests)
    assert isinstance(outcomes[2], UnknownAccount) and isinstance(outcomes[3], InvalidAmount)
    accepted = [outcomes[n] for n in (0, 1, 4)]
    assert [r["amount"] for r in accepted] == [1, 2, 5]
    xmin = _transactions(db, accepted)
    assert len(set(xmin.values())) == 3  # the group refused as a whole; each inserted again alone
    with db.read() as s:
            assert s.execute(text("SELECT count(*) FROM payments WHERE buyer_account_id = ANY(:a)"),
                         {"a": ids}).scalar_one() == 3
