"""api/http_worker.py: the gunicorn worker that keeps serving a kept-alive connection, on a real
gunicorn with one thread, so that a thread that lingered on one connection is the only one."""
from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

from api.http_worker import ACCEPT_DEFER_S, Worker, _HeadWithBody, _readable
from scripts.procs import wait_until
from tests.support import processes

pytestmark = pytest.mark.processes  # the unit tests of _HeadWithBody below need none, but are few


@pytest.fixture(scope="module")
def one_thread_api(env, log_dir):
    proc = processes.start_api({**env, "WALLET_WEB_THREADS": "1", "WALLET_DB_POOL_SIZE": "1"},
                               log_dir, workers=1, name="api-one-thread")
    yield f"http://127.0.0.1:{proc.port}"
    proc.stop()


def test_the_api_runs_on_this_worker(one_thread_api, log_dir):
    with httpx.Client(base_url=one_thread_api, timeout=10) as client:
        assert client.get("/health").status_code == 200
    logs = "".join(p.read_text() for p in log_dir.glob("api-one-thread-*.log"))
    assert "Using worker: api.http_worker.Worker" in logs


def test_many_requests_in_a_row_on_one_connection(one_thread_api):
    with httpx.Client(base_url=one_thread_api, timeout=10) as client:
        statuses = [client.get("/health").status_code for _ in range(150)]
    assert statuses == [200] * 150


