"""The Dispatcher's grouping of committed payments into messages (the Sender is a recorder here;
the real Sender to a real broker is exercised by the end-to-end tests)."""
from __future__ import annotations

import threading
import time

from common.logging import request_id_var
from common.messaging import Dispatcher


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
