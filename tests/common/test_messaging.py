"""The Dispatcher's grouping of committed payments into messages (the Sender is a recorder here;
the real Sender to a real broker is exercised by the end-to-end tests), and what a message says of
its ids."""
from __future__ import annotations

import base64
import json
import threading
import time
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from celery.utils.saferepr import saferepr

from common import routing
from common.logging import request_id_var
from common.messaging import ARGSREPR_MAX_CHARS, Dispatcher, Sender, make_celery
from tests.conftest import make_settings


class RecordingSender:
    def __init__(self, fail_first: bool = False):
        self.calls: list[tuple[list, dict]] = []
        self._fail = fail_first
        self.changed = threading.Condition()

    def send_payments(self, payments, request_ids=None):
        with self.changed:
            if self._fail:
                self._fail = False
                self.changed.notify_all()
                raise ConnectionError("broker down")
            self.calls.append((list(payments), dict(request_ids or {})))
            self.changed.notify_all()

    def wait_for(self, count: int, timeout: float = 5.0) -> list:
        with self.changed:
            assert self.changed.wait_for(lambda: sum(len(p) for p, _ in self.calls) >= count, timeout), self.calls
            return list(self.calls)


def test_an_idle_dispatcher_sends_at_once_then_gathers_under_load():
    """Idle: no window (the payment goes at once). Right after a send, what comes is gathered for
    the window since that send, and goes in one send."""
    sender = RecordingSender()
    dispatcher = Dispatcher(sender, window_ms=2000)
    started = time.monotonic()
    dispatcher.submit([(1, 1, 2)])
    sender.wait_for(1)
    first = time.monotonic() - started
    assert first < 1.0, first  # a whole window would be 2 s
    dispatcher.submit([(2, 1, 2)])
    dispatcher.submit([(3, 1, 2)])
    calls = sender.wait_for(3)
    second = time.monotonic() - started
    assert [[p[0] for p in payments] for payments, _ in calls] == [[1], [2, 3]]
    assert second >= 1.9, second  # gathered until a window after the first send


def test_payments_of_several_requests_share_one_send():
    sender = RecordingSender()
    dispatcher = Dispatcher(sender, window_ms=200)
    dispatcher.submit([(100, 1, 2)])  # the first after a quiet spell goes alone, at once
    sender.wait_for(1)
    sender.calls.clear()
    for n in range(1, 11):
        token = request_id_var.set(f"req-{n}")
        dispatcher.submit([(n, n, n + 100)])
        request_id_var.reset(token)
    calls = sender.wait_for(10)
    assert len(calls) == 1  # all ten came within one window
    payments, request_ids = calls[0]
    assert [p[0] for p in payments] == list(range(1, 11))
    assert request_ids == {n: f"req-{n}" for n in range(1, 11)}


def test_a_send_is_split_at_max_ids():
    sender = RecordingSender()
    dispatcher = Dispatcher(sender, window_ms=100, max_ids=4)
    dispatcher.submit([(n, 1, 2) for n in range(1, 11)])
    calls = sender.wait_for(10)
    assert [len(p) for p, _ in calls] == [4, 4, 2]


def test_a_quiet_dispatcher_sends_within_the_window():
    sender = RecordingSender()
    dispatcher = Dispatcher(sender, window_ms=20)
    dispatcher.submit([(1, 1, 2)])
    sender.wait_for(1)
    started = time.monotonic()
    dispatcher.submit([(2, 1, 2)])
    calls = sender.wait_for(2)
    assert len(calls) == 2 and calls[1][0] == [(2, 1, 2)]
    assert time.monotonic() - started < 2  # woken again by the first payment after the quiet spell


def test_a_failed_send_does_not_stop_the_dispatcher():
    sender = RecordingSender(fail_first=True)
    dispatcher = Dispatcher(sender, window_ms=10)
    dispatcher.submit([(1, 1, 2)])
    with sender.changed:  # the first send raised; the thread is still alive
        assert sender.changed.wait_for(lambda: not sender._fail, 5)
    dispatcher.submit([(2, 1, 2)])
    assert sender.wait_for(1)[0][0] == [(2, 1, 2)]


@pytest.mark.parametrize("count", [3, 400])
def test_a_message_shows_its_ids_as_celery_would(broker_url, count):
    """Flower and the workers' logs show a message's arguments from its `argsrepr` header, which the
    Sender writes itself (Celery's saferepr costs ~0.24 ms for 100 ids): the same text as saferepr
    for a short list, cut at 1,024 characters for a long one. Read off a real Redis."""
    url = urlunsplit(urlsplit(broker_url)._replace(path="/11"))
    if not url.startswith("redis"):
        pytest.skip("reads the message off a Redis broker")
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        settings = make_settings("postgresql://unused@127.0.0.1/none", url)
        sender = Sender(make_celery(settings, publisher=True), settings)
        sender._queues = 1
        ids = list(range(10_000, 10_000 + count))
        assert sender.send_payments([(i, 1, 2) for i in ids]) == 1
        message = json.loads(client.lpop(routing.queue_name(0)))
        shown = message["headers"]["argsrepr"]
        assert len(shown) <= ARGSREPR_MAX_CHARS
        if count == 3:
            assert shown == saferepr([ids], ARGSREPR_MAX_CHARS) == "[[10000, 10001, 10002]]"
        else:
            assert shown.startswith("[[10000, 10001, ") and shown.endswith("...")
        assert json.loads(base64.b64decode(message["body"]))[0] == [ids]
    finally:
        client.flushdb()
