"""Tasks: thin wrappers that run one ledger function per transaction.

Tasks take ids, never amounts: the database row is the truth, and a message seen twice finds
its payments already terminal and does nothing.
"""
from __future__ import annotations

import gc
import logging
import os
import threading
import time

from celery import Task, shared_task, signals
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, TimeoutError as PoolTimeout

from common import ledger, metrics, sweeper
from common.db import Database, is_unavailable
from common.errors import FailureCode
from common.logging import configure_logging, get_logger, log_lines
from common.messaging import APPLY_ATOMIC_BATCH, APPLY_PAYMENTS, REQUEST_ID, REQUEST_IDS, SWEEP, Sender
from common.settings import get_settings

log = logging.getLogger("wallet.worker")
payment_log = get_logger("wallet.worker")

# Before the first metric is touched: with PROMETHEUS_MULTIPROC_DIR the pool processes write
# their counters where the API's /metrics sums them.
metrics.configure(get_settings())


@signals.worker_init.connect
def _lower_priority(**_):
    # In the worker's main process, before it forks its pool: the children inherit it.
    os.nice(get_settings().worker_nice)


@signals.worker_process_init.connect
def _freeze_startup_objects(**_):
    # As gunicorn.conf.py's post_worker_init: a full garbage collection over the ~100,000 objects
    # loaded at start-up takes tens of milliseconds; frozen, they are never scanned again.
    gc.freeze()


@signals.setup_logging.connect
def _setup_logging(**_):
    # Connected, so Celery leaves the root logger to us: JSON lines like the API's.
    configure_logging(get_settings())


@signals.after_setup_task_logger.connect
@signals.after_setup_logger.connect
def _after_setup_logger(logger=None, **_):
    configure_logging(get_settings())
    if logger is not None:  # Celery may have attached a plain-text handler of its own
        for handler in [h for h in logger.handlers if h.get_name() != "wallet-json"]:
            logger.removeHandler(handler)
        logger.propagate = True

_runtime: dict[int, tuple[Database, Sender]] = {}
_runtime_lock = threading.Lock()


def runtime() -> tuple[Database, Sender]:
    """This process's database pool and sender, made after the fork (a pool must not cross one)."""
    pid = os.getpid()
    if pid not in _runtime:
        with _runtime_lock:
            if pid not in _runtime:
                from common.messaging import make_celery
                settings = get_settings()
                _runtime.clear()
                # The sweeper's publishes go through an app of their own, every wait bounded by
                # the publish timeout (the worker's app keeps a longer one for its consumer).
                _runtime[pid] = (Database(settings, pool_size=2),
                                 Sender(make_celery(settings, publisher=True), settings))
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
        except (DBAPIError, PoolTimeout) as exc:
            if isinstance(exc, DBAPIError) and not is_unavailable(exc):
                raise
            countdown = min(30, 0.5 * 2 ** min(self.request.retries, 6))
            log.warning("database unavailable, retrying in %.1fs: %s", countdown, exc.__class__.__name__)
            raise self.retry(exc=exc, countdown=countdown) from exc


@shared_task(name=APPLY_PAYMENTS, base=WalletTask, bind=True)
def apply_payments(self, payment_ids: list[int]) -> None:
    db, _ = runtime()
    limit = get_settings().apply_max_payments
    # {"<payment id>": "<request id>"} from the API's dispatcher; absent when the sweeper sent it.
    request_ids = getattr(self.request, REQUEST_IDS, None) or {}
    for start in range(0, len(payment_ids), limit):
        chunk = payment_ids[start:start + limit]
        started = time.perf_counter()
        try:
            outcomes = db.unit_of_work(lambda session: ledger.apply_payments(session, chunk))
        except Exception as exc:
            if _unavailable(exc):
                raise  # WalletTask retries the message
            # One of them (or more) cannot be applied: apply them one by one, so that the others
            # complete, and fail only what fails on its own.
            log.warning("applying %d payments failed (%s); applying them one by one",
                        len(chunk), _describe(exc))
            outcomes = [o for payment_id in chunk for o in _apply_alone(db, payment_id)]
        metrics.APPLY_LATENCY.labels(APPLY_PAYMENTS).observe(time.perf_counter() - started)
        metrics.record_outcomes(APPLY_PAYMENTS, outcomes)
        _log_outcomes(outcomes, lambda payment_id: request_ids.get(str(payment_id)))


@shared_task(name=APPLY_ATOMIC_BATCH, base=WalletTask, bind=True)
def apply_atomic_batch(self, batch_id: int) -> None:
    db, _ = runtime()
    request_id = getattr(self.request, REQUEST_ID, None)
    started = time.perf_counter()
    error = None
    for attempt in range(1, APPLY_ATTEMPTS + 1):
        try:
            outcomes = db.unit_of_work(lambda session: ledger.apply_atomic_batch(session, batch_id))
            break
        except Exception as exc:
            if _unavailable(exc):
                raise
            error = exc
            _pause(attempt)
    else:  # all or nothing: the batch fails, its culprits with internal_error
        outcomes = _fail_atomic_batch(db, batch_id, error)
    metrics.APPLY_LATENCY.labels(APPLY_ATOMIC_BATCH).observe(time.perf_counter() - started)
    metrics.record_outcomes(APPLY_ATOMIC_BATCH, outcomes)
    _log_outcomes(outcomes, lambda _: request_id, batch_id=batch_id)


