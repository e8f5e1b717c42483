"""Webhook endpoints and the event feed through the Flask app (real PostgreSQL and Redis); the
SSRF guard at registration and at delivery, in both modes; signing; redirects; the pinned address."""
from __future__ import annotations

import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import threading

import pytest

from api import create_app
from common import webhooks
from tests.api.conftest import assert_error
from tests.conftest import AUTH, make_settings
from tests.support.receiver import Receiver

REFUSED = [
    "http://127.0.0.1/hook", "http://localhost:8080/hook", "http://10.1.2.3/", "http://172.16.0.1/",
    "http://192.168.1.1/", "http://169.254.169.254/latest/meta-data", "http://[::1]/",
    "http://[::ffff:127.0.0.1]/", "http://[::ffff:8.8.8.8]/", "http://100.64.0.1/", "http://224.0.0.1/",
    "http://0.0.0.0/", "http://240.0.0.1/", "http://[fe80::1]/", "http://[fc00::1]/",
    "http://no-such-host.invalid/", "ftp://8.8.8.8/", "file:///etc/passwd", "not a url", "http:///nohost",
    "http://user:pw@8.8.8.8/", "javascript:alert(1)",
]


@pytest.fixture(scope="module")
def guarded(database_url, broker_url):
    """The API as deployed: private addresses refused."""
    app = create_app(make_settings(database_url, broker_url, webhook_allow_private=False))
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = AUTH["Authorization"]
    yield client
    app.extensions["wallet"].db.dispose()


@pytest.mark.parametrize("url", REFUSED)
def test_registration_refuses_unsafe_urls(guarded, url):
    assert_error(guarded.post("/webhook_endpoints", json={"url": url}), 422, "validation_error")


def test_registration_accepts_a_public_address(guarded):
    r = guarded.post("/webhook_endpoints", json={"url": "https://8.8.8.8/hooks?x=1"})
    assert r.status_code == 201, r.get_json()
    assert guarded.delete(f"/webhook_endpoints/{r.get_json()['id']}").status_code == 200


def test_private_addresses_allowed_when_configured(client):
    r = client.post("/webhook_endpoints", json={"url": "http://127.0.0.1:9/x"})
    assert r.status_code == 201
    assert_error(client.post("/webhook_endpoints", json={"url": "ftp://127.0.0.1/"}), 422)


def test_endpoint_lifecycle_and_secret_shown_once(client):
    r = client.post("/webhook_endpoints", json={"url": "http://127.0.0.1:9/a", "events": ["payment.failed", "batch.finished"],
                                                "metadata": {"k": "v"}})
    assert r.status_code == 201
    created = r.get_json()
    assert set(created) == {"id", "url", "events", "secret", "metadata", "created_at"}
    assert created["secret"].startswith("whsec_") and len(created["secret"]) > 30
    assert created["events"] == ["batch.finished", "payment.failed"]
    assert r.headers["Location"] == f"/webhook_endpoints/{created['id']}"
    one = client.get(f"/webhook_endpoints/{created['id']}").get_json()
    assert one == {k: v for k, v in created.items() if k != "secret"}
    listed = client.get("/webhook_endpoints?limit=1000").get_json()
    assert created["id"] in [e["id"] for e in listed["webhook_endpoints"]]
    assert created["secret"] not in str(listed)
    assert client.get(f"/webhook_endpoints/{created['id']}/deliveries").get_json() == {"deliveries": [], "next_cursor": None}
    assert client.post("/webhook_endpoints", json={"url": "http://127.0.0.1:9/"}).get_json()["events"] == ["*"]
    assert client.delete(f"/webhook_endpoints/{created['id']}").get_json() == {"id": created["id"], "deleted": True}
    for method in ("get", "delete"):
        assert_error(getattr(client, method)(f"/webhook_endpoints/{created['id']}"), 404, "not_found")
    assert_error(client.get(f"/webhook_endpoints/{created['id']}/deliveries"), 404)


@pytest.mark.parametrize("body", [{"url": "http://127.0.0.1/", "events": ["payment.lost"]},
                                  {"url": "http://127.0.0.1/", "events": []},
                                  {"url": "http://127.0.0.1/", "secret": "mine"}, {"url": 5}, {}])
def test_endpoint_bodies_refused(client, body):
    assert_error(client.post("/webhook_endpoints", json=body), 422, "validation_error")


