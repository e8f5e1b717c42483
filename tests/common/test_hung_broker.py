"""A broker that accepts connections and never answers (tests.support.tcpproxy.BlackHole): every
publish gives up within its explicit timeout, no request thread ever publishes (atomic batches go
through the dispatcher too), and what the dispatcher holds is capped (the sweeper has the rest:
the payments are committed). Real PostgreSQL; the broker is the black hole."""
from __future__ import annotations

import time

import pytest
from sqlalchemy import text

from api import create_app
from common.messaging import Dispatcher, Sender, make_celery
from tests.conftest import AUTH, make_settings
from tests.support.processes import wait_until
from tests.support.tcpproxy import BlackHole


@pytest.fixture
def hole():
    server = BlackHole()
    yield server
    server.close()


def test_a_publish_to_a_hung_broker_gives_up_within_its_timeout(hole):
    settings = make_settings("postgresql://unused@127.0.0.1/none", hole.url)
    sender = Sender(make_celery(settings, publisher=True), settings)
    for send in (lambda: sender.send_payments([(1, 1, 2)]), lambda: sender.send_atomic_batch(7)):
        started = time.monotonic()
        with pytest.raises(Exception):
            send()
        elapsed = time.monotonic() - started
        assert hole.accepted >= 1
        # The publish timeout (0.5 s), one retry, connecting: well under the 2 s allowed here.
        assert elapsed < 2.0, elapsed


def test_the_api_answers_while_the_broker_hangs(fresh_database_url, hole):
    app = create_app(make_settings(fresh_database_url, hole.url))
    client = app.test_client()
    wallet = app.extensions["wallet"]
    try:
        a = client.post("/accounts", json={"name": "a", "amount": "10", "currency_id": 1}, headers=AUTH).get_json()
        b = client.post("/accounts", json={"name": "b", "amount": "0", "currency_id": 1}, headers=AUTH).get_json()
        one = {"buyer_account_id": a["id"], "seller_account_id": b["id"], "amount": "1"}
        for path, body in (("/payments", one), ("/payments/batch", {"payments": [one, one], "atomic": True}),
                           ("/payments/batch", {"payments": [one, one]}), ("/payments", one)):
            started = time.monotonic()
            response = client.post(path, json=body, headers=AUTH)
            assert response.status_code == 202, response.get_json()
            # The request never waits for the broker (its commit and answer only).
            assert time.monotonic() - started < 1.0, path
        wait_until(lambda: hole.accepted >= 1, 10, "the dispatcher to try the broker")
        with wallet.db.read() as s:
            assert s.execute(text("SELECT count(*) FROM payments WHERE status = 'pending'")).scalar_one() == 6
    finally:
        wallet.db.dispose()


def test_the_dispatcher_holds_at_most_its_cap(hole):
    settings = make_settings("postgresql://unused@127.0.0.1/none", hole.url)
    dispatcher = Dispatcher(Sender(make_celery(settings, publisher=True), settings), window_ms=50,
                            max_held=100)
    dispatcher.submit([(1, 1, 2)])  # the thread starts publishing it, and hangs on the broker
    wait_until(lambda: hole.accepted >= 1, 10, "the dispatcher to try the broker")
    for n in range(2, 1000):
        dispatcher.submit([(n, 1, 2)])
    dispatcher.submit_atomic_batch(5)
    assert dispatcher.held() <= 100
    assert dispatcher.dropped >= 1000 - 100 - 1
