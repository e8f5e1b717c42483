"""The `idle` scenario (SPEC section 12): single payments sent one at a time to an otherwise idle
system; for each, the time from sending POST /payments to the answer of the first
GET /payments/<id> that sees it terminal (polled every `poll_interval_s`), and the acceptance
time alone. A pause between payments lets the system go quiet again (the dispatcher's window and
the workers), so each one meets an idle system."""
from __future__ import annotations

import random
import time

import httpx

from bench.metrics import ms, percentile


def run(url: str, api_key: str, account_ids: list[int], rng: random.Random, count: int = 60,
        warmup: int = 5, pause_s: float = 0.3, poll_interval_s: float = 0.002) -> dict:
    completion, acceptance, polls = [], [], []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {api_key}"}, timeout=10) as c:
        for n in range(warmup + count):
            buyer, seller = rng.sample(account_ids, 2)
            started = time.perf_counter()
            r = c.post("/payments", json={"buyer_account_id": buyer, "seller_account_id": seller,
                                          "amount": "1"})
            accepted = time.perf_counter()
            r.raise_for_status()
            payment_id = r.json()["id"]
            asked = 0
            while True:
                asked += 1
                body = c.get(f"/payments/{payment_id}").json()
                if body["status"] != "pending":
                    break
                time.sleep(poll_interval_s)
            done = time.perf_counter()
            if n >= warmup:
                completion.append(done - started)
                acceptance.append(accepted - started)
                polls.append(asked)
            time.sleep(pause_s)  # quiet again before the next one (a benchmark pause, not a sync)
    completion.sort()
    acceptance.sort()

    def summary(values):
        return {"p50": ms(percentile(values, 50)), "p90": ms(percentile(values, 90)),
                "p99": ms(percentile(values, 99)), "max": ms(values[-1] if values else None)}
    return {"name": "idle", "payments": count, "pause_s": pause_s, "poll_interval_ms": poll_interval_s * 1000,
            "completion_seen_ms": summary(completion), "acceptance_latency_ms": summary(acceptance),
            "polls_per_payment_mean": round(sum(polls) / len(polls), 2) if polls else None}
