"""The one place that reads the environment.

Every process builds a `Settings` once (`get_settings()`) and passes it down; nothing else in the
code base looks at `os.environ`.
"""
from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit, urlunsplit


def sqlalchemy_url(url: str) -> str:
    """Pin the psycopg2 driver: SQLAlchemy 2.1 maps a bare `postgresql://` to psycopg 3.

    libpq's multi-host form (`postgresql://u@h1:p1,h2:p2/db?target_session_attrs=read-write`, for a
    replicated cluster) becomes SQLAlchemy's, which takes the hosts as repeated `?host=h:p`
    (it refuses the comma list in the netloc); psycopg2 then gets libpq's host and port lists."""
    parts = urlsplit(url)
    if parts.scheme in ("postgres", "postgresql"):
        parts = parts._replace(scheme="postgresql+psycopg2")
    if parts.scheme.startswith("postgresql") and "," in parts.netloc:
        userinfo, at, hosts = parts.netloc.rpartition("@")
        query = "&".join([f"host={quote(h, safe=':[]')}" for h in hosts.split(",")]
                         + ([parts.query] if parts.query else []))
        parts = parts._replace(netloc=userinfo + at, query=query)
    return urlunsplit(parts)


def hash_api_key(key: str) -> str:
    # Keys are 32 random bytes, so a fast hash is enough; only the hash is ever kept.
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Settings:
    database_url: str = "postgresql+psycopg2://postgres@127.0.0.1:5432/wallet"
    broker_url: str = "redis://127.0.0.1:6379/0"
    # Payment queues. Each message is one worker transaction, whose fixed cost (~3 ms of Python and
    # ~3-4 ms of PostgreSQL: planning the write statement, three statements, the commit) it
    # shares among its payments; a dispatch window yields one message per queue and API process.
    # 4 queues made ~50-payment transactions in the batch scenario, 2 make ~100: batch 1.21 / 1.41x
    # -> 2.26 / 2.18x the reference, singles 0.23 / 0.26 -> 0.30 / 0.34 (bench/NOTES.md,
    # 2026-12-02 evening). 1 queue did no better than 2 (two messages a window for two workers).
    queues: int = 2
    api_key_hashes: frozenset[str] = field(default_factory=frozenset)
    sweep_after_seconds: float = 10.0
    sweep_interval_seconds: float = 2.0
    dispatch_window_ms: float = 150.0
    # Most payment ids (and atomic batches) the API's dispatcher holds unsent; beyond, new ones are
    # left to the sweeper (they are committed). Bounds its memory while the broker is away.
    dispatch_max_held: int = 20_000
    # Every publish (API, sweeper, task retries) waits at most this for the broker per attempt,
    # connecting included, and tries twice: a broker that hangs costs a sender about 2 x this.
    publish_timeout_ms: float = 500.0
    apply_max_payments: int = 500
    max_body_bytes: int = 1024 * 1024
    max_batch_items: int = 1000
    # Admission control: POST /payments and /payments/batch answer 429 while more payments than
    # this are pending (0: no bound). It bounds completion latency to about this over the apply rate.
    max_pending: int = 1500
    # A payment POST that does not fit waits up to this for room before its 429 (common.admission),
    # at most `admission_max_waiting` at once per API process (None: all threads but two). A 429
    # says Retry-After: 1, so a client loses no time waiting as long.
    admission_wait_ms: float = 1000.0
    admission_max_waiting: int | None = None
    # Most single payments one accepting INSERT records (common.group_commit): those a process's
    # threads accept while the previous INSERT is in flight share the next one. 1: each alone.
    accept_group_max: int = 32
    # At least web_threads + 1 (admission's recount has a thread of its own): beyond the pool,
    # connections are opened and closed as they are needed, a new PostgreSQL backend each time
    # (12 of them in 8 s of `uniform` with 12 threads and a pool of 12, none at 14; bench/NOTES.md
    # 2026-12-02 midnight). 20 threads + the recount + one spare.
    db_pool_size: int = 22
    db_max_overflow: int = 5
    db_statement_timeout_ms: int = 30_000
    worker_concurrency: int = 2
    # Niceness added to Celery worker processes (0-19): where API and workers share the CPU, a
    # request thread runs before a worker's apply, so acceptance latency holds up under load
    # while the applying, which clients do not wait on, takes what is left (bench/NOTES.md,
    # 2026-12-03 midday). Between containers the scheduler shares CPU by cgroup: the compose files
    # give the workers half the CPU weight instead (cpu_shares).
    worker_nice: int = 5
    # gunicorn (read by ./gunicorn.conf.py): threads overlap the requests' database round trips.
    # 20 rather than 12: a batch that waits for admission holds a thread, and with 12 (10 waiters)
    # the bench's 32 clients were refused 1,470-2,790 times a run; with 20, 460-1,280 times and
    # batches 1.4-2.0x faster against the same run's reference (bench/NOTES.md 2026-12-03).
    web_workers: int = 2
    web_threads: int = 20
    web_timeout_seconds: int = 30
    log_level: str = "INFO"
    access_log: bool = True  # one JSON line per HTTP request
    # prometheus_client multiprocess mode: every API and worker process writes its metrics here
    # and /metrics sums them. Empty: each process reports only its own (fine for one process).
    metrics_dir: str = ""
    # Webhooks (SPEC section 10, common.webhooks).
    webhook_retry_base_seconds: float = 30.0
    webhook_max_attempts: int = 12  # counting the first
    webhook_timeout_seconds: float = 10.0  # one deadline for the whole attempt
    webhook_allow_private: bool = False  # 1: URLs may reach private addresses (development, tests)
    webhook_threads: int = 8  # delivery threads per worker process
    webhook_fanout_interval_seconds: float = 1.0

    @property
    def admission_waiters(self) -> int:
        if self.admission_max_waiting is not None:
            return self.admission_max_waiting
        return max(0, self.web_threads - 2)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Settings":
        env = dict(os.environ if env is None else env)
        d = cls()

        def num(name: str, default, kind=int):
            raw = env.get(name)
            return default if raw in (None, "") else kind(raw)

        keys = [k.strip() for k in env.get("WALLET_API_KEYS", "").split(",") if k.strip()]
        return cls(
            database_url=sqlalchemy_url(env.get("DATABASE_URL") or d.database_url),
            broker_url=env.get("BROKER_URL") or env.get("REDIS_URL") or d.broker_url,
            queues=num("WALLET_QUEUES", d.queues),
            api_key_hashes=frozenset(hash_api_key(k) for k in keys),
            sweep_after_seconds=num("WALLET_SWEEP_AFTER_SECONDS", d.sweep_after_seconds, float),
            sweep_interval_seconds=num("WALLET_SWEEP_INTERVAL_SECONDS", d.sweep_interval_seconds, float),
            dispatch_window_ms=num("WALLET_DISPATCH_WINDOW_MS", d.dispatch_window_ms, float),
            dispatch_max_held=num("WALLET_DISPATCH_MAX_HELD", d.dispatch_max_held),
            publish_timeout_ms=num("WALLET_PUBLISH_TIMEOUT_MS", d.publish_timeout_ms, float),
            apply_max_payments=num("WALLET_APPLY_MAX_PAYMENTS", d.apply_max_payments),
            max_body_bytes=num("WALLET_MAX_BODY_BYTES", d.max_body_bytes),
            max_batch_items=num("WALLET_MAX_BATCH_ITEMS", d.max_batch_items),
            max_pending=num("WALLET_MAX_PENDING", d.max_pending),
            admission_wait_ms=num("WALLET_ADMISSION_WAIT_MS", d.admission_wait_ms, float),
            admission_max_waiting=num("WALLET_ADMISSION_MAX_WAITING", d.admission_max_waiting),
            accept_group_max=num("WALLET_ACCEPT_GROUP_MAX", d.accept_group_max),
            db_pool_size=num("WALLET_DB_POOL_SIZE", d.db_pool_size),
            db_max_overflow=num("WALLET_DB_MAX_OVERFLOW", d.db_max_overflow),
            db_statement_timeout_ms=num("WALLET_DB_STATEMENT_TIMEOUT_MS", d.db_statement_timeout_ms),
            worker_concurrency=num("WALLET_WORKER_CONCURRENCY", d.worker_concurrency),
            worker_nice=num("WALLET_WORKER_NICE", d.worker_nice),
            web_workers=num("WEB_CONCURRENCY", d.web_workers),
            web_threads=num("WALLET_WEB_THREADS", d.web_threads),
            web_timeout_seconds=num("WALLET_WEB_TIMEOUT_SECONDS", d.web_timeout_seconds),
            log_level=env.get("WALLET_LOG_LEVEL", d.log_level),
            access_log=env.get("WALLET_ACCESS_LOG", "1").strip().lower() not in ("0", "false", "no", "off"),
            metrics_dir=env.get("PROMETHEUS_MULTIPROC_DIR", ""),
            webhook_retry_base_seconds=num("WALLET_WEBHOOK_RETRY_BASE_SECONDS", d.webhook_retry_base_seconds, float),
            webhook_max_attempts=num("WALLET_WEBHOOK_MAX_ATTEMPTS", d.webhook_max_attempts),
            webhook_timeout_seconds=num("WALLET_WEBHOOK_TIMEOUT_SECONDS", d.webhook_timeout_seconds, float),
            webhook_allow_private=env.get("WALLET_WEBHOOK_ALLOW_PRIVATE", "0").strip().lower() in ("1", "true", "yes", "on"),
            webhook_threads=num("WALLET_WEBHOOK_THREADS", d.webhook_threads),
            webhook_fanout_interval_seconds=num("WALLET_WEBHOOK_FANOUT_INTERVAL_SECONDS",
                                                d.webhook_fanout_interval_seconds, float),
        )

    def __post_init__(self) -> None:
        if not 1 <= self.queues <= 1024:
            raise ValueError("WALLET_QUEUES must be between 1 and 1024")
        if not 1 <= self.max_batch_items <= 10_000:
            raise ValueError("WALLET_MAX_BATCH_ITEMS must be between 1 and 10000")
        if not 0 <= self.worker_nice <= 19:
            raise ValueError("WALLET_WORKER_NICE must be between 0 and 19")
        if not 1 <= self.accept_group_max <= 1000:
            raise ValueError("WALLET_ACCEPT_GROUP_MAX must be between 1 and 1000")
        if self.publish_timeout_ms <= 0:
            raise ValueError("WALLET_PUBLISH_TIMEOUT_MS must be positive")
        if self.max_pending < 0:
            raise ValueError("WALLET_MAX_PENDING must be 0 (no bound) or more")
        if self.admission_wait_ms < 0 or (self.admission_max_waiting or 0) < 0:
            raise ValueError("WALLET_ADMISSION_WAIT_MS and WALLET_ADMISSION_MAX_WAITING must be 0 or more")
        if self.webhook_max_attempts < 1 or self.webhook_threads < 1 or self.webhook_timeout_seconds <= 0:
            raise ValueError("WALLET_WEBHOOK_MAX_ATTEMPTS, _THREADS and _TIMEOUT_SECONDS must be positive")


@functools.cache
def get_settings() -> Settings:
    return Settings.from_env()
