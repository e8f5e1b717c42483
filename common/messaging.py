"""The Celery application's configuration and the sending side of the payment queues.

Both the API (which sends) and the worker (which consumes) build their Celery app here, so the
queue layout and task names cannot drift apart. Messages carry payment ids only, and are sent
only after the rows they name are committed: PostgreSQL, not Redis, is the record of a payment.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

from celery import Celery
from kombu import Exchange, Queue

from common import routing
from common.logging import current_request_id
from common.settings import Settings

log = logging.getLogger(__name__)

APPLY_PAYMENTS = "wallet.apply_payments"
APPLY_ATOMIC_BATCH = "wallet.apply_atomic_batch"
SWEEP = "wallet.sweep"
DEFAULT_QUEUE = "wallet"
# Webhooks (worker/webhooks.py): a queue of their own, so a slow receiver never delays payments.
WEBHOOK_QUEUE = "webhooks"
DELIVER_WEBHOOKS = "wallet.webhooks.deliver"
WEBHOOK_FANOUT = "wallet.webhooks.fanout"

# Message headers carrying request ids into the worker's log lines. The dispatcher puts payments
# of many requests into one message, so a message maps each payment id to its request id
# (REQUEST_IDS, {"<payment id>": "<request id>"}); an atomic batch's message carries the one
# request id (REQUEST_ID). Messages sent by the sweeper carry none.
REQUEST_IDS = "wallet_request_ids"
REQUEST_ID = "wallet_request_id"

# A publish that cannot reach the broker gives up quickly: the payment row is committed and the
# sweeper will send it, so blocking the dispatcher (or the sweeper) for long buys nothing. Each
# attempt waits at most Settings.publish_timeout_ms (socket timeouts below); one retry, at once.
PUBLISH_RETRY = {"max_retries": 1, "interval_start": 0, "interval_step": 0, "interval_max": 0}
# The consumer's BRPOP waits up to 1 s for a message (kombu's brpop_timeout); a socket timeout on
# the worker's own connection must stay above it.
CONSUMER_SOCKET_TIMEOUT_S = 2.0


def make_celery(settings: Settings, *, publisher: bool = False) -> Celery:
    """The Celery app. `publisher=True`: an app that only sends (the API's, the sweeper's), whose
    every network wait is bounded by the publish timeout; it is not made the current app."""
    app = Celery("wallet", broker=settings.broker_url, set_as_current=not publisher)
    timeout_s = settings.publish_timeout_ms / 1000
    # Each queue is bound with its own routing key (a Queue without one would be bound with the
    # default key, and one publish would reach every queue).
    exchange = Exchange("payments", type="direct")
    payment_queues = [Queue(routing.queue_name(k), exchange, routing_key=routing.queue_name(k))
                      for k in range(settings.queues)]
    # Explicit socket timeouts: without them a broker that accepts connections and never answers
    # holds a publish forever (kombu's and redis-py's defaults wait without limit).
    socket_timeout = timeout_s if publisher else max(timeout_s, CONSUMER_SOCKET_TIMEOUT_S)
    transport_options = {"visibility_timeout": 3600, "socket_timeout": socket_timeout,
                         "socket_connect_timeout": timeout_s}
    if settings.broker_url.startswith("amqp"):
        # Without publisher confirms RabbitMQ drops a publish silently during a resource alarm.
        transport_options = {"confirm_publish": True, "read_timeout": socket_timeout,
                             "write_timeout": socket_timeout}
    app.conf.update(
        task_queues=[Queue(DEFAULT_QUEUE, Exchange(DEFAULT_QUEUE, type="direct"),
                           routing_key=DEFAULT_QUEUE), *payment_queues,
                     Queue(WEBHOOK_QUEUE, Exchange(WEBHOOK_QUEUE, type="direct"), routing_key=WEBHOOK_QUEUE)],
        task_routes={DELIVER_WEBHOOKS: {"queue": WEBHOOK_QUEUE}, WEBHOOK_FANOUT: {"queue": WEBHOOK_QUEUE}},
        task_default_queue=DEFAULT_QUEUE,
        task_default_exchange=DEFAULT_QUEUE,
        task_default_routing_key=DEFAULT_QUEUE,
        task_create_missing_queues=False,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        # A message is acknowledged only once its transaction has committed; a worker process
        # killed mid-task has its message delivered again. Applying is idempotent, so that is safe.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # Short tasks: prefetch little, so a dead worker strands few messages (the sweeper brings
        # them back from PostgreSQL in seconds rather than after the visibility timeout).
        worker_prefetch_multiplier=4,
        worker_concurrency=settings.worker_concurrency,
        task_time_limit=120,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=timeout_s if publisher else 3,
        task_publish_retry_policy=PUBLISH_RETRY,
        worker_hijack_root_logger=False,
        beat_schedule={
            "sweep-pending-payments": {
                "task": SWEEP,
                "schedule": settings.sweep_interval_seconds,
                "options": {"queue": DEFAULT_QUEUE, "expires": settings.sweep_interval_seconds * 5},
            },
            "webhook-fanout": {  # also re-sends lost deliveries
                "task": WEBHOOK_FANOUT,
                "schedule": settings.webhook_fanout_interval_seconds,
                "options": {"queue": WEBHOOK_QUEUE, "expires": settings.webhook_fanout_interval_seconds * 5},
            },
        },
    )
    return app


# What Flower and the workers' logs show of a message's arguments, as Celery's own would look:
# Celery builds it with saferepr (pure Python, element by element, up to 1,024 characters), which
# for a list of ids is plain repr, done in C.
ARGSREPR_MAX_CHARS = 1024


def _ids_repr(args: list[list[int]]) -> str:
    text = repr(args)
    return text if len(text) <= ARGSREPR_MAX_CHARS else text[:ARGSREPR_MAX_CHARS - 3] + "..."


class Sender:
    """Sends payment ids to their queues, one message per queue touched, and atomic batches, with
    Celery's `send_task`. Give it a publisher app (`make_celery(settings, publisher=True)`): every
    publish is bounded.

    A hand-written LPUSH of Celery's message format (RedisPublisher, ~0.1 ms of CPU against ~0.5
    ms for send_task) was measured against send_task behind the dispatcher and lost: the
    dispatcher sends few messages under load, and in both A/B pairs (bench/NOTES.md) the system
    with it did worse. One format, Celery's own, for every broker."""

    def __init__(self, celery: Celery, settings: Settings):
        self._celery = celery
        self._queues = settings.queues

    def send_payments(self, payments: Iterable[tuple[int, int, int]],
                      request_ids: Mapping[int, str] | None = None) -> int:
        """payments: (id, buyer, seller) already committed; request_ids: payment id -> the id of
        the request that made it (for the worker's logs). Returns the number of messages. Raises
        at the first publish that fails (the rest is the sweeper's)."""
        by_queue: dict[int, list[int]] = defaultdict(list)
        for payment_id, buyer, seller in payments:
            by_queue[routing.queue_index(buyer, seller, self._queues)].append(payment_id)
        for index, ids in by_queue.items():
            headers = None
            if request_ids:
                headers = {REQUEST_IDS: {str(i): request_ids[i] for i in ids if i in request_ids}}
            args = [sorted(ids)]
            self._celery.send_task(APPLY_PAYMENTS, args=args, headers=headers, argsrepr=_ids_repr(args),
                                   queue=routing.queue_name(index), retry_policy=PUBLISH_RETRY)
        return len(by_queue)

    def send_atomic_batch(self, batch_id: int, request_id: str | None = None) -> None:
        index = routing.batch_queue_index(batch_id, self._queues)
        request_id = request_id or current_request_id()
        self._celery.send_task(APPLY_ATOMIC_BATCH, args=[batch_id],
                               headers={REQUEST_ID: request_id} if request_id else None,
                               queue=routing.queue_name(index), retry_policy=PUBLISH_RETRY)