def test_events_feed_arguments(client):
    page = client.get("/events?limit=5").get_json()
    assert set(page) == {"events", "next_cursor"} and page["next_cursor"]
    again = client.get(f"/events?cursor={page['next_cursor']}&type=batch.finished").get_json()
    assert again["next_cursor"]
    for query in ("cursor=nonsense", "type=payment.lost", "limit=0", "limit=x"):
        assert_error(client.get(f"/events?{query}"), 400, "malformed_request")
    assert_error(client.get("/events/999999999"), 404, "not_found")


# --- delivery: the guard, signing, redirects, pinning ---

def test_signature_is_stripes_scheme():
    header = webhooks.sign("whsec_test", 1700000000, b'{"id":1}')
    import hashlib
    import hmac
    assert header == "t=1700000000,v1=" + hmac.new(b"whsec_test", b'1700000000.{"id":1}', hashlib.sha256).hexdigest()
    assert webhooks.verify("whsec_test", header, b'{"id":1}', now=1700000010)
    assert not webhooks.verify("whsec_test", header, b'{"id":2}', now=1700000010)
    assert not webhooks.verify("whsec_other", header, b'{"id":1}', now=1700000010)
    assert not webhooks.verify("whsec_test", header, b'{"id":1}', now=1700009999)  # too old


def test_delivery_refuses_private_addresses_unless_allowed():
    receiver = Receiver()
    try:
        refused = webhooks.post(receiver.url, b"{}", {}, 2, allow_private=False)
        assert refused.status is None and refused.error.startswith("refused:") and "loopback" in refused.error
        assert receiver.count() == 0  # never called
        allowed = webhooks.post(receiver.url, b'{"id": 1}', {}, 2, allow_private=True)
        assert allowed.delivered and allowed.status == 200 and receiver.count() == 1
    finally:
        receiver.close()


class _Redirect(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(302)
        self.send_header("Location", self.server.target)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_redirects_are_failures_and_not_followed():
    receiver = Receiver()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Redirect)
    server.target = receiver.url
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = webhooks.post(f"http://127.0.0.1:{server.server_address[1]}/", b'{"id": 1}', {}, 2, True)
        assert (result.status, result.error) == (302, "HTTP 302")
        assert receiver.count() == 0
    finally:
        server.shutdown()
        receiver.close()


def test_one_deadline_for_the_whole_attempt():
    receiver = Receiver(hang_first=5)
    try:
        import time
        t0 = time.monotonic()
        result = webhooks.post(receiver.url, b'{"id": 1}', {}, 0.5, True)
        assert result.error == "timeout" and time.monotonic() - t0 < 2
    finally:
        receiver.close()


def test_connection_goes_to_the_checked_address(monkeypatch):
    """The name is resolved once; the connection is made to that address (a second lookup that
    would answer something else is never made), with the name in the Host header."""
    receiver = Receiver()
    real, lookups = socket.getaddrinfo, []

    def rebinding_dns(host, port, *args, **kwargs):
        if host != "hooks.example":  # numeric addresses: the real function, no DNS involved
            return real(host, port, *args, **kwargs)
        lookups.append(host)  # first the receiver; then an address nothing listens on
        address = "127.0.0.1" if len(lookups) == 1 else "203.0.113.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding_dns)
    try:
        result = webhooks.post(f"http://hooks.example:{receiver.port}/x", b'{"id": 7}', {}, 2, True)
        assert result.delivered, result
        assert receiver.requests[0].host == f"hooks.example:{receiver.port}"
        assert lookups == ["hooks.example"]
    finally:
        receiver.close()


def test_refused_address_kinds():
    import ipaddress
    for address in ("8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"):
        assert webhooks.refused_address(ipaddress.ip_address(address)) is None
    for address in ("127.0.0.1", "10.0.0.1", "100.64.0.1", "169.254.1.1", "224.0.0.1", "0.0.0.0",
                    "240.0.0.1", "::1", "::ffff:8.8.8.8", "fe80::1", "fc00::1", "ff02::1", "::",
                    "2002:7f00:1::1"):
        assert webhooks.refused_address(ipaddress.ip_address(address)), address


def test_readme_receiver_example_verifies_our_signature():
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    code = readme.split("<!-- receiver-example -->")[1].split("```python")[1].split("```")[0]
    example: dict = {"__name__": "readme_example"}
    exec(code, example)
    example["SECRET"] = "whsec_readme"
    import time
    body = b'{"id": 1, "type": "payment.completed"}'
    assert example["verified"](webhooks.sign("whsec_readme", int(time.time()), body), body)
    assert not example["verified"](webhooks.sign("whsec_other", int(time.time()), body), body)
    assert not example["verified"](webhooks.sign("whsec_readme", int(time.time()) - 3600, body), body)