# How often a payment is applied on its own before a non-retried error is taken for a property of
# the payment (then it is failed with internal_error) rather than of the moment.
APPLY_ATTEMPTS = 3


def _unavailable(exc: BaseException) -> bool:
    """PostgreSQL unreachable (or no connection free): the task retries later. Anything else that
    escapes `Database.unit_of_work` (which retries deadlocks and serialization failures itself) is an error
    that running the same transaction again does not cure."""
    return isinstance(exc, PoolTimeout) or (isinstance(exc, DBAPIError) and is_unavailable(exc))


def _describe(exc: BaseException) -> str:
    code = getattr(getattr(exc, "orig", None), "pgcode", None)
    first_line = str(getattr(exc, "orig", None) or exc).strip().splitlines()[:1]
    return f"{exc.__class__.__name__}{f' {code}' if code else ''}: {first_line[0] if first_line else ''}"[:300]


def _pause(attempt: int) -> None:
    if attempt < APPLY_ATTEMPTS:
        time.sleep(0.02 * attempt)  # backoff between attempts, not synchronisation


def _apply_alone(db: Database, payment_id: int) -> list[ledger.Outcome]:
    """One payment in a transaction of its own; after APPLY_ATTEMPTS failures, failed with
    internal_error (in another transaction, which moves no money)."""
    error = None
    for attempt in range(1, APPLY_ATTEMPTS + 1):
        try:
            return db.unit_of_work(lambda session: ledger.apply_payments(session, [payment_id]))
        except Exception as exc:
            if _unavailable(exc):
                raise
            error = exc
            _pause(attempt)
    return _fail_internal(db, {payment_id: FailureCode.INTERNAL_ERROR}, error)


def _fail_atomic_batch(db: Database, batch_id: int, error: BaseException) -> list[ledger.Outcome]:
    """Find the culprits (each pending payment of the batch applied on its own, rolled back), fail
    them with internal_error and the rest with batch_failed; if none fails on its own, it is their
    combination: all of them internal_error."""
    with db.read() as session:
        ids = [row.id for row in session.execute(text(
            "SELECT id FROM payments WHERE batch_id = :b AND status = 'pending' ORDER BY id"),
            {"b": batch_id})]
    culprits = set()
    for payment_id in ids:
        try:
            with db.read() as session:  # never committed
                ledger.apply_as_one_set(session, [payment_id])
        except Exception as exc:
            if _unavailable(exc):
                raise
            culprits.add(payment_id)
    culprits = culprits or set(ids)
    return _fail_internal(db, {i: FailureCode.INTERNAL_ERROR if i in culprits else FailureCode.BATCH_FAILED
                               for i in ids}, error, batch_id=batch_id)


def _fail_internal(db: Database, codes, error: BaseException, **fields) -> list[ledger.Outcome]:
    try:
        outcomes = db.unit_of_work(lambda session: ledger.fail_payments(session, codes))
    except Exception as exc:
        if _unavailable(exc):
            raise
        # Even failing it raises (a trigger on its row?): it stays pending, the others are done,
        # and the sweeper brings it back.
        for payment_id in codes:
            payment_log.error("payment cannot be applied nor failed; it stays pending", extra={
                "payment_id": payment_id, "error": _describe(error), "fail_error": _describe(exc), **fields})
        return []
    for o in outcomes:
        if o.failure_code is FailureCode.INTERNAL_ERROR:
            payment_log.error("payment cannot be applied; failed with internal_error", extra={
                "payment_id": o.payment_id, "error": _describe(error), "attempts": APPLY_ATTEMPTS,
                **fields})
    return outcomes


@shared_task(name=SWEEP, base=WalletTask, bind=True)
def sweep(self) -> None:
    db, sender = runtime()
    swept = sweeper.sweep(db, sender, get_settings().sweep_after_seconds)
    metrics.record_sweep_run(time.time())
    if swept:
        log.info("re-enqueued %d pending payments", swept)
    expired = sweeper.expire(db)
    if expired:
        log.info("canceled %d expired authorizations", expired)
    sweeper.vacuum_open_payments(db)


def _log_outcomes(outcomes: list[ledger.Outcome], request_id_of, **fields) -> None:
    """One JSON line per applied payment, with the id of the request that submitted it."""
    log_lines(payment_log, logging.INFO, "payment applied", [
        {"payment_id": o.payment_id, "status": o.status,
         "failure_code": o.failure_code and str(o.failure_code),
         "request_id": request_id_of(o.payment_id), **fields} for o in outcomes])
