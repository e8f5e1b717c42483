"""Admission control against a real PostgreSQL of its own (it counts every pending payment)."""
from __future__ import annotations

import threading
import time
from decimal import Decimal

import pytest
from sqlalchemy import text

from common import ledger
from common.admission import Admission
from common.db import Database
from common.errors import Overloaded
from tests.conftest import make_settings


@pytest.fixture
def own_db(fresh_database_url, broker_url):
    database = Database(make_settings(fresh_database_url, broker_url))
    yield database
    database.dispose()


def make_pending(db: Database, count: int) -> None:
    def setup(s):
        currencies = ledger.Currencies.load(s)
        usd = currencies.by_id[1]
        a = ledger.create_account(s, usd, "a", Decimal("100"))
        b = ledger.create_account(s, usd, "b", Decimal("0"))
        ledger.submit_payments(s, currencies, [ledger.PaymentRequest(a, b, "1")] * count)
    db.unit_of_work(setup)


def test_no_bound_admits_anything(own_db):
    make_pending(own_db, 5)
    Admission(own_db, max_pending=0).admit(10_000)


def test_an_empty_backlog_admits_even_more_than_the_bound(own_db):
    Admission(own_db, max_pending=3, refresh_s=0).admit(10)


def test_refuses_what_would_take_the_backlog_over_the_bound(own_db):
    make_pending(own_db, 3)
    admission = Admission(own_db, max_pending=4, refresh_s=0)
    admission.admit(1)  # 3 + 1 <= 4
    with pytest.raises(Overloaded) as caught:
        admission.admit(2)  # 3 + 2 > 4
    assert caught.value.details == {"pending": 3, "max_pending": 4}


def test_counts_what_it_admitted_between_reads(own_db):
    make_pending(own_db, 2)
    admission = Admission(own_db, max_pending=4, refresh_s=3600)
    admission.admit(1)  # reads 2, admits: 3 by its own count
    admission.admit(1)  # 4
    with pytest.raises(Overloaded):
        admission.admit(1)  # nothing was inserted, but this process admitted 2 since it read


def test_rereads_before_refusing(own_db):
    make_pending(own_db, 3)
    admission = Admission(own_db, max_pending=4, refresh_s=3600, recheck_s=0)
    admission.admit(1)  # reads 3: 4 by its own count, which admitting one more would exceed
    def drain(s):  # the backlog drains
        s.execute(text("UPDATE payments SET status = 'completed', amount_captured = amount,"
                       " completed_at = now()"))
    own_db.unit_of_work(drain)
    admission.admit(1)  # about to refuse on its stale count, it reads again: 0 pending


def test_a_request_that_fits_does_not_wait_for_the_recount(own_db):
    # Once the count is refresh_s old, it is read again in the background: the request that
    # fits goes on with the last count (read in the request, that read was acceptance's slow tail).
    make_pending(own_db, 1)
    admission = Admission(own_db, max_pending=100, refresh_s=2.0)
    admission.admit(1)  # never read: read in the request
    read_at = admission._read_at
    locker = own_db.engine.connect()
    tx = locker.begin()
    locker.execute(text("LOCK TABLE payments IN ACCESS EXCLUSIVE MODE"))  # a recount now waits
    try:
        _until(lambda: time.monotonic() - read_at >= 2.0)  # refresh_s old, not yet twice that
        thread, outcome = _admit_in_thread(admission, 1)
        thread.join(5)
        assert outcome == ["admitted"], "the request waited for the recount"
        assert admission._read_at == read_at  # the recount it started is still waiting
    finally:
        tx.rollback()
        locker.close()
    _until(lambda: admission._read_at > read_at)  # and counts once the table is free


def test_a_count_twice_refresh_old_is_read_in_the_request(own_db):
    admission = Admission(own_db, max_pending=4, refresh_s=0.05)
    admission.admit(1)  # reads 0
    make_pending(own_db, 4)
    _until(lambda: time.monotonic() - admission._read_at >= 0.1)
    with pytest.raises(Overloaded):
        admission.admit(1)  # reads 4 pending first: refused on it


