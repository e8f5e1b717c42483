"""The load generator: an asyncio + aiohttp client with a fixed number of concurrent
connections, each sending its next request as soon as the previous answer arrived (closed loop).

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

import aiohttp


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


async def _drive(urls: list[str], bodies: list[bytes], payments_per_request: int, api_key: str,
                 concurrency: int, duration_s: float, timeout_s: float,
                 rate: float | None = None) -> LoadResult:
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0, ttl_dns_cache=None)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    next_body = itertools.cycle(bodies).__next__
    result = LoadResult(started=time.time(), duration_s=0.0)
    records = result.requests
    errors = result.errors
    t0 = time.perf_counter()
    stop_at = t0 + duration_s

    async def one_client(url: str, index: int) -> None:
        perf = time.perf_counter
        sent = 0
        body = None  # a refused (429) body is sent again, as a client does
        while True:
            if rate:  # paced: request k of this client is due at (index + k * concurrency) / rate
                start = t0 + (index + sent * concurrency) / rate
                sent += 1
                if start >= stop_at:
                    return
                if start > perf():
                    await asyncio.sleep(start - perf())
                # Latency counts from when the request was due, not when it went out: a late
                # answer delays the next request, and that wait is latency too (no coordinated
                # omission).
            else:
                start = perf()
                if start >= stop_at:
                    return
            body = body or next_body()
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    status = response.status
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                status = 0
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            records.append((start - t0, perf() - start, status, payments_per_request))
            if status == 429:  # admission control: back off, as wrk_payments.lua does
                await asyncio.sleep(BACKOFF_S)
            else:
                body = None

    async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                     skip_auto_headers=("User-Agent",)) as session:
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
