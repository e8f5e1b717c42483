"""A real HTTP receiver of webhooks for the tests: a threaded http.server that verifies each
request's signature, records it, and answers as the test says (fail the first attempts of each
event, hang past the sender's timeout, or always fail)."""
from __future__ import annotations

import json
import threading
from collections import defaultdict
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from common.webhooks import EVENT_ID_HEADER, SIGNATURE_HEADER, verify


@dataclass
class Request:
    event_id: int
    header_event_id: str
    verified: bool
    status: int
    body: dict
    host: str


class Receiver:
    def __init__(self, fail_first: int = 0, hang_first: float = 0.0, always: int | None = None,
                 delay_s: float = 0.0):
        self.secret: str | None = None
        self.fail_first = fail_first  # answer 500 to the first n attempts of each event
        self.hang_first = hang_first  # hold the first attempt of each event this long, then 200
        self.always = always  # answer this status to everything
        self.delay_s = delay_s
        self.requests: list[Request] = []
        self._seen: dict[int, int] = defaultdict(int)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = json.loads(raw)
                with receiver._lock:
                    receiver._seen[body["id"]] += 1
                    n = receiver._seen[body["id"]]
                if receiver.delay_s:
                    receiver._stop.wait(receiver.delay_s)
                if receiver.always is not None:
                    status = receiver.always
                elif n <= receiver.fail_first:
                    status = 500
                else:
                    status = 200
                if receiver.hang_first and n == 1:
                    receiver._stop.wait(receiver.hang_first)  # the sender has given up by now
                verified = receiver.secret is not None and verify(
                    receiver.secret, self.headers.get(SIGNATURE_HEADER, ""), raw)
                with receiver._lock:
                    receiver.requests.append(Request(body["id"], self.headers.get(EVENT_ID_HEADER, ""),
                                                     verified, status, body, self.headers.get("Host", "")))
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except OSError:  # the sender hung up (timeout)
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hooks"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def delivered(self) -> set[int]:
        """Event ids answered with a 2xx."""
        with self._lock:
            return {r.event_id for r in self.requests if 200 <= r.status < 300}

    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    def close(self) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()
