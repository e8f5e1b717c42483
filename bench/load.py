"""The Python load generator: asyncio, a fixed number of kept-alive HTTP/1.1 connections, each
sending its next request as soon as the previous answer arrived (closed loop), or on a schedule
(paced).

Request bodies are encoded before the clock starts, so the client spends its CPU on HTTP only;
its own CPU time (getrusage of this process over the run) is reported next to the results.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import random
import resource
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit



@dataclass
class LoadResult:
    started: float            # time.time() when the first request went out
    duration_s: float         # wall time of the load (until the last answer came back)
    # per request: (start offset s, latency s, http status or 0 for a client error, payments)
    requests: list[tuple[float, float, int, int]] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)  # exception class -> count
    cpu_s: float = 0.0        # this process's user+system CPU during the load

    def in_window(self, lo: float, hi: float):
        """Requests answered inside [lo, hi) seconds after the start."""
        return [r for r in self.requests if lo <= r[0] + r[1] < hi]


def single_bodies(account_ids: list[int], count: int, hot_buyer: int | None,
                  rng: random.Random) -> list[bytes]:
    bodies = []
    for _ in range(count):
        buyer = hot_buyer if hot_buyer is not None else rng.choice(account_ids)
        seller = rng.choice(account_ids)
        while seller == buyer:
            seller = rng.choice(account_ids)
        bodies.append(json.dumps({"buyer_account_id": buyer, "seller_account_id": seller,
                                  "amount": f"{rng.randint(1, 100) / 100:.2f}"}).encode())
    return bodies


def batch_bodies(account_ids: list[int], count: int, size: int, rng: random.Random) -> list[bytes]:
    bodies = []
    for _ in range(count):
        items = []
        for _ in range(size):
            buyer, seller = rng.sample(account_ids, 2)
            items.append({"buyer_account_id": buyer, "seller_account_id": seller,
                          "amount": f"{rng.randint(1, 100) / 100:.2f}"})
        bodies.append(json.dumps({"payments": items, "atomic": False}).encode())
    return bodies


class _Connection:
    """One kept-alive HTTP/1.1 connection, as lean as a client can be in Python: the request
    bytes are built before the clock starts, the answer is read by its Content-Length. The
    aiohttp client it replaced took 0.34-0.47 ms of CPU a request at `paced` (this one 0.18-0.26),
    0.17-0.20 of the machine's two cores, taken from the system it measures (bench/NOTES.md,
    2026-12-02 late)."""

    def __init__(self, host: str, port: int):
        self._host, self._port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(self, data: bytes) -> int:
        """Send one request; its status once the whole answer is read."""
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self._host, self._port)
        try:
            self._writer.write(data)
            head = await self._reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length, close, chunked = _framing(head)
            if chunked:
                await _read_chunked(self._reader)
            else:
                await self._reader.readexactly(length)
        except BaseException:
            self.close()
            raise
        if close:
            self.close()
        return status

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


def _framing(head: bytes) -> tuple[int, bool, bool]:
    """(Content-Length, Connection: close?, chunked?) of a response head."""
    length, close, chunked = 0, False, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection":
            close = value.strip().lower() == b"close"
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
    return length, close, chunked


async def _read_chunked(reader: asyncio.StreamReader) -> None:
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        await reader.readexactly(size + 2)  # the chunk and its CRLF
        if size == 0:
            return


def _request_bytes(url: str, body: bytes, api_key: str) -> bytes:
    parts = urlsplit(url)
    return (f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Authorization: Bearer {api_key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def _drive(urls: list[str], bodies: list[bytes], payments_per_request: int, api_key: str,
                 concurrency: int, duration_s: float, timeout_s: float,
                 rate: float | None = None) -> LoadResult:
    requests = {url: [_request_bytes(url, body, api_key) for body in bodies] for url in urls}
    result = LoadResult(started=time.time(), duration_s=0.0)
    records = result.requests
    errors = result.errors
    t0 = time.perf_counter()
    stop_at = t0 + duration_s

    async def one_client(url: str, index: int) -> None:
        perf = time.perf_counter
        parts = urlsplit(url)
        conn = _Connection(parts.hostname, parts.port)
        next_request = itertools.cycle(requests[url]).__next__
        sent = 0
        data = None  # a refused (429) request is sent again, as a client does
        while True:
            if rate:  # paced: request k of this client is due at (index + k * concurrency) / rate
                start = t0 + (index + sent * concurrency) / rate
                sent += 1
                if start >= stop_at:
                    break
                if start > perf():
                    await asyncio.sleep(start - perf())
                # Latency counts from when the request was due, not when it went out: a late
                # answer delays the next request, and that wait is latency too (no coordinated
                # omission).
            else:
                start = perf()
                if start >= stop_at:
                    break
            data = data or next_request()
            try:
                async with asyncio.timeout(timeout_s):  # no Task per request, unlike wait_for
                    status = await conn.request(data)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError,
                    asyncio.TimeoutError) as exc:
                status = 0
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            records.append((start - t0, perf() - start, status, payments_per_request))
            if status == 429:  # admission control: back off, as wrk_payments.lua does
                await asyncio.sleep(BACKOFF_S)
            else:
                data = None
        conn.close()

    await asyncio.gather(*(one_client(urls[i % len(urls)], i) for i in range(concurrency)))
    result.duration_s = time.perf_counter() - t0
    return result


BACKOFF_S = 0.1  # after a 429, before the next request (bench/wrk_payments.lua: BACKOFF_MS)


def run_load(urls: list[str], bodies: list[bytes], payments_per_request: int, api_key: str,
             concurrency: int, duration_s: float, timeout_s: float = 30.0,
             rate: float | None = None) -> LoadResult:
    """Closed loop (each connection sends again as soon as it is answered), or with `rate`,
    paced: `rate` requests per second in all, spread evenly over the connections."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    result = asyncio.run(_drive(urls, bodies, payments_per_request, api_key, concurrency,
                                duration_s, timeout_s, rate))
    after = resource.getrusage(resource.RUSAGE_SELF)
    result.cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result
