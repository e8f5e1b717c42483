"""Webhook tasks, on the `webhooks` queue (common.messaging): fan-out (beat, every
WALLET_WEBHOOK_FANOUT_INTERVAL_SECONDS; it also re-sends lost deliveries) and delivery.

A delivery task hands its ids to this process's delivery threads (WALLET_WEBHOOK_THREADS) and
returns at once: an HTTP attempt may take up to the timeout (10 s), and a pool process waiting on
a slow receiver would be one fewer applying payments when one worker consumes every queue. The
threads are the deliveries' own concurrency; to give them their own processes too, run a worker
with `-Q webhooks` (README). What a dying process had in hand is in the rows: the sweeper sends
it again once its lease has run out.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from celery import shared_task

from common import webhooks
from common.db import Database
from common.messaging import DELIVER_WEBHOOKS, WEBHOOK_FANOUT, WEBHOOK_QUEUE
from common.settings import get_settings
from worker.tasks import WalletTask

log = logging.getLogger("wallet.worker")


def send(delivery_ids: Sequence[int], countdown: float | None) -> None:
    from worker import app
    app.send_task(DELIVER_WEBHOOKS, args=[list(delivery_ids)], queue=WEBHOOK_QUEUE,
                  countdown=countdown, retry_policy={"max_retries": 2, "interval_start": 0,
                                                     "interval_step": 0.2, "interval_max": 0.5})


class Deliveries:
    """This process's delivery threads, with a bounded backlog: beyond it, ids are left to the
    sweeper rather than held in memory."""

    def __init__(self):
        self.settings = get_settings()
        threads = self.settings.webhook_threads
        self.db = Database(self.settings, pool_size=min(threads, 4))
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="wallet-webhook")
        self._slots = threading.BoundedSemaphore(threads * 4)

    def submit(self, delivery_id: int) -> bool:
        if not self._slots.acquire(blocking=False):
            return False
        self._executor.submit(self._run, delivery_id)
        return True

    def _run(self, delivery_id: int) -> None:
        try:
            webhooks.attempt(self.db, self.settings, delivery_id, send)
        except Exception:  # the row is the record: its lease runs out and the sweeper resends it
            log.exception("webhook delivery %s failed unexpectedly", delivery_id)
        finally:
            self._slots.release()


_deliveries: dict[int, Deliveries] = {}
_lock = threading.Lock()


def deliveries() -> Deliveries:
    pid = os.getpid()  # made after the fork: threads and pools do not cross one
    if pid not in _deliveries:
        with _lock:
            if pid not in _deliveries:
                _deliveries.clear()
                _deliveries[pid] = Deliveries()
    return _deliveries[pid]


@shared_task(name=DELIVER_WEBHOOKS, base=WalletTask, bind=True)
def deliver(self, delivery_ids: list[int]) -> int:
    pool = deliveries()
    left = [i for i in delivery_ids if not pool.submit(i)]
    if left:
        log.warning("delivery threads busy: %d deliveries left to the sweeper", len(left))
    return len(delivery_ids) - len(left)


@shared_task(name=WEBHOOK_FANOUT, base=WalletTask, bind=True)
def fanout(self) -> None:
    db = deliveries().db
    made = webhooks.fanout(db, send)
    resent = webhooks.sweep_deliveries(db, send, get_settings().sweep_after_seconds)
    if made or resent:
        log.info("webhooks: %d deliveries made, %d sent again", made, resent)
