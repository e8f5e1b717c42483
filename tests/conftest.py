"""Fixtures: real PostgreSQL and Redis (the given URLs, else embedded ones), a fresh database per
test session, the Flask app, and real gunicorn / Celery processes for end-to-end tests."""
from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path

import httpx
import pytest
from sqlalchemy.orm import Session

from api import create_app
from common.db import Database
from common.settings import Settings, hash_api_key, sqlalchemy_url
from scripts import services as svc
from tests.support import processes

API_KEY = "test-key-" + uuid.uuid4().hex

# Fixtures that start processes (gunicorn, Celery): a test using one is marked `processes`.
PROCESS_FIXTURES = frozenset({"worker", "api_url", "http"})


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """A skipped RabbitMQ test is easy to miss among the `-ra` lines: say it in a banner."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if "rabbitmq" in r.nodeid]
    if skipped:
        terminalreporter.write_sep("!", "RabbitMQ broker test SKIPPED (amqp:// not tested)", red=True)
        for report in skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            terminalreporter.write_line(f"{report.nodeid}: {reason}")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.processes)
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="session")
def work_dir():
    path = Path(tempfile.mkdtemp(prefix="wallet-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def services(work_dir):
    running = svc.ensure_services(work_dir / "services")
    yield running
    running.stop()


def _fresh_database(services) -> tuple[str, str]:
    name = f"wallet_test_{uuid.uuid4().hex[:12]}"
    url = svc.create_database(services.database_url, name)
    svc.migrate(url)
    return name, url


@pytest.fixture(scope="session")
def database_url(services):
    name, url = _fresh_database(services)
    yield url
    svc.drop_database(services.database_url, name)


@pytest.fixture
def fresh_database_url(services):
    """A database of its own, for tests that must see only their own rows (reconcile, bank)."""
    name, url = _fresh_database(services)
    yield url
    svc.drop_database(services.database_url, name)


@pytest.fixture(scope="session")
def broker_url(services):
    return services.redis_url


def make_settings(database_url: str, broker_url: str, **overrides) -> Settings:
    values = dict(database_url=sqlalchemy_url(database_url), broker_url=broker_url,
                  api_key_hashes=frozenset({hash_api_key(API_KEY)}), sweep_after_seconds=2.0,
                  sweep_interval_seconds=1.0, webhook_allow_private=True)
    values.update(overrides)
    return Settings(**values)


def make_env(database_url: str, broker_url: str, **extra: str) -> dict[str, str]:
    return processes.service_env(database_url, broker_url, WALLET_API_KEYS=API_KEY,
                                 WALLET_SWEEP_AFTER_SECONDS="2", WALLET_SWEEP_INTERVAL_SECONDS="1",
                                 **{"WALLET_WEBHOOK_ALLOW_PRIVATE": "1", **extra})


@pytest.fixture(scope="session")
def settings(database_url, broker_url) -> Settings:
    return make_settings(database_url, broker_url)


@pytest.fixture(scope="session")
def env(database_url, broker_url, work_dir) -> dict[str, str]:
    # Shared by the session's API and worker processes: /metrics sums them all (multiprocess mode).
    return make_env(database_url, broker_url, PROMETHEUS_MULTIPROC_DIR=str(work_dir / "metrics"))


@pytest.fixture(scope="session")
def db(settings):
    database = Database(settings)
    yield database
    database.dispose()


@pytest.fixture
def session(db) -> Session:
    """A session whose every write is rolled back after the test (commits become savepoints)."""
    with db.engine.connect() as conn:
        outer = conn.begin()
        with Session(bind=conn, join_transaction_mode="create_savepoint") as s:
            yield s
        outer.rollback()


@pytest.fixture(scope="session")
def app(settings):
    application = create_app(settings)
    application.config["TESTING"] = True
    return application


@pytest.fixture
def client(app):
    """Flask's test client, authenticated; real PostgreSQL and Redis behind it."""
    test_client = app.test_client()
    test_client.environ_base["HTTP_AUTHORIZATION"] = AUTH["Authorization"]
    return test_client


@pytest.fixture(scope="session")
def log_dir(work_dir):
    path = work_dir / "logs"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def worker(env, log_dir):
    proc = processes.start_worker(env, log_dir)
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def api_url(env, log_dir):
    proc = processes.start_api(env, log_dir)
    yield f"http://127.0.0.1:{proc.port}"
    proc.stop()


@pytest.fixture
def http(api_url, worker):
    """An HTTP client to a real gunicorn API with a real Celery worker behind it."""
    with httpx.Client(base_url=api_url, headers=AUTH, timeout=10) as c:
        yield c
