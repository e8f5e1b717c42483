"""A tiny TCP forwarder that a test controls, to make a server unreachable for some processes only.

`TcpProxy(target)` listens on 127.0.0.1:<port> and forwards each connection to `target`: a
(host, port) pair or the path of a unix socket (the embedded PostgreSQL listens on one).
`down()` closes every forwarded connection and makes new ones close at once (the client sees
"server closed the connection unexpectedly"); `up()` forwards again; `refuse_next(n)` closes only
the next n new connections. `proxied(database_url)` gives a forwarder to a PostgreSQL server and
the URL that goes through it.
"""
from __future__ import annotations

import select
import socket
import threading


class TcpProxy:
    def __init__(self, target: tuple[str, int] | str):
        self.target = target
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._up = True
        self._refuse_next = 0
        self._closed = False
        self.refused = 0  # connections closed at once while down
        self.forwarded = 0
        threading.Thread(target=self._accept, name="tcpproxy-accept", daemon=True).start()

    # --- control ---

    def down(self) -> None:
        with self._lock:
            self._up = False
            sockets, self._open = self._open, set()
        for s in sockets:
            _close(s)

    def up(self) -> None:
        with self._lock:
            self._up = True

    def refuse_next(self, count: int) -> None:
        with self._lock:
            self._refuse_next = count

    def close(self) -> None:
        self._closed = True
        self.down()
        _close(self._listener)

    # --- forwarding ---

    def _connect_target(self) -> socket.socket:
        if isinstance(self.target, str):
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        upstream.settimeout(5)
        upstream.connect(self.target)
        upstream.settimeout(None)
        return upstream

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                up = self._up and not self._refuse_next
                self._refuse_next = max(0, self._refuse_next - 1)
            if not up:
                self.refused += 1
                _close(client)
                continue
            try:
                upstream = self._connect_target()
            except OSError:
                _close(client)
                continue
            with self._lock:
                if not self._up:  # went down meanwhile
                    _close(client)
                    _close(upstream)
                    continue
                self._open.update((client, upstream))
                self.forwarded += 1
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peer = {a: b, b: a}
        try:
            while True:
                readable, _, _ = select.select([a, b], [], [], 1.0)
                for s in readable:
                    data = s.recv(65536)
                    if not data:
                        return
                    peer[s].sendall(data)
        except (OSError, ValueError):  # closed by down()
            return
        finally:
            with self._lock:
                self._open.discard(a)
                self._open.discard(b)
            _close(a)
            _close(b)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass


def proxied(database_url: str) -> tuple[TcpProxy, str]:
    """A forwarder to the database server and the URL that goes through it."""
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    socket_dir = url.query.get("host")
    if socket_dir:  # the embedded server listens on a unix socket only
        target = f"{socket_dir}/.s.PGSQL.{url.port or 5432}"
    else:
        target = (url.host or "127.0.0.1", url.port or 5432)
    proxy = TcpProxy(target)
    through = url.set(host="127.0.0.1", port=proxy.port, query={})
    return proxy, through.render_as_string(hide_password=False)


class BlackHole:
    """A server that accepts every connection and never answers: what a hung broker looks like to
    a client (the connection opens, the request is sent, no reply ever comes). It reads and drops
    what it is sent, so the client's writes never block."""

    def __init__(self):
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port: int = self._listener.getsockname()[1]
        self.accepted = 0
        self._open: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, name="blackhole-accept", daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            self._open.append(client)
            threading.Thread(target=self._swallow, args=(client,), daemon=True).start()

    @staticmethod
    def _swallow(s: socket.socket) -> None:
        try:
            while s.recv(65536):
                pass
        except OSError:
            return

    def close(self) -> None:
        self._closed = True
        _close(self._listener)
        for s in self._open:
            _close(s)
