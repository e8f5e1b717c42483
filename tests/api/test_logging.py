"""JSON logs: one line per request with its request id, carried into the worker's line for the
payment; the id is accepted from X-Request-ID or generated, and returned; keys never logged."""
import json
import uuid

from tests.conftest import API_KEY
from tests.support.api import open_account, wait_terminal
from tests.support.processes import wait_until


def json_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def api_log(log_dir, api_url) -> str:
    port = api_url.rsplit(":", 1)[1]
    return (log_dir / f"api-{port}.log").read_text(errors="replace")


def test_request_id_accepted_returned_and_carried_to_the_worker(http, api_url, log_dir, worker):
    buyer, seller = open_account(http, "10"), open_account(http)
    rid = "test-" + uuid.uuid4().hex
    response = http.post("/payments", headers={"X-Request-ID": rid},
                         json={"buyer_account_id": buyer["id"], "seller_account_id": seller["id"],
                               "amount": "1.5"})
    assert response.status_code == 202
    assert response.headers["X-Request-ID"] == rid
    payment_id = response.json()["id"]
    wait_terminal(http, payment_id)

    def request_line():
        return [e for e in json_lines(api_log(log_dir, api_url))
                if e.get("event") == "request" and e.get("request_id") == rid]
    (line,) = wait_until(request_line, 10, "the API's log line for the request")
    assert (line["method"], line["path"], line["status"]) == ("POST", "/payments", 202)
    assert isinstance(line["duration_ms"], float) and line["duration_ms"] > 0
    assert line["level"] == "info" and "timestamp" in line

    def worker_line():
        return [e for e in json_lines(worker.log())
                if e.get("event") == "payment applied" and e.get("payment_id") == payment_id]
    (applied,) = wait_until(worker_line, 10, "the worker's log line for the payment")
    assert applied["request_id"] == rid
    assert applied["status"] == "completed" and applied["failure_code"] is None


def test_batch_payments_carry_their_request_id(http, api_url, log_dir, worker):
    buyer, seller = open_account(http, "10"), open_account(http)
    rid = "batch-" + uuid.uuid4().hex
    item = {"buyer_account_id": buyer["id"], "seller_account_id": seller["id"], "amount": "1"}
    for atomic in (False, True):
        response = http.post("/payments/batch", headers={"X-Request-ID": f"{rid}-{atomic}"},
                             json={"payments": [item, item], "atomic": atomic})
        assert response.status_code == 202, response.text
        ids = {p["id"] for p in response.json()["payments"]}
        for i in ids:
            wait_terminal(http, i)

        def lines():
            found = {e["payment_id"]: e for e in json_lines(worker.log())
                     if e.get("event") == "payment applied" and e.get("payment_id") in ids}
            return found if len(found) == len(ids) else None
        found = wait_until(lines, 10, "the worker's lines for the batch")
        assert {e["request_id"] for e in found.values()} == {f"{rid}-{atomic}"}


def test_request_id_generated_when_absent_or_unfit(http):
    generated = http.get("/currencies").headers["X-Request-ID"]
    assert len(generated) == 32 and int(generated, 16) >= 0
    assert http.get("/currencies").headers["X-Request-ID"] != generated
    for unfit in ("has space", "x" * 129, "quote\"d"):
        rid = http.get("/currencies", headers={"X-Request-ID": unfit}).headers["X-Request-ID"]
        assert rid != unfit and len(rid) == 32


def test_unauthorized_requests_are_logged_without_the_key(http, api_url, log_dir, worker):
    rid = "noauth-" + uuid.uuid4().hex
    wrong = "wrong-" + uuid.uuid4().hex
    r = http.get("/accounts", headers={"X-Request-ID": rid, "Authorization": f"Bearer {wrong}"})
    assert r.status_code == 401 and r.headers["X-Request-ID"] == rid

    def line():
        return [e for e in json_lines(api_log(log_dir, api_url)) if e.get("request_id") == rid]
    (entry,) = wait_until(line, 10, "the 401's log line")
    assert entry["status"] == 401
    logs = api_log(log_dir, api_url) + worker.log()
    assert API_KEY not in logs and wrong not in logs


def test_configure_logging_masks_bearer_tokens(capsys):
    import logging
    from common.logging import configure_logging
    from common.settings import Settings
    configure_logging(Settings())
    logging.getLogger("wallet.test").warning("header was Bearer abc.def-123")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    entry = json.loads(err)
    assert entry["event"] == "header was Bearer [redacted]" and "abc.def" not in err
    assert (entry["level"], entry["logger"]) == ("warning", "wallet.test")


def test_log_lines_writes_one_object_per_row_through_one_record(capsys):
    """The worker's `payment applied` lines (common.logging.log_lines): each row its own JSON line,
    with the record's fields and the row's, written line by line; one record for them all."""
    import logging
    from common.logging import configure_logging, log_lines
    from common.settings import Settings
    configure_logging(Settings())
    logger = logging.getLogger("wallet.test")
    records = []
    counter = logging.Handler()
    counter.emit = records.append
    logger.addHandler(counter)
    try:
        rows = [{"payment_id": 1, "request_id": "r-1"}, {"payment_id": 2, "request_id": None,
                                                          "note": "line\nbreak"}]
        log_lines(logger, logging.INFO, "payment applied", rows, batch_id=7)
        log_lines(logger, logging.DEBUG, "not at this level", rows)
        log_lines(logger, logging.INFO, "nothing to say", [])
    finally:
        logger.removeHandler(counter)
    lines = [json.loads(line) for line in capsys.readouterr().err.strip().splitlines()[-2:]]
    assert [(e["event"], e["payment_id"], e["request_id"], e["batch_id"], e["level"]) for e in lines] == [
        ("payment applied", 1, "r-1", 7, "info"), ("payment applied", 2, None, 7, "info")]
    assert lines[1]["note"] == "line\nbreak" and "timestamp" in lines[0]
    assert len(records) == 1