def test_pipelined_requests_are_all_answered(one_thread_api):
    # Both requests in one write: the parser reads the second with the first, so it is already
    # buffered (not readable on the socket) when the first is answered.
    request = b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n"
    with socket.create_connection(("127.0.0.1", _port(one_thread_api)), timeout=10) as sock:
        sock.sendall(request * 2 + b"GET /health HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.count(b"HTTP/1.1 200") == 3


def test_a_busy_connection_does_not_keep_the_thread_from_another(one_thread_api):
    # One client pipelines many requests on its kept-alive connection, so the only thread always
    # has its next request at hand and could serve it for ever: it must hand the connection back
    # as soon as another one waits. (How many go first is up to the GIL: the main thread, which
    # accepts the other connection, waits for it.)
    total, marker = 3000, b"HTTP/1.1 200"
    answered = 0
    started = threading.Event()
    request = b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n"
    busy = socket.create_connection(("127.0.0.1", _port(one_thread_api)), timeout=30)

    def read():
        nonlocal answered
        tail = b""
        while chunk := busy.recv(65536):
            answered += (tail + chunk).count(marker)
            tail = chunk[-(len(marker) - 1):]
            if answered >= 5:
                started.set()

    reader = threading.Thread(target=read)
    reader.start()
    writer = threading.Thread(target=busy.sendall, args=(
        request * (total - 1) + b"GET /health HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",))
    writer.start()
    try:
        assert started.wait(30)
        with httpx.Client(base_url=one_thread_api, timeout=30) as other:
            assert other.get("/health").status_code == 200
        answered_before_other = answered
    finally:
        writer.join(60)
        reader.join(60)
        busy.close()
    assert answered_before_other < total, "the other connection waited for all the busy one's requests"
    assert answered == total


def test_a_response_without_a_body_is_sent_whole(one_thread_api):
    # HEAD: gunicorn writes the head and no body, so the held head leaves when the request ends.
    with httpx.Client(base_url=one_thread_api, timeout=10) as client:
        head = client.head("/health")
        after = client.get("/health")  # same connection: nothing of the HEAD left over on it
    assert head.status_code == 200 and head.content == b""
    assert after.status_code == 200 and after.json() == {"status": "ok"}


def test_an_error_answer_has_its_head_and_body(one_thread_api):
    with httpx.Client(base_url=one_thread_api, timeout=10) as client:
        response = client.get("/payments")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"


class _RecordingSocket:
    def __init__(self):
        self.sent: list[bytes] = []

    def sendall(self, data):
        self.sent.append(bytes(data))

    def sendfile(self, file, offset=0, count=None):
        self.sent.append(b"<file>")


def test_the_head_leaves_with_the_first_body_bytes():
    sock = _RecordingSocket()
    wrapped = _HeadWithBody(sock)
    wrapped.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
    assert sock.sent == []
    wrapped.sendall(b"body")
    wrapped.sendall(b"more")
    wrapped.flush()
    assert sock.sent == [b"HTTP/1.1 200 OK\r\n\r\nbody", b"more"]


def test_a_head_alone_leaves_on_flush():
    sock = _RecordingSocket()
    wrapped = _HeadWithBody(sock)
    wrapped.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
    wrapped.flush()
    wrapped.flush()
    assert sock.sent == [b"HTTP/1.1 204 No Content\r\n\r\n"]


def test_any_other_use_of_the_socket_sends_the_head_first():
    # gunicorn's sendfile path writes the head, then hands the file to the socket itself.
    sock = _RecordingSocket()
    wrapped = _HeadWithBody(sock)
    wrapped.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
    wrapped.sendfile(None)
    wrapped.sendall(b"\r\n")
    assert sock.sent == [b"HTTP/1.1 200 OK\r\n\r\n", b"<file>", b"\r\n"]


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


# The long wait for a connection's next request (`Worker._await_next_request`), on a socket pair
# and a worker with just the fields the wait reads: no gunicorn needed.

def _lingering_worker(slots: int, long_linger_s: float = 1.0):
    worker = object.__new__(Worker)
    worker._queued_lock = threading.Lock()
    worker._queued = 0
    worker._lingering = 0
    worker._long_linger_slots = slots
    worker._long_linger_s = long_linger_s
    worker.alive = True
    return worker


class _Conn:
    def __init__(self, sock):
        self.sock = sock


@pytest.fixture
def socket_pair():
    server, client = socket.socketpair()
    yield server, client
    server.close()
    client.close()


def _send_later(sock, delay_s: float) -> threading.Timer:
    timer = threading.Timer(delay_s, sock.sendall, args=(b"GET /health HTTP/1.1\r\n\r\n",))
    timer.start()
    return timer


@pytest.mark.parametrize("slots_taken, served", [(0, True), (1, False)])
def test_only_a_thread_with_a_free_slot_waits_for_a_client_that_pauses(socket_pair, slots_taken, served):
    # The bench's paced clients send every ~80 ms: a free slot waits for the request 0.25 s later,
    # with every slot taken the short wait (LINGER_S) gives up.
    server, client = socket_pair
    worker = _lingering_worker(slots=1)
    worker._lingering = slots_taken
    timer = _send_later(client, 0.25)
    try:
        assert worker._await_next_request(_Conn(server)) is served
    finally:
        timer.join()
    assert worker._lingering == slots_taken


def _another_connection_queued(worker):
    worker._queued = 1


def _worker_stopping(worker):
    worker.alive = False


@pytest.mark.parametrize("interrupt", [_another_connection_queued, _worker_stopping])
def test_a_long_wait_gives_the_connection_back(socket_pair, interrupt):
    server, client = socket_pair
    worker = _lingering_worker(slots=1, long_linger_s=30.0)
    done = threading.Event()
    result = []

    def wait():
        result.append(worker._await_next_request(_Conn(server)))
        done.set()

    waiter = threading.Thread(target=wait)
    waiter.start()
    interrupt(worker)
    assert done.wait(5), "the waiting thread kept its idle connection"
    waiter.join()
    assert result == [False] and worker._lingering == 0


def test_a_one_thread_worker_never_waits_long():
    # gunicorn's own config object: threads=1 leaves no slot for a long wait (the only thread is
    # the reserve), 20 threads leave 16.
    from gunicorn.config import Config
    for threads, slots in ((1, 0), (2, 1), (20, 16)):
        cfg = Config()
        cfg.set("threads", threads)
        assert Worker._long_linger_slots_for(cfg) == slots


# Accepting: gunicorn's processes share one listening socket. A process that holds a connection
# for each of its long waits leaves a new one to a sibling for ACCEPT_DEFER_S.

@pytest.fixture
def listener():
    sock = socket.create_server(("127.0.0.1", 0))
    sock.setblocking(False)
    yield sock
    sock.close()


def _accepting_worker(connections: int, slots: int):
    worker = _lingering_worker(slots)
    worker.cfg = None
    worker.nr_conns = connections
    worker.enqueued = []
    worker.enqueue_req = worker.enqueued.append
    return worker


def _sibling_accepts(listener, taken: list, after_s: float) -> threading.Thread:
    """Another process of the same server: it starts looking `after_s` from now (less than
    ACCEPT_DEFER_S) and takes the first connection it finds."""
    def take():
        time.sleep(after_s)
        while True:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                time.sleep(0.0005)
                continue
            taken.append(conn)
            return
    thread = threading.Thread(target=take, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("connections, taken_here", [(2, 1), (3, 0)])
def test_a_process_without_a_long_wait_to_spare_leaves_a_new_connection_to_a_sibling(
        listener, connections, taken_here):
    """3 long-wait slots: with 2 connections the process takes the new one at once, before the
    sibling looks; with 3 it waits ACCEPT_DEFER_S, and the sibling, looking after 1 ms, takes it."""
    assert ACCEPT_DEFER_S > 0.003
    worker = _accepting_worker(connections, slots=3)
    client = socket.create_connection(listener.getsockname())
    taken: list = []
    try:
        wait_until(lambda: _readable(listener, 0), 5, "the connection to be pending")
        sibling = _sibling_accepts(listener, taken, after_s=0.001)
        worker.accept(listener)
        if taken_here:
            socket.create_connection(listener.getsockname()).close()  # lets the sibling finish
        sibling.join(5)
        assert len(worker.enqueued) == taken_here
        assert worker.nr_conns == connections + taken_here
    finally:
        client.close()
        for conn in [*taken, *(c.sock for c in worker.enqueued)]:
            conn.close()
