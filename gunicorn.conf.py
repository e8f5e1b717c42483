"""gunicorn reads this file from the working directory by default, so the plain command
`gunicorn "api:create_app()" --bind HOST:PORT` gets these defaults; flags on the command line win.

Threads (gthread) let one process keep several requests' database round trips in flight;
the database pool (WALLET_DB_POOL_SIZE) should exceed `threads` (admission's recount thread uses
it too), or connections are opened and closed under load.
"""
from common.settings import get_settings

_settings = get_settings()

workers = _settings.web_workers
threads = _settings.web_threads
# gthread, with a thread that keeps serving its kept-alive connection (api/http_worker.py).
worker_class = "api.http_worker.Worker"
timeout = _settings.web_timeout_seconds
graceful_timeout = 10
keepalive = 5
# Bound what one request may send before the app sees it (the app's own limit is
# WALLET_MAX_BODY_BYTES, answered with 413).
limit_request_line = 8190
limit_request_fields = 100


def post_worker_init(worker):
    # The app is loaded: what exists now (Flask, SQLAlchemy, pydantic, Celery: ~100,000 objects)
    # lives as long as the process. Freezing moves it out of the garbage collector's sight. A full
    # collection over it took 50-70 ms on the bench machine, holding the GIL, and showed as the
    # p99 of acceptance latency.
    import gc
    gc.freeze()
