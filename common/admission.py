"""Admission control: new payments are refused (429) while too many accepted ones are pending.

Accepting a payment (one INSERT) is cheaper than applying it, so a client sending batches as fast
as it can would grow the backlog without bound, and every payment's completion would wait behind
it: completion latency would be the backlog over the apply rate. Bounding the backlog bounds that
wait, and tells clients to slow down (Retry-After) instead of letting them pile work up.

The bound is soft: each API process reads the pending count at most every `refresh_s` and adds
what it admits itself in between, so several processes together may overshoot it by what they
admit within one refresh. A refusal is never based on a stale count: before refusing, the count
is read again if it is older than `recheck_s` (the backlog may have drained since).

A request that fits is never kept waiting for that read: once the count is `refresh_s` old, a
background thread reads it again while requests go on with the last one; only a count older
than twice that (or never read) is read in the request. Read in the request, the count was the
slow tail of acceptance at `paced`: one request in ~17 paid for it, and after a burst of batches
the count over a bloated index took 40-108 ms at times (bench/NOTES.md, 2026-12-02 late).

A request that does not fit waits for room, up to `wait_s`, before it is refused: the backlog
drains by a batch's worth every few tens of milliseconds, and a refused client sends its whole
request again (about 2 ms of the API's CPU for a batch of 100 the first time, and a request's
fixed cost each time after: a quarter of the API's CPU in the batch scenario, bench/NOTES.md
2026-12-02 evening). A waiting request holds a thread, not a database connection, so at most
`max_waiting` wait at once in a process: the others are refused at once, and the process keeps
threads for reads and for the work it admitted. Waiters reserve their room when they are
admitted, first come first admitted, so a drained backlog lets in only as many as fit, and a
new request never overtakes one that waits.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque

from sqlalchemy import text

from common.db import Database
from common.errors import Overloaded

log = logging.getLogger("wallet.admission")


class _Waiter:
    def __init__(self, count: int):
        self.count = count
        self.admitted = threading.Event()


class Admission:
    # recheck_s: while refusing, each process counts again at most this often. At 20 ms the
    # count (~1,500 index entries and their rows) was 9 % of PostgreSQL's time in the batch
    # scenario (pg_stat_statements, bench/NOTES.md 2026-12-02); the backlog at the bound is
    # ~0.3 s of the workers' work, so a count 50 ms old never leaves them idle.
    def __init__(self, db: Database, max_pending: int, refresh_s: float = 0.1,
                 recheck_s: float = 0.05, wait_s: float = 0.0, max_waiting: int = 0):
        self._db = db
        self.max_pending = max_pending  # 0: no bound
        self._refresh_s = refresh_s
        self._recheck_s = recheck_s
        self._wait_s = wait_s
        self._max_waiting = max_waiting
        self._queue: deque[_Waiter] = deque()  # first come, first admitted
        self._pending = 0
        self._read_at = -math.inf  # never read
        self._reading = threading.Lock()
        self._counting = threading.Lock()  # guards _pending and _queue; never held across I/O
        self._refresher_pid: int | None = None  # the process whose refresher thread runs
        self._refresh = threading.Event()
        self._failure_logged_at = -math.inf

    @property
    def waiting(self) -> int:
        """Requests waiting for room now."""
        return len(self._queue)

    def admit(self, count: int) -> None:
        """Counts `count` more payments in, once the backlog has room for them; raises Overloaded
        when it has none within `wait_s` (or `max_waiting` requests already wait). An empty
        backlog admits anything (a batch larger than the bound is slow, never refused)."""
        if not self.max_pending:
            return
        self._refresh_in_time()
        with self._counting:
            if not self._queue and self._take(count):
                return
        self._read(self._recheck_s)  # a refusal is never on a stale count
        with self._counting:
            if not self._queue and self._take(count):
                return
        with self._counting:
            if self._wait_s <= 0 or len(self._queue) >= self._max_waiting:
                raise self._overloaded()
            waiter = _Waiter(count)
            self._queue.append(waiter)
        deadline = time.monotonic() + self._wait_s
        while (left := deadline - time.monotonic()) > 0:
            if waiter.admitted.wait(min(left, self._recheck_s)):
                return
            self._read(self._recheck_s)  # whichever waiter reads admits what fits, in order
        with self._counting:
            if waiter.admitted.is_set():
                return
            self._queue.remove(waiter)
        raise self._overloaded()

    def _take(self, count: int) -> bool:
        """Under _counting: counts `count` in if it fits. A soft bound: the next read replaces
        this count with the database's."""
        if self._pending and self._pending + count > self.max_pending:
            return False
        self._pending += count
        return True

    def _overloaded(self) -> Overloaded:
        return Overloaded(
            f"{self._pending} payments are waiting to be applied (limit {self.max_pending}); retry shortly",
            {"pending": self._pending, "max_pending": self.max_pending})

    def _refresh_in_time(self) -> None:
        """Keep the count at most `refresh_s` old without making the request wait for it, unless
        it is older than twice that (or was never read): then it is read here."""
        age_s = time.monotonic() - self._read_at
        if age_s >= 2 * self._refresh_s:
            self._read(0)
        elif age_s >= self._refresh_s:
            self._refresh_soon()

    def _refresh_soon(self) -> None:
        if self._refresher_pid != os.getpid():  # gunicorn forks after the app is built
            with self._counting:
                if self._refresher_pid != os.getpid():
                    self._refresh = threading.Event()
                    threading.Thread(target=self._refresh_loop, args=(self._refresh,),
                                     name="wallet-admission", daemon=True).start()
                    self._refresher_pid = os.getpid()
        if not self._refresh.is_set():  # set() takes a lock and notifies, for each request
            self._refresh.set()

    def _refresh_loop(self, wake: threading.Event) -> None:
        while True:
            wake.wait()
            wake.clear()
            try:
                # Waits for a read a request thread is doing, rather than give up at once: the
                # requests would set `wake` again while it lasts, and this loop would spin on it
                # (2 % of an API process's GIL time at `uniform`, bench/NOTES.md 2026-12-03).
                self._read(self._refresh_s, wait=True)
            except Exception:  # the database is down: the requests' own statements will say so
                if time.monotonic() - self._failure_logged_at > 10:
                    self._failure_logged_at = time.monotonic()
                    log.warning("could not count the pending payments", exc_info=True)

    def _read(self, max_age_s: float, wait: bool = False) -> None:
        """Reads the count if it is `max_age_s` old. One thread reads; the others go on with the
        last value, or, with `wait`, wait for that read and read again only if it is still old."""
        if time.monotonic() - self._read_at < max_age_s or not self._reading.acquire(blocking=wait):
            return
        try:
            if time.monotonic() - self._read_at < max_age_s:
                return  # read by the thread this one waited for
            with self._db.read() as session:
                pending = session.execute(text(
                    "SELECT count(*) FROM open_payments WHERE status = 'pending'")).scalar_one()
            with self._counting:
                self._pending = pending
                while self._queue and self._take(self._queue[0].count):
                    self._queue.popleft().admitted.set()
            self._read_at = time.monotonic()
        finally:
            self._reading.release()
