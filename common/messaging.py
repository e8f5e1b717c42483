"""The Celery application's configuration and the sending side of the payment queues.

Both the API (which sends) and the worker (which consumes) build their Celery app here, so the
queue layout and task names cannot drift apart. Messages carry payment ids only, and are sent
only after the rows they name are committed: PostgreSQL, not Redis, is the record of a payment.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import socket
import threading
import time
import uuid
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

# A publish that cannot reach the broker gives up quickly: the payment row is committed and the
# sweeper will send it, so blocking a request (or the dispatcher) for long buys nothing.
# Message headers carrying request ids into the worker's log lines. The dispatcher puts payments
# of many requests into one message, so a message maps each payment id to its request id
# (REQUEST_IDS, {"<payment id>": "<request id>"}); an atomic batch's message carries the one
# request id (REQUEST_ID). Messages sent by the sweeper carry none.
REQUEST_IDS = "wallet_request_ids"
REQUEST_ID = "wallet_request_id"

PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}


def make_celery(settings: Settings) -> Celery:
    app = Celery("wallet", broker=settings.broker_url, set_as_current=True)
    # Each queue is bound with its own routing key (a Queue without one would be bound with the
    # default key, and one publish would reach every queue).
    exchange = Exchange("payments", type="direct")
    payment_queues = [Queue(routing.queue_name(k), exchange, routing_key=routing.queue_name(k))
                      for k in range(settings.queues)]
    transport_options = {"visibility_timeout": 3600}
    if settings.broker_url.startswith("amqp"):
        # Without publisher confirms RabbitMQ drops a publish silently during a resource alarm.
        transport_options = {"confirm_publish": True}
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
        broker_connection_timeout=3,
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


class RedisPublisher:
    """Publishes a task message with one LPUSH, written the way Celery (task protocol 2) inside
    kombu's Redis envelope writes it, so that a plain Celery worker consumes it.

    Why: `send_task` costs ~0.5 ms of CPU per message in Celery and kombu (routing, argsrepr,
    signals, the producer pool), an LPUSH ~0.1 ms, and the API sends a message every window per
    queue. tests/common/test_messaging.py checks this format against what `send_task` writes.
    """

    def __init__(self, broker_url: str):
        import redis
        self._redis = redis.Redis.from_url(broker_url, socket_timeout=2, socket_connect_timeout=2)
        self._origin = f"{os.getpid()}@{socket.gethostname()}"
        self._reply_to = str(uuid.uuid4())

    def publish(self, queue: str, task: str, args: list, headers: Mapping | None = None) -> None:
        task_id = str(uuid.uuid4())
        body = json.dumps([args, {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
        message = {
            "body": base64.b64encode(body.encode()).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {
                "lang": "py", "task": task, "id": task_id, "shadow": None, "eta": None,
                "expires": None, "group": None, "group_index": None, "retries": 0,
                "timelimit": [None, None], "root_id": task_id, "parent_id": None,
                "argsrepr": f"[{len(args[0])} ids]" if args and isinstance(args[0], list) else repr(args),
                "kwargsrepr": "{}", "origin": self._origin, "ignore_result": True,
                "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {}, **(headers or {}),
            },
            "properties": {
                "correlation_id": task_id, "reply_to": self._reply_to, "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0,
                "body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
            },
        }
        self._redis.lpush(queue, json.dumps(message))


class Sender:
    """Sends payment ids to their queues, one message per queue touched."""

    def __init__(self, celery: Celery, settings: Settings):
        self._celery = celery
        self._queues = settings.queues
        self._raw = RedisPublisher(settings.broker_url) if _is_redis(settings.broker_url) else None

    def send_payments(self, payments: Iterable[tuple[int, int, int]],
                      request_ids: Mapping[int, str] | None = None) -> int:
        """payments: (id, buyer, seller) already committed; request_ids: payment id -> the id of
        the request that made it (for the worker's logs). Returns the number of messages."""
        by_queue: dict[int, list[int]] = defaultdict(list)
        for payment_id, buyer, seller in payments:
            by_queue[routing.queue_index(buyer, seller, self._queues)].append(payment_id)
        for index, ids in by_queue.items():
            headers = None
            if request_ids:
                headers = {REQUEST_IDS: {str(i): request_ids[i] for i in ids if i in request_ids}}
            if self._raw is not None:
                self._raw.publish(routing.queue_name(index), APPLY_PAYMENTS, [sorted(ids)], headers)
            else:
                self._celery.send_task(APPLY_PAYMENTS, args=[sorted(ids)], headers=headers,
                                       queue=routing.queue_name(index), retry_policy=PUBLISH_RETRY)
        return len(by_queue)

    def send_atomic_batch(self, batch_id: int, request_id: str | None = None) -> None:
        index = routing.batch_queue_index(batch_id, self._queues)
        request_id = request_id or current_request_id()
        self._celery.send_task(APPLY_ATOMIC_BATCH, args=[batch_id],
                               headers={REQUEST_ID: request_id} if request_id else None,
                               queue=routing.queue_name(index), retry_policy=PUBLISH_RETRY)


def _is_redis(url: str) -> bool:
    return url.startswith(("redis://", "rediss://", "unix://"))


class Dispatcher:
    """Gathers committed payments of many requests into few messages, from a background thread.

    The first payment after a quiet spell wakes the thread, which lets `window_ms` pass, then
    takes everything gathered and sends one message per queue touched (split at `max_ids`). Under
    load one message carries many payments (a Celery message costs about a millisecond of CPU to
    send and another to consume, more than applying a payment); when idle a payment waits at most
    the window. Submitting only appends to a list: waking the thread for every payment would hand
    the GIL back and forth for each request. What is lost here (a crash, a broker outage) is still
    `pending` in PostgreSQL, and the sweeper sends it again.
    """

    def __init__(self, sender: Sender, window_ms: float, max_ids: int = 500):
        self._sender = sender
        self._window_s = window_ms / 1000
        self._max_ids = max_ids
        self._lock = threading.Lock()
        self._pending: list[tuple[tuple[int, int, int], str | None]] = []
        self._wake = threading.Event()
        self._pid: int | None = None

    def submit(self, payments: Sequence[tuple[int, int, int]]) -> None:
        """payments: (id, buyer, seller), committed."""
        self._ensure_thread()
        request_id = current_request_id()  # the submitting request's, read in its thread
        with self._lock:
            if not self._pending:
                self._wake.set()
            self._pending.extend((payment, request_id) for payment in payments)

    def _ensure_thread(self) -> None:
        # gunicorn may fork after the app was built: each process needs its own thread.
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid != os.getpid():
                self._pending, self._wake = [], threading.Event()
                threading.Thread(target=self._run, args=(self._wake,), name="wallet-dispatcher",
                                 daemon=True).start()
                self._pid = os.getpid()

    def _run(self, wake: threading.Event) -> None:
        while True:
            wake.wait()
            time.sleep(self._window_s)  # the window: let the payments of other requests join
            with self._lock:
                items, self._pending = self._pending, []
                wake.clear()
            for start in range(0, len(items), self._max_ids):
                self._send(items[start:start + self._max_ids])

    def _send(self, items: list[tuple[tuple[int, int, int], str | None]]) -> None:
        request_ids = {payment[0]: rid for payment, rid in items if rid is not None}
        try:
            self._sender.send_payments([payment for payment, _ in items], request_ids)
        except Exception:  # the sweeper delivers them; a dead thread would deliver nothing
            log.exception("dispatch failed for %d payments; the sweeper will send them", len(items))
