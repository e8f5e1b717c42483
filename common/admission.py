"""Admission control: new payments are refused (429) while too many accepted ones are pending.

Accepting a payment (one INSERT) is cheaper than applying it, so a client sending batches as fast
as it can would grow the backlog without bound, and every payment's completion would wait behind
it: completion latency would be the backlog over the apply rate. Bounding the backlog bounds that
wait, and tells clients to slow down (Retry-After) instead of letting them pile work up.

The bound is soft: each API process reads the pending count at most every `refresh_s` and adds
what it admits itself in between, so several processes together may overshoot it by what they
admit within one refresh. A refusal is never based on a stale count: before refusing, the count
is read again if it is older than `recheck_s` (the backlog may have drained since).
"""
from __future__ import annotations

import math
import threading
import time

from sqlalchemy import text

from common.db import Database
from common.errors import Overloaded


class Admission:
    # recheck_s: while refusing, each process counts again at most this often. At 20 ms the
    # count (~1,500 index entries and their rows) was 9 % of PostgreSQL's time in the batch
    # scenario (pg_stat_statements, bench/NOTES.md 2026-12-02); the backlog at the bound is
    # ~0.3 s of the workers' work, so a count 50 ms old never leaves them idle.
    def __init__(self, db: Database, max_pending: int, refresh_s: float = 0.1,
                 recheck_s: float = 0.05):
        self._db = db
        self.max_pending = max_pending  # 0: no bound
        self._refresh_s = refresh_s
        self._recheck_s = recheck_s
        self._pending = 0
        self._read_at = -math.inf  # never read
        self._reading = threading.Lock()

    def admit(self, count: int) -> None:
        """Raises Overloaded when `count` more payments would take the backlog over the bound. An
        empty backlog admits anything (a batch larger than the bound is slow, never refused)."""
        if not self.max_pending:
            return
        self.check(count)
        self._pending += count  # racy by design: a soft bound, corrected at the next read

    def check(self, count: int) -> None:
        """`admit` without counting the payments in: raises Overloaded, or returns."""
        if not self.max_pending:
            return
        pending = self._current(self._refresh_s)
        if pending and pending + count > self.max_pending:
            pending = self._current(self._recheck_s)
        if pending and pending + count > self.max_pending:
            raise Overloaded(
                f"{pending} payments are waiting to be applied (limit {self.max_pending}); retry shortly",
                {"pending": pending, "max_pending": self.max_pending})

    def _current(self, max_age_s: float) -> int:
        if time.monotonic() - self._read_at >= max_age_s and self._reading.acquire(blocking=False):
            try:  # one thread reads; the others go on with the last value
                with self._db.read() as session:
                    self._pending = session.execute(text(
                        "SELECT count(*) FROM payments WHERE status = 'pending'")).scalar_one()
                self._read_at = time.monotonic()
            finally:
                self._reading.release()
        return self._pending