class Dispatcher:
    """Gathers committed payments of many requests into few messages, from a background thread,
    but only while there is load (SPEC section 12).

    Idle (no send in the last `window_ms`): the first payment wakes the thread, which sends it at
    once. Under load (a send less than a window ago, or one in progress): what arrives is gathered
    until a window has passed since the last send began, then everything gathered goes, one
    message per queue touched (split at `max_ids`). So a quiet system answers in milliseconds,
    and a busy one sends at most one message per queue per window, each carrying many payments
    (a Celery message costs about a millisecond of CPU to send and another to consume, more than
    applying a payment). Submitting only appends to a list: waking the thread for every payment
    would hand the GIL back and forth for each request. What is lost here (a crash, a broker
    outage) is still `pending` in PostgreSQL, and the sweeper sends it again.
    """

    def __init__(self, sender: Sender, window_ms: float, max_ids: int = 500,
                 max_held: int = 20_000):
        self._sender = sender
        self._window_s = window_ms / 1000
        self._max_ids = max_ids
        # What it holds unsent (gathered, or taken by a send in progress) is at most this many
        # payments and atomic batches; beyond, new ones are left to the sweeper. A broker that
        # hangs holds each send for its publish timeout, so without a cap the list would be
        # bounded only by admission control.
        self._max_held = max_held
        self._lock = threading.Lock()
        self._pending: list[tuple[tuple[int, int, int], str | None]] = []
        self._batches: list[tuple[int, str | None]] = []
        self._in_flight = 0
        self.dropped = 0  # payments and batches left to the sweeper because the cap was reached
        self._dropped_logged_at = -math.inf
        self._wake = threading.Event()
        self._pid: int | None = None

    def held(self) -> int:
        return len(self._pending) + len(self._batches) + self._in_flight

    def submit(self, payments: Sequence[tuple[int, int, int]]) -> None:
        """payments: (id, buyer, seller), committed."""
        self._ensure_thread()
        request_id = current_request_id()  # the submitting request's, read in its thread
        with self._lock:
            if not self._room(len(payments)):
                return
            if not self._pending and not self._batches:
                self._wake.set()
            self._pending.extend((payment, request_id) for payment in payments)

    def submit_atomic_batch(self, batch_id: int) -> None:
        """An atomic batch, committed: one message, sent by the thread as well (a request thread
        never waits for the broker)."""
        self._ensure_thread()
        request_id = current_request_id()
        with self._lock:
            if not self._room(1):
                return
            if not self._pending and not self._batches:
                self._wake.set()
            self._batches.append((batch_id, request_id))

    def _room(self, count: int) -> bool:
        """Under the lock: whether `count` more fit; if not, count and (now and then) log them."""
        if self.held() + count <= self._max_held:
            return True
        self.dropped += count
        now = time.monotonic()
        if now - self._dropped_logged_at > 10:
            self._dropped_logged_at = now
            log.warning("dispatcher full (%d held, %d left to the sweeper so far): is the broker"
                        " answering?", self.held(), self.dropped)
        return False

    def _ensure_thread(self) -> None:
        # gunicorn may fork after the app was built: each process needs its own thread.
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid != os.getpid():
                self._pending, self._batches, self._in_flight = [], [], 0
                self._wake = threading.Event()
                threading.Thread(target=self._run, args=(self._wake,), name="wallet-dispatcher",
                                 daemon=True).start()
                self._pid = os.getpid()

    def _run(self, wake: threading.Event) -> None:
        last_send = -math.inf
        while True:
            wake.wait()
            # Under load, the window: let the payments of other requests join. Idle: none.
            gather = last_send + self._window_s - time.monotonic()
            if gather > 0:
                time.sleep(gather)
            last_send = time.monotonic()
            with self._lock:
                items, self._pending = self._pending, []
                batches, self._batches = self._batches, []
                self._in_flight = len(items) + len(batches)
                wake.clear()
            try:
                self._flush(items, batches)
            finally:
                with self._lock:
                    self._in_flight = 0

    def _flush(self, items: list[tuple[tuple[int, int, int], str | None]],
               batches: list[tuple[int, str | None]]) -> None:
        """Send everything taken; at the first failure, leave the rest to the sweeper (a broker
        that fails one publish now would most likely cost every other one its timeout too)."""
        sends = [(self._send_payments, items[start:start + self._max_ids])
                 for start in range(0, len(items), self._max_ids)]
        sends += [(self._send_batch, batch) for batch in batches]
        for n, (send, what) in enumerate(sends):
            try:
                send(what)
            except Exception:  # the sweeper delivers them; a dead thread would deliver nothing
                rest = sum(len(w) if isinstance(w, list) else 1 for _, w in sends[n:])
                log.exception("dispatch failed; %d payments or batches left to the sweeper", rest)
                return
            with self._lock:
                self._in_flight -= len(what) if isinstance(what, list) else 1

    def _send_payments(self, items: list[tuple[tuple[int, int, int], str | None]]) -> None:
        request_ids = {payment[0]: rid for payment, rid in items if rid is not None}
        self._sender.send_payments([payment for payment, _ in items], request_ids)

    def _send_batch(self, batch: tuple[int, str | None]) -> None:
        self._sender.send_atomic_batch(*batch)
