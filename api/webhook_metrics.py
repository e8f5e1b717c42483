"""Scrape-time gauges of the webhooks: the age of the oldest event still owed to an endpoint (two
index lookups) and the depth of the webhooks queue (one LLEN)."""
from __future__ import annotations

from prometheus_client.core import GaugeMetricFamily

from common import webhooks
from common.messaging import WEBHOOK_QUEUE
from common.settings import Settings


class WebhookCollector:
    def __init__(self, settings: Settings):
        self._settings = settings
        self._redis = None

    def collect(self):
        from api.wallet import wallet
        age = GaugeMetricFamily("wallet_webhook_oldest_undelivered_age_seconds",
                                "Seconds since the oldest event not yet delivered to an endpoint "
                                "that is owed it was written (0: none)")
        try:
            with wallet().db.read() as session:
                age.add_metric([], webhooks.oldest_undelivered_age(session))
            yield age
        except Exception:  # the database is down: /ready says so; no value rather than a wrong one
            pass
        depth = GaugeMetricFamily("wallet_webhook_queue_depth", "Messages waiting in the webhooks queue")
        try:
            depth.add_metric([], self._depth())
            yield depth
        except Exception:
            pass

    def _depth(self) -> int:
        url = self._settings.broker_url
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise RuntimeError("only read from Redis")
        if self._redis is None:
            import redis
            self._redis = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        return int(self._redis.llen(WEBHOOK_QUEUE))
