"""/metrics through a real gunicorn API and a real worker: the worker's counters reach it."""
import re

import httpx

from tests.conftest import AUTH
from tests.support.api import open_account, pay, wait_terminal
from tests.support.processes import wait_until


def sample(text: str, name: str, **labels) -> float | None:
    """The value of one sample of the exposition text, or None if it is absent."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
        if not m or m.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(found.get(k) == str(v) for k, v in labels.items()):
            return float(m.group(3))
    return None


def test_metrics_after_payments(http, api_url, settings):
    before = http.get("/metrics").text
    buyer, seller = open_account(http, "10"), open_account(http)
    ok = pay(http, buyer["id"], seller["id"], "4")
    poor = pay(http, buyer["id"], seller["id"], "100")
    assert wait_terminal(http, ok["id"])["status"] == "completed"
    assert wait_terminal(http, poor["id"])["failure_code"] == "insufficient_funds"

    def counted():
        text = http.get("/metrics").text
        done = sample(text, "wallet_payments_completed_total", task="wallet.apply_payments") or 0
        failed = sample(text, "wallet_payments_failed_total", failure_code="insufficient_funds") or 0
        was_done = sample(before, "wallet_payments_completed_total", task="wallet.apply_payments") or 0
        was_failed = sample(before, "wallet_payments_failed_total", failure_code="insufficient_funds") or 0
        return text if done >= was_done + 1 and failed >= was_failed + 1 else None
    # The worker writes its counters after its commit; the payment is visible as terminal first.
    text = wait_until(counted, 10, "the worker's counters in /metrics")

    response = http.get("/metrics")
    assert response.headers["Content-Type"].startswith("text/plain")
    accepted = sample(text, "wallet_payments_accepted_total", kind="single")
    assert accepted is not None and accepted >= 2 + (sample(before, "wallet_payments_accepted_total",
                                                            kind="single") or 0)
    assert (sample(text, "wallet_apply_duration_seconds_count", task="wallet.apply_payments") or 0) >= 1
    assert sample(text, "wallet_apply_duration_seconds_bucket", task="wallet.apply_payments", le="+Inf") >= 1
    assert sample(text, "wallet_http_requests_total", method="POST", route="/payments", status="202") >= 2
    assert sample(text, "wallet_http_requests_total", method="GET",
                  route="/payments/<id:payment_id>", status="200") >= 1
    assert sample(text, "wallet_http_request_duration_seconds_count", method="POST", route="/payments") >= 2
    # Queue depth per payment queue, read from Redis at scrape time (the worker keeps them near 0).
    for k in range(settings.queues):
        assert sample(text, "wallet_queue_depth", queue=f"payments.{k}") is not None
    assert sample(text, "wallet_broker_up") == 1


def test_unmatched_paths_share_one_label(http):
    http.get("/no/such/path/12345")
    text = http.get("/metrics").text
    assert sample(text, "wallet_http_requests_total", method="GET", route="unmatched", status="404") >= 1
    assert "/no/such/path" not in text


def test_metrics_need_the_api_key(api_url):
    assert httpx.get(f"{api_url}/metrics").status_code == 401
    assert httpx.get(f"{api_url}/metrics", headers=AUTH).status_code == 200
