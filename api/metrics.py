"""Per-request bookkeeping (request id, access log line, HTTP metrics) and `GET /metrics`.

The hooks cost a few microseconds per request: a timer, two metric updates in memory (mmap in
multiprocess mode) and one JSON log line; no database or Redis round trip. Queue depths are read
from the broker only when /metrics is scraped, in one pipelined round trip.
"""
from __future__ import annotations

import logging
import time

from flask import Blueprint, Flask, Response, current_app, g, request
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy import text

from api.wallet import wallet
from api.webhook_metrics import WebhookCollector
from common import metrics, routing
from common.db import Database
from common.logging import REQUEST_ID_HEADER, accept_request_id, get_logger, request_id_var
from common.settings import Settings

bp = Blueprint("metrics", __name__)
access_log = get_logger("wallet.access")
log = logging.getLogger("wallet.api")

_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


def install(app: Flask, settings: Settings) -> None:
    """Register the hooks; call before any other before_request hook (auth), so that a 401 has a
    request id, is logged and is counted too."""
    metrics.configure(settings)
    app.extensions["wallet_metrics_registry"] = _registry(settings, app.extensions["wallet"].db)
    log_requests = settings.access_log

    @app.before_request
    def start_request():
        g.request_started = time.perf_counter()
        g.request_id = rid = accept_request_id(request.headers.get(REQUEST_ID_HEADER))
        g.request_id_token = request_id_var.set(rid)

    @app.after_request
    def finish_request(response: Response) -> Response:
        started = g.get("request_started")
        rid = g.get("request_id")
        if started is None:  # a failure before our first hook ran
            return response
        elapsed = time.perf_counter() - started
        response.headers[REQUEST_ID_HEADER] = rid
        rule = request.url_rule
        route = rule.rule if rule is not None else "unmatched"  # never raw paths: bounded labels
        method = request.method if request.method in _METHODS else "OTHER"
        status = response.status_code
        metrics.HTTP_REQUESTS.labels(method, route, str(status)).inc()
        metrics.HTTP_LATENCY.labels(method, route).observe(elapsed)
        if log_requests:
            access_log.info("request", extra={
                "method": request.method, "path": request.path, "route": route, "status": status,
                "duration_ms": round(elapsed * 1000, 3), "request_id": rid})
        return response

    @app.teardown_request
    def end_request(_exc):
        token = g.pop("request_id_token", None)
        if token is not None:
            request_id_var.reset(token)


def _registry(settings: Settings, db: Database) -> list[CollectorRegistry]:
    """The registries /metrics renders: all processes' metrics (or this process's), queue depths,
    the backlog."""
    scrape_time = CollectorRegistry()
    scrape_time.register(QueueDepthCollector(settings))
    scrape_time.register(BacklogCollector(db))
    scrape_time.register(WebhookCollector(settings))
    if metrics.multiprocess_dir():
        summed = CollectorRegistry()
        MultiProcessCollector(summed, path=metrics.multiprocess_dir())
        return [summed, scrape_time]
    return [REGISTRY, scrape_time]


class QueueDepthCollector:
    """`wallet_queue_depth{queue}`: messages waiting per queue, read from the broker at scrape time."""

    def __init__(self, settings: Settings):
        self._settings = settings
        self._names = [routing.queue_name(k) for k in range(settings.queues)]
        self._redis = None

    def collect(self):
        depth = GaugeMetricFamily("wallet_queue_depth", "Messages waiting in each queue", labels=["queue"])
        up = GaugeMetricFamily("wallet_broker_up", "1 if the broker answered the queue-depth query")
        try:
            for name, size in zip(self._names, self._sizes()):
                depth.add_metric([name], size)
            up.add_metric([], 1)
        except Exception:
            up.add_metric([], 0)
        yield depth
        yield up

    def _sizes(self) -> list[int]:
        url = self._settings.broker_url
        if url.startswith(("redis://", "rediss://", "redis+socket://", "unix://")):
            if self._redis is None:
                import redis
                self._redis = redis.Redis.from_url(url.replace("redis+socket://", "unix://"),
                                                   socket_timeout=1, socket_connect_timeout=1)
            pipe = self._redis.pipeline(transaction=False)
            for name in self._names:
                pipe.llen(name)
            return [int(n) for n in pipe.execute()]
        # Other brokers (AMQP): a passive declare answers with the message count.
        with wallet().celery.connection_for_read() as conn:
            channel = conn.default_channel
            return [channel.queue_declare(queue=name, passive=True).message_count for name in self._names]


class BacklogCollector:
    """`wallet_payments_pending` and `wallet_oldest_pending_age_seconds`, read from PostgreSQL at
    scrape time with one statement over `open_payments` (the open payments only: admission
    control keeps the pending ones few), joined to `payments` by primary key; never a scan of
    `payments`. And `wallet_database_up`."""

    SQL = text("SELECT (SELECT count(*) FROM open_payments WHERE status = 'pending') AS pending,"
               " coalesce(extract(epoch FROM now() - (SELECT min(p.created_at)"
               "   FROM open_payments o JOIN payments p ON p.id = o.payment_id"
               "   WHERE o.status = 'pending')), 0) AS oldest")

    def __init__(self, db: Database):
        self._db = db

    def collect(self):
        up = GaugeMetricFamily("wallet_database_up", "1 if the database answered the backlog query")
        try:
            with self._db.read() as session:
                row = session.execute(self.SQL).one()
        except Exception as exc:  # a scrape must still answer (queue depths, counters)
            log.warning("backlog metrics unavailable: %s", exc.__class__.__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield GaugeMetricFamily("wallet_payments_pending", "Payments accepted and not yet applied",
                                value=row.pending)
        yield GaugeMetricFamily("wallet_oldest_pending_age_seconds",
                                "Age of the oldest pending payment (0 when none is pending)",
                                value=float(row.oldest))


@bp.get("/metrics")
def metrics_view():
    body = b"".join(generate_latest(r) for r in current_app.extensions["wallet_metrics_registry"])
    return Response(body, content_type=CONTENT_TYPE_LATEST)
