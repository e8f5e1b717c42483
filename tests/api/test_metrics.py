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


def test_backlog_gauges_read_at_scrape_time(fresh_database_url, broker_url):
    """wallet_payments_pending and wallet_oldest_pending_age_seconds come from PostgreSQL when
    scraped (no worker runs on this database: what is accepted stays pending)."""
    from sqlalchemy import text as sql

    from api import create_app
    from tests.conftest import make_settings

    app = create_app(make_settings(fresh_database_url, broker_url))
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = AUTH["Authorization"]
    db = app.extensions["wallet"].db
    try:
        text = client.get("/metrics").get_data(as_text=True)
        assert sample(text, "wallet_payments_pending") == 0
        assert sample(text, "wallet_oldest_pending_age_seconds") == 0
        assert sample(text, "wallet_database_up") == 1
        buyer, seller = open_account(client, "10"), open_account(client)
        ids = [pay(client, buyer["id"], seller["id"], "1")["id"] for _ in range(3)]
        def age(s):
            s.execute(sql("UPDATE payments SET created_at = now() - interval '120 seconds' WHERE id = :id"),
                      {"id": ids[0]})
        db.unit_of_work(age)
        text = client.get("/metrics").get_data(as_text=True)
        assert sample(text, "wallet_payments_pending") == 3
        assert 120 <= sample(text, "wallet_oldest_pending_age_seconds") < 180
        def fail_oldest(s):
            s.execute(sql("UPDATE payments SET status = 'failed', failure_code = 'insufficient_funds',"
                          " completed_at = now() WHERE id = :id"), {"id": ids[0]})
        db.unit_of_work(fail_oldest)
        text = client.get("/metrics").get_data(as_text=True)
        assert sample(text, "wallet_payments_pending") == 2
        assert sample(text, "wallet_oldest_pending_age_seconds") < 60
        # Cheap however many payments are done: the scrape reads open_payments, and payments only
        # by primary key.
        from api.metrics import BacklogCollector
        def done_ones(s):
            s.execute(sql(
                "INSERT INTO payments (buyer_account_id, seller_account_id, currency_id, amount,"
                " status, completed_at, amount_captured) SELECT :b, :s, 1, 1, 'completed', now(), 1"
                " FROM generate_series(1, 20000)"), {"b": buyer["id"], "s": seller["id"]})
            s.execute(sql("ANALYZE payments"))
            s.execute(sql("ANALYZE open_payments"))
        db.unit_of_work(done_ones)
        with db.read() as s:
            plan = "\n".join(s.execute(sql("EXPLAIN " + BacklogCollector.SQL.text)).scalars())
        assert "Seq Scan on payments" not in plan and "payments_pkey" in plan, plan
    finally:
        db.dispose()


def test_sweeper_last_run_reaches_metrics(http, settings):
    """The worker's sweep records when it ran; the API's /metrics shows it (multiprocess mode)."""
    import time

    from common.messaging import DEFAULT_QUEUE, SWEEP, make_celery

    started = time.time()
    make_celery(settings).send_task(SWEEP, queue=DEFAULT_QUEUE)

    def swept():
        value = sample(http.get("/metrics").text, "wallet_sweeper_last_run_timestamp_seconds")
        return value if value is not None and value >= started else None
    assert wait_until(swept, 20, "the sweeper's last run in /metrics") <= time.time()
