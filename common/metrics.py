"""Prometheus metrics shared by the API and the worker.

Multiprocess mode: when `Settings.metrics_dir` (PROMETHEUS_MULTIPROC_DIR) is set, every process
(gunicorn workers, Celery pool processes) writes its counters and histograms to memory-mapped
files in that directory, and the API's `/metrics` sums all of them. The worker's numbers reach
Prometheus through the API's `/metrics` that way, with no exporter of their own; API and workers
must share the directory (same host, or a shared volume). Files are named by host name and pid,
so processes of several containers can share one volume without colliding. Wipe the directory
before the processes start (counters of past runs would otherwise be added in).

Without it each process counts only for itself (tests through Flask's test client, one-process
tools). Only counters and histograms are kept here, and one gauge, the sweeper's last run (a
timestamp, summed across processes as their maximum, so it survives the process that wrote it);
the other gauges are read at scrape time (`api.metrics`), so nothing needs cleaning up when a
process exits.

Updating a metric costs a few microseconds (a dictionary write into an mmap); no network.
"""
from __future__ import annotations

import os
import socket

import threading

from prometheus_client import Counter, Gauge, Histogram, values

from common.settings import Settings

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

HTTP_REQUESTS = Counter("wallet_http_requests", "HTTP requests by route, method and status",
                        ["method", "route", "status"])
HTTP_LATENCY = Histogram("wallet_http_request_duration_seconds", "Time to answer an HTTP request",
                         ["method", "route"], buckets=_LATENCY_BUCKETS)
PAYMENTS_ACCEPTED = Counter("wallet_payments_accepted", "Payments recorded as pending by the API",
                            ["kind"])  # single | batch | atomic_batch
ACCEPT_GROUP_PAYMENTS = Histogram(
    "wallet_accept_group_payments", "Payments recorded by one accepting INSERT (group commit, common.group_commit)",
    ["kind"], buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32))  # single
# Every metric has a label, so no value exists before `configure` chose where values live.
PAYMENTS_COMPLETED = Counter("wallet_payments_completed", "Payments applied by a worker", ["task"])
PAYMENTS_FAILED = Counter("wallet_payments_failed", "Payments failed by a worker, by failure code",
                          ["failure_code"])
APPLY_LATENCY = Histogram("wallet_apply_duration_seconds",
                          "Worker time to apply one message's payments (one transaction, retries included)",
                          ["task"], buckets=_LATENCY_BUCKETS)

WEBHOOK_DELIVERIES = Counter("wallet_webhook_deliveries", "Webhook delivery attempts by outcome",
                             ["outcome"])  # delivered | retry | gave_up

_multiprocess_dir: str | None = None
_sweeper_last_run: Gauge | None = None
_sweeper_lock = threading.Lock()


def configure(settings: Settings) -> None:
    """Choose the value storage before any labelled metric is first touched. Idempotent."""
    global _multiprocess_dir
    path = settings.metrics_dir
    if not path or _multiprocess_dir == path:
        return
    os.makedirs(path, exist_ok=True)
    # prometheus_client reads the directory from this variable when it opens its files.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    host = socket.gethostname()
    values.ValueClass = values.MultiProcessValue(lambda: f"{host}-{os.getpid()}")
    _multiprocess_dir = path


def multiprocess_dir() -> str | None:
    return _multiprocess_dir


def record_outcomes(task: str, outcomes) -> None:
    completed = 0
    for o in outcomes:
        if o.status == "authorized":
            continue  # moves nothing yet: a capture completes it
        if o.failure_code is None:
            completed += 1
        else:
            PAYMENTS_FAILED.labels(o.failure_code).inc()
    if completed:
        PAYMENTS_COMPLETED.labels(task).inc(completed)


def record_sweep_run(at: float) -> None:
    """The sweeper finished a run (its claim committed and its sends done) at `at` (Unix time).
    Made on first use, after `configure`: a gauge without labels has its value at creation."""
    global _sweeper_last_run
    if _sweeper_last_run is None:
        with _sweeper_lock:
            if _sweeper_last_run is None:
                _sweeper_last_run = Gauge(
                    "wallet_sweeper_last_run_timestamp_seconds",
                    "When the sweeper last finished a run (Unix time)", multiprocess_mode="max")
    _sweeper_last_run.set(at)