def test_the_recount_thread_waits_for_a_read_in_a_request_rather_than_spin(own_db):
    """While a request thread reads the count, the other requests keep waking the recount thread;
    it must wait for that read, not loop on every wake-up (it did: 2 % of an API process's GIL
    time at `uniform`), and count once the read is done if the count is still old."""
    admission = Admission(own_db, max_pending=10**6, refresh_s=0.05)
    admission.admit(1)  # never read: read in the request
    admission._reading.acquire()  # a request thread's read, in progress
    try:
        _until(lambda: time.monotonic() - admission._read_at >= 0.05)
        admission.admit(1)  # starts the recount thread and wakes it
        read_at, wake = admission._read_at, admission._refresh
        _until(lambda: not wake.is_set() or admission._reading.locked())  # it has woken once
        wakeups = []
        clear = wake.clear
        wake.clear = lambda: (wakeups.append(1), clear())
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            admission.admit(1)
        assert len(wakeups) <= 1, f"the recount thread looped {len(wakeups)} times"
    finally:
        admission._reading.release()
    _until(lambda: admission._read_at > read_at)  # it counts once the other read is done


def _admit_in_thread(admission: Admission, count: int):
    """admission.admit(count) in a thread; returns (thread, outcome list: "admitted" or the error)."""
    outcome = []

    def run():
        try:
            admission.admit(count)
            outcome.append("admitted")
        except Overloaded as exc:
            outcome.append(exc)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def _until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def _drain(db: Database) -> None:
    db.unit_of_work(lambda s: s.execute(text(
        "UPDATE payments SET status = 'completed', amount_captured = amount, completed_at = now()")))


def test_waits_for_room_and_is_admitted_when_the_backlog_drains(own_db):
    make_pending(own_db, 4)
    admission = Admission(own_db, max_pending=4, refresh_s=0, recheck_s=0.01, wait_s=60, max_waiting=1)
    thread, outcome = _admit_in_thread(admission, 1)
    _until(lambda: admission.waiting == 1)
    assert outcome == []  # still waiting: the backlog is full
    _drain(own_db)
    thread.join(timeout=30)
    assert outcome == ["admitted"] and admission.waiting == 0


def test_refused_when_no_room_comes_in_time(own_db):
    make_pending(own_db, 4)
    admission = Admission(own_db, max_pending=4, refresh_s=0, recheck_s=0.01, wait_s=0.05, max_waiting=1)
    with pytest.raises(Overloaded) as caught:
        admission.admit(1)
    assert caught.value.details == {"pending": 4, "max_pending": 4} and admission.waiting == 0


def test_beyond_max_waiting_a_request_is_refused_at_once(own_db):
    """While `max_waiting` requests wait, the next is refused without waiting (its wait would be
    a minute here), and the waiter still gets in once the backlog drains."""
    make_pending(own_db, 4)
    admission = Admission(own_db, max_pending=4, refresh_s=0, recheck_s=0.01, wait_s=60, max_waiting=1)
    thread, outcome = _admit_in_thread(admission, 1)
    _until(lambda: admission.waiting == 1)
    with pytest.raises(Overloaded):
        admission.admit(1)
    assert admission.waiting == 1 and outcome == []
    _drain(own_db)
    thread.join(timeout=30)
    assert outcome == ["admitted"]


def test_no_wait_refuses_at_once(own_db):
    make_pending(own_db, 4)
    admission = Admission(own_db, max_pending=4, refresh_s=0, wait_s=0, max_waiting=8)
    with pytest.raises(Overloaded):
        admission.admit(1)
    assert admission.waiting == 0


def test_waiters_are_admitted_first_come_first_served_and_only_as_many_as_fit(own_db):
    """Three wait (3, then 2, then 1 payments) behind a full backlog of 4. One read that finds it
    drained admits the first, and the second only if both fit under the bound (3 + 2 > 4): the
    third, which would fit, does not overtake the second."""
    make_pending(own_db, 4)
    # recheck_s of an hour: no waiter reads the count again; the test makes the one read.
    admission = Admission(own_db, max_pending=4, refresh_s=0, recheck_s=3600, wait_s=60, max_waiting=3)
    waiters = []
    for count in (3, 2, 1):
        waiters.append(_admit_in_thread(admission, count))
        _until(lambda: admission.waiting == len(waiters))
    _drain(own_db)
    admission._read(0)
    (first, first_outcome), (_, second_outcome), (_, third_outcome) = waiters
    first.join(timeout=30)
    assert first_outcome == ["admitted"]
    assert second_outcome == [] and third_outcome == [] and admission.waiting == 2
    admission.max_pending = 1000  # room for all: the next read lets the other two in
    admission._read(0)
    for thread, outcome in waiters[1:]:
        thread.join(timeout=30)
        assert outcome == ["admitted"]
