"""The end-to-end payment with RabbitMQ as the broker (BROKER_URL=amqp://...), when one is reachable.

WALLET_TEST_AMQP_URL names it (default: the local guest account, as on CI's machines). Where
RabbitMQ must be there (CI: `.ci/run` sets WALLET_REQUIRE_RABBITMQ=1) an unreachable one fails the
test; elsewhere it is skipped, and the end of the pytest run says so in a banner of its own. When `rabbitmqctl` works here,
the test runs in a virtual host of its own, so that no other worker on the same RabbitMQ consumes
its messages; otherwise it uses the URL's virtual host, and beat's sweeper covers a message taken
by a stranger.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from decimal import Decimal
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
from kombu import Connection

from tests.conftest import AUTH, make_env
from tests.support import processes
from tests.support.api import open_account, pay, wait_terminal

pytestmark = pytest.mark.slow

AMQP_URL = os.environ.get("WALLET_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def _reachable(url: str) -> str | None:
    try:
        with Connection(url, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=2)
        return None
    except Exception as exc:  # any failure to connect means: not here
        return f"{exc.__class__.__name__}: {exc}"


def _rabbitmqctl(*args: str) -> bool:
    if not shutil.which("rabbitmqctl"):
        return False
    try:
        return subprocess.run(["rabbitmqctl", *args], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture
def amqp_url():
    problem = _reachable(AMQP_URL)
    if problem:
        message = f"RabbitMQ not reachable at {AMQP_URL} ({problem})"
        if os.environ.get("WALLET_REQUIRE_RABBITMQ"):
            pytest.fail(message + "; WALLET_REQUIRE_RABBITMQ is set, so this is a failure")
        pytest.skip(message + ": the RabbitMQ broker test did NOT run")
    parts = urlsplit(AMQP_URL)
    vhost = f"wallet_test_{uuid.uuid4().hex[:10]}"
    user = parts.username or "guest"
    if _rabbitmqctl("add_vhost", vhost) and _rabbitmqctl("set_permissions", "-p", vhost, user,
                                                         ".*", ".*", ".*"):
        yield urlunsplit(parts._replace(path=f"/{vhost}"))
        _rabbitmqctl("delete_vhost", vhost)
    else:
        yield AMQP_URL


def test_payment_end_to_end_over_rabbitmq(fresh_database_url, amqp_url, tmp_path):
    env = make_env(fresh_database_url, amqp_url)
    assert env["BROKER_URL"].startswith("amqp://")
    logs = tmp_path / "logs"
    started = []
    try:
        started.append(processes.start_worker(env, logs, name="rabbit-w"))
        started.append(processes.start_beat(env, logs))
        api = processes.start_api(env, logs, name="api-rabbit", workers=1)
        started.append(api)
        with httpx.Client(base_url=f"http://127.0.0.1:{api.port}", headers=AUTH, timeout=15) as http:
            assert http.get("/ready").json()["checks"] == {"database": True, "broker": True}
            buyer, seller = open_account(http, "100")["id"], open_account(http)["id"]
            ok = pay(http, buyer, seller, "60.5")
            assert wait_terminal(http, ok["id"])["status"] == "completed"
            refused = pay(http, buyer, seller, "60.5")  # only 39.5 left
            done = wait_terminal(http, refused["id"])
            assert (done["status"], done["failure_code"]) == ("failed", "insufficient_funds")
            assert Decimal(http.get(f"/accounts/{buyer}").json()["balance"]) == Decimal("39.5")
            assert Decimal(http.get(f"/accounts/{seller}").json()["balance"]) == Decimal("60.5")
        worker_log = started[0].log()
        applied = [json.loads(line) for line in worker_log.splitlines()
                   if line.startswith("{") and '"payment applied"' in line]
        assert "amqp://" in worker_log
        assert {(e["payment_id"], e["status"]) for e in applied} >= {(ok["id"], "completed")}
    finally:
        for proc in reversed(started):
            proc.stop()
