"""gunicorn's gthread worker, with a thread that keeps serving its kept-alive connection.

In gthread (gunicorn 27), every request on a kept-alive connection makes a round trip through
the worker's main thread: the answering thread hands the connection back through a pipe, the
main thread registers it with its selector, sees it readable, unregisters it and submits it to
the thread pool again (a Future and a done-callback each time). With the bench's single
payments the main thread held the GIL 30 % of the API process's time (py-spy --gil,
bench/NOTES.md), and each hand-off waits for the GIL.

Here a thread that has answered waits for the same connection's next request and serves it
itself, for as long as the client keeps sending and no other connection waits for a thread;
otherwise the connection goes back to the main thread as before. How long it waits depends on
how many threads wait so: all but a fifth of the threads (`LINGER_RESERVE_SHARE`) may wait up to
`LONG_LINGER_S` (in slices of `LINGER_SLICE_S`, giving the connection back at the end of a slice
if another connection is queued or the worker stops); the rest wait `LINGER_S`. So a connection
whose client pauses between requests (the bench's `paced`: ~80 ms) keeps its thread, and its
next request costs one wake-up of that thread instead of the main thread's poll, a hand-off
through the pool's queue and a Future; the reserved threads never wait long, so a new or queued
connection always finds one. It changes who serves a request, never whether or in what order:
one connection's requests are still served one after another, and a queued connection waits at
most one request (or `LINGER_SLICE_S`) more than in gthread. A stopping worker (`alive` false,
max_requests included) lets go after the request in hand.

A process that already holds a connection for each of its long waits (`_long_linger_slots`)
accepts a new one only after `ACCEPT_DEFER_S`: gunicorn's processes share one listening socket
and whichever wakes first takes the connection, so 32 connections opened at once were seen split
0 / 32, 4 / 28 and 8 / 24 between two processes, the one holding them all bound by its own GIL
while the other idled (bench/NOTES.md, 2026-12-03 midday). A sibling with room takes it
meanwhile; if none does, this process takes it after the pause.

It also sends each response's head and body in one `send` instead of two (gunicorn writes the
head as soon as the body's first chunk is due): one TCP segment, and one wake-up of the client,
fewer per response; ~0.04-0.07 ms less of an API process's CPU a request (bench/NOTES.md,
2026-12-02 late).
"""
from __future__ import annotations

import select
import threading
import time

from gunicorn.workers.gthread import ThreadWorker

# How long an answering thread waits for its connection's next request when the long waits are
# all taken. A client in a closed loop (the bench, a batch uploader) sends it within a fraction
# of a millisecond.
LINGER_S = 0.002
# The long wait, for all but the reserved threads at once; never longer than
# gunicorn's keepalive. A blocked thread costs no CPU; each slice costs one wake-up.
LONG_LINGER_S = 1.0
LINGER_SLICE_S = 0.1
# Threads that never wait long: a new connection, or one handed back, always finds one of them.
LINGER_RESERVE_SHARE = 0.2
# After a wait in vain, the next this many requests of that connection go straight back to the
# main thread: a client that sends now and then would otherwise cost a thread wake-up (and a
# GIL hand-off) per request for nothing.
SKIP_AFTER_IN_VAIN = 8
# How long a process with no long wait to spare leaves a new connection to its siblings.
ACCEPT_DEFER_S = 0.005


class Worker(ThreadWorker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._queued = 0  # connections submitted to the pool and not yet taken by a thread
        self._queued_lock = threading.Lock()
        self._long_linger_slots = self._long_linger_slots_for(self.cfg)
        self._long_linger_s = min(LONG_LINGER_S, self.cfg.keepalive or 0)
        self._lingering = 0  # threads in a long wait now (under _queued_lock)

    @staticmethod
    def _long_linger_slots_for(cfg) -> int:
        threads = cfg.threads
        return threads - max(1, round(threads * LINGER_RESERVE_SHARE))

    def accept(self, listener):
        if self.nr_conns >= max(1, self._long_linger_slots):
            # In the main thread: its selector waits too, for no longer than a request's
            # network round trip; it happens only while connections are being opened.
            time.sleep(ACCEPT_DEFER_S)
        super().accept(listener)  # a connection a sibling took meanwhile is EAGAIN, ignored

    def enqueue_req(self, conn):
        with self._queued_lock:
            self._queued += 1
        super().enqueue_req(conn)

    def handle_request(self, req, conn):
        sock = conn.sock
        conn.sock = _HeadWithBody(sock)
        try:
            return super().handle_request(req, conn)
        finally:
            conn.sock.flush()
            conn.sock = sock

    def handle(self, conn):
        with self._queued_lock:
            self._queued -= 1
        while True:
            keepalive = super().handle(conn)
            if keepalive is not True or conn.is_http2 or not self.alive or self._queued:
                return keepalive
            if conn.parser.unreader.buf.getvalue():
                continue  # the next request is read already
            skip = getattr(conn, "wallet_skip_linger", 0)
            if skip:
                conn.wallet_skip_linger = skip - 1
                return keepalive
            if not self._await_next_request(conn):
                conn.wallet_skip_linger = SKIP_AFTER_IN_VAIN
                return keepalive

    def _await_next_request(self, conn) -> bool:
        """Whether the connection's next request arrived while this thread waited for it."""
        with self._queued_lock:
            long_wait = self._long_linger_s > 0 and self._lingering < self._long_linger_slots
            if long_wait:
                self._lingering += 1
        if not long_wait:
            return _readable(conn.sock, LINGER_S)
        try:
            waited = 0.0
            while waited < self._long_linger_s:
                if _readable(conn.sock, LINGER_SLICE_S):
                    return True
                waited += LINGER_SLICE_S
                if self._queued or not self.alive:
                    return False
            return False
        finally:
            with self._queued_lock:
                self._lingering -= 1


def _readable(sock, timeout_s: float) -> bool:
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(timeout_s * 1000))


class _HeadWithBody:
    """The connection's socket while one response is written: the response's first `sendall`,
    its head (gunicorn's Response writes the status line and headers before any body byte), is
    held and sent with the next one. Anything else asked of the socket (`send`, `sendfile`,
    `fileno`, ...) sends what is held first, so bytes always leave in the order written."""

    __slots__ = ("_sock", "_held", "_first")

    def __init__(self, sock):
        self._sock = sock
        self._held = b""
        self._first = True

    def sendall(self, data):
        if self._first:
            self._first = False
            self._held = bytes(data)
            return
        if self._held:
            data, self._held = self._held + data, b""
        self._sock.sendall(data)

    def flush(self):
        if self._held:
            held, self._held = self._held, b""
            self._sock.sendall(held)

    def __getattr__(self, name):
        self.flush()
        self._first = False
        return getattr(self._sock, name)
