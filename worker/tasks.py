"""Tasks: thin wrappers that run one ledger function per transaction.

Tasks take ids, never amounts: the database row is the truth, and a message seen twice finds
its payments already terminal and does nothing.
"""
from __future__ import annotations

import logging
import os
import threading

from celery import Task, shared_task
from sqlalchemy.exc import DBAPIError

from common import ledger, sweeper
from common.db import Database, is_unavailable
from common.messaging import APPLY_ATOMIC_BATCH, APPLY_PAYMENTS, SWEEP, Sender
from common.settings import get_settings

log = logging.getLogger("wallet.worker")

_runtime: dict[int, tuple[Database, Sender]] = {}
_runtime_lock = threading.Lock()


def runtime() -> tuple[Database, Sender]:
    """This process's database pool and sender, made after the fork (a pool must not cross one)."""
    pid = os.getpid()
    if pid not in _runtime:
        with _runtime_lock:
            if pid not in _runtime:
                from worker import app
                settings = get_settings()
                _runtime.clear()
                _runtime[pid] = (Database(settings, pool_size=2), Sender(app, settings))
    return _runtime[pid]


class WalletTask(Task):
    """Retries while PostgreSQL is unreachable, with capped exponential backoff.

    The cap stays far below the Redis visibility timeout: a retry scheduled beyond it would run
    twice (harmless here, but wasteful).
    """

    abstract = True
    max_retries = None

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except DBAPIError as exc:
            if not is_unavailable(exc):
                raise
            countdown = min(30, 0.5 * 2 ** min(self.request.retries, 6))
            log.warning("database unavailable, retrying in %.1fs: %s", countdown, exc.__class__.__name__)
            raise self.retry(exc=exc, countdown=countdown)


@shared_task(name=APPLY_PAYMENTS, base=WalletTask, bind=True)
def apply_payments(self, payment_ids: list[int]) -> None:
    db, _ = runtime()
    limit = get_settings().apply_max_payments
    for start in range(0, len(payment_ids), limit):
        chunk = payment_ids[start:start + limit]
        outcomes = db.run(lambda session: ledger.apply_payments(session, chunk))
        _log_outcomes(outcomes)


@shared_task(name=APPLY_ATOMIC_BATCH, base=WalletTask, bind=True)
def apply_atomic_batch(self, batch_id: int) -> None:
    db, _ = runtime()
    _log_outcomes(db.run(lambda session: ledger.apply_atomic_batch(session, batch_id)))


@shared_task(name=SWEEP, base=WalletTask, bind=True)
def sweep(self) -> None:
    db, sender = runtime()
    swept = sweeper.sweep(db, sender, get_settings().sweep_after_seconds)
    if swept:
        log.info("re-enqueued %d pending payments", swept)


def _log_outcomes(outcomes: list[ledger.Outcome]) -> None:
    for o in outcomes:
        log.info("payment %s %s%s", o.payment_id, o.status,
                 f" ({o.failure_code})" if o.failure_code else "")
