"""Webhooks: endpoints, the SSRF guard, signing, fan-out, delivery attempts and their sweeper.

The rows are the record (SPEC section 10): a delivery is a row per (endpoint, event), made by the
fan-out, which follows the event feed with a cursor of its own (`webhook_fanout`), so deciding who
gets what costs the payment transaction nothing. A Celery message only says "attempt these
deliveries now"; the sweeper (`sweep_deliveries`) sends again every delivery that is due and whose
message was lost (broker flushed, worker killed), and every retry whose backoff is longer than
any countdown we allow on a message (a countdown past Redis's visibility timeout would run twice).

An attempt takes a lease on its row (one short transaction), POSTs with no transaction open (a
row lock would hold back the event feed's horizon for up to the timeout), then records the outcome
(another short transaction). At least once: a receiver de-duplicates on the event id.
"""
from __future__ import annotations

import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import text
from sqlalchemy.orm import Session

from common import metrics
from common.db import Database
from common.errors import NotFound, ValidationFailed
from common.ledger.events import EVENT_TYPES, event_document
from common.settings import Settings

log = logging.getLogger("wallet.webhooks")

ALL_EVENTS = "*"
SECRET_PREFIX = "whsec_"
SIGNATURE_HEADER = "Wallet-Signature"
EVENT_ID_HEADER = "Wallet-Event-Id"
MAX_URL_LENGTH = 2048
# Retries further out than this are not put on a message (ETA tasks beyond the Redis visibility
# timeout, an hour, run twice): the sweeper sends them when they are due.
MAX_COUNTDOWN_SECONDS = 600
LEASE_MARGIN_SECONDS = 5  # an attempt's lease: twice the timeout plus this (then it may be re-sent)
FANOUT_PAGE = 1000
FANOUT_PAGES = 20  # per run
SWEEP_LIMIT = 1000

Send = Callable[[Sequence[int], float | None], None]  # (delivery ids, countdown seconds)


class UnsafeUrl(ValidationFailed):
    """The URL may not be called: not http(s), or its host does not resolve or resolves to an
    address we refuse (SSRF)."""


# --- the SSRF guard ---

_CGNAT = ipaddress.ip_network("100.64.0.0/10")


def refused_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why a connection to `ip` is refused, or None when it is a public address."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return "an IPv4-mapped address"
        embedded = ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None and refused_address(embedded):
            return "a tunnel to a refused address"
    for kind, test in (("loopback", ip.is_loopback), ("private", ip.is_private),
                       ("link-local", ip.is_link_local), ("multicast", ip.is_multicast),
                       ("unspecified", ip.is_unspecified), ("reserved", ip.is_reserved),
                       ("carrier-grade NAT", isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT),
                       ("site-local", isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local),
                       ("not globally routable", not ip.is_global)):
        if test:
            return f"a {kind} address"
    return None


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int
    path: str  # path and query, as sent in the request line


def parse_url(url: object) -> Target:
    """Only the URL's shape: http or https, a host, no credentials."""
    if not isinstance(url, str) or not 1 <= len(url) <= MAX_URL_LENGTH or not url.isascii() \
            or any(ch.isspace() or not ch.isprintable() for ch in url):
        raise UnsafeUrl(f"url must be an http or https URL of at most {MAX_URL_LENGTH} characters",
                        {"field": "url"})
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise UnsafeUrl("url is not a valid URL", {"field": "url"}) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnsafeUrl("url must be an http or https URL with a host", {"field": "url"})
    if parts.username is not None or parts.password is not None:
        raise UnsafeUrl("url must not carry credentials", {"field": "url"})
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80), path)


def resolve(target: Target, allow_private: bool) -> str:
    """The address to connect to (checked, then pinned: the connection goes to this address, not
    to whatever a second lookup might answer)."""
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as exc:
        raise UnsafeUrl(f"url's host {target.host} does not resolve", {"field": "url", "reason": str(exc)[:200]}) from None
    addresses = [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]
    if not addresses:
        raise UnsafeUrl(f"url's host {target.host} does not resolve", {"field": "url"})
    if not allow_private:
        for ip in addresses:
            why = refused_address(ip)
            if why:
                raise UnsafeUrl(f"url's host {target.host} resolves to {why} ({ip})",
                                {"field": "url", "address": str(ip)})
    return str(addresses[0])


def check_url(url: object, allow_private: bool) -> Target:
    """At registration: the URL's shape, and (unless private addresses are allowed) where it goes."""
    target = parse_url(url)
    if not allow_private:
        resolve(target, allow_private=False)
    return target


# --- signing and sending ---

def sign(secret: str, timestamp: int, body: bytes) -> str:
    """`t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`, Stripe's scheme."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(secret: str, header: str, body: bytes, tolerance_s: float = 300, now: float | None = None) -> bool:
    """What a receiver does (the README's example is this function)."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    expected = sign(secret, timestamp, body).split("v1=", 1)[1]
    return any(hmac.compare_digest(expected, value) for key, value in
               (part.split("=", 1) for part in header.split(",") if "=" in part) if key == "v1")


class _Pinned:
    """http.client connections to the checked address, with SNI and certificate checks against the
    URL's host name for https."""

    class HTTP(http.client.HTTPConnection):
        def __init__(self, address: str, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.address = address
            self.raw: socket.socket | None = None

        def connect(self):
            self.sock = self.raw = socket.create_connection((self.address, self.port), self.timeout)

    class HTTPS(http.client.HTTPSConnection):
        def __init__(self, address: str, *args, **kwargs):
            super().__init__(*args, context=ssl.create_default_context(), **kwargs)
            self.address = address
            self.raw: socket.socket | None = None

        def connect(self):
            self.raw = socket.create_connection((self.address, self.port), self.timeout)
            self.sock = self._context.wrap_socket(self.raw, server_hostname=self.host)


@dataclass(frozen=True)
class Result:
    status: int | None  # the HTTP status, None when there was none
    error: str | None  # why it failed, None when delivered

    @property
    def delivered(self) -> bool:
        return self.error is None


def post(url: str, body: bytes, headers: Mapping[str, str], timeout_s: float, allow_private: bool) -> Result:
    """One attempt: a 2xx within `timeout_s` (one deadline for resolving, connecting, sending and
    reading the answer's head) is delivered; redirects are not followed."""
    deadline = time.monotonic() + timeout_s
    try:
        target = parse_url(url)
        address = resolve(target, allow_private)
    except UnsafeUrl as exc:
        return Result(None, f"refused: {exc.message}")
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return Result(None, "timeout")
    kind = _Pinned.HTTPS if target.scheme == "https" else _Pinned.HTTP
    conn = kind(address, target.host, target.port, timeout=remaining)
    timed_out = threading.Event()

    def abort():  # the deadline: whatever the connection is blocked in, it ends now
        timed_out.set()
        if conn.raw is not None:
            try:
                conn.raw.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    timer = threading.Timer(remaining, abort)
    timer.daemon = True
    timer.start()
    try:
        conn.request("POST", target.path, body=body, headers=dict(headers))
        response = conn.getresponse()
        status = response.status
    except Exception as exc:  # refused, reset, TLS, timeout, garbage: all are failed attempts
        if timed_out.is_set() or isinstance(exc, (TimeoutError, socket.timeout)):
            return Result(None, "timeout")
        return Result(None, f"{type(exc).__name__}: {exc}"[:500])
    finally:
        timer.cancel()
        conn.close()
    if timed_out.is_set():
        return Result(status, "timeout")
    if 200 <= status < 300:
        return Result(status, None)
    return Result(status, f"HTTP {status}")


# --- endpoints ---

ENDPOINT_COLUMNS = "id, url, events, metadata, created_at"


def create_endpoint(session: Session, url: str, events: Sequence[str] | None,
                    metadata: Mapping[str, str] | None, allow_private: bool) -> tuple[Mapping[str, Any], str]:
    """Returns (endpoint row, secret): the secret is shown once, in the creation's answer."""
    check_url(url, allow_private)
    types = sorted(set(events)) if events else [ALL_EVENTS]
    unknown = [t for t in types if t not in (*EVENT_TYPES, ALL_EVENTS)]
    if unknown or (ALL_EVENTS in types and len(types) > 1):
        raise ValidationFailed(f"events must be {ALL_EVENTS!r} or a list of {', '.join(EVENT_TYPES)}",
                               {"field": "events", "unknown": unknown})
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    row = session.execute(text(
        "INSERT INTO webhook_endpoints (url, events, secret, metadata)"
        " VALUES (:url, CAST(:events AS text[]), :secret, CAST(:metadata AS jsonb))"
        f" RETURNING {ENDPOINT_COLUMNS}"
    ), {"url": url, "events": types, "secret": secret,
        "metadata": json.dumps(dict(metadata or {}))}).mappings().one()
    return row, secret


def get_endpoint(session: Session, endpoint_id: int) -> Mapping[str, Any]:
    row = session.execute(text(
        f"SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE id = :id AND deleted_at IS NULL"
    ), {"id": endpoint_id}).mappings().first()
    if row is None:
        raise NotFound(f"webhook endpoint {endpoint_id} does not exist")
    return row


def list_endpoints(session: Session, after: int | None, limit: int) -> list[Mapping[str, Any]]:
    """Newest first; limit + 1 rows (the caller pages)."""
    return list(session.execute(text(
        f"SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE deleted_at IS NULL"
        " AND id < coalesce(CAST(:after AS bigint), 9223372036854775807) ORDER BY id DESC LIMIT :limit"
    ), {"after": after, "limit": limit + 1}).mappings())


def delete_endpoint(session: Session, endpoint_id: int) -> None:
    """It gets nothing more: its pending deliveries are canceled (an attempt already under way
    finishes; its outcome is not recorded over the cancellation)."""
    # Wait for a fan-out under way (it holds this row): what it makes for this endpoint is then
    # committed, and canceled below; the next one reads the endpoint deleted.
    session.execute(text("SELECT 1 FROM webhook_fanout WHERE id = 1 FOR UPDATE")).first()
    deleted = session.execute(text(
        "UPDATE webhook_endpoints SET deleted_at = now() WHERE id = :id AND deleted_at IS NULL RETURNING id"
    ), {"id": endpoint_id}).first()
    if deleted is None:
        raise NotFound(f"webhook endpoint {endpoint_id} does not exist")
    session.execute(text(
        "UPDATE webhook_deliveries SET status = 'canceled', next_attempt_at = NULL, lease_until = NULL,"
        " updated_at = now() WHERE endpoint_id = :id AND status = 'pending'"
    ), {"id": endpoint_id})


DELIVERY_COLUMNS = (
    "d.id, d.event_id, e.type AS event_type, d.status, d.attempts, d.last_http_status, d.last_error,"
    " d.delivered_at, d.next_attempt_at, d.created_at"
)


def list_deliveries(session: Session, endpoint_id: int, after: int | None, limit: int,
                    status: str | None = None) -> list[Mapping[str, Any]]:
    get_endpoint(session, endpoint_id)
    return list(session.execute(text(
        f"SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries d JOIN events e ON e.id = d.event_id"
        " WHERE d.endpoint_id = :endpoint AND d.id < coalesce(CAST(:after AS bigint), 9223372036854775807)"
        " AND (CAST(:status AS text) IS NULL OR d.status = :status)"
        " ORDER BY d.id DESC LIMIT :limit"
    ), {"endpoint": endpoint_id, "after": after, "limit": limit + 1, "status": status}).mappings())


# --- fan-out and sweeping (run by the beat-scheduled task on the webhooks queue) ---

_FANOUT = text(
    "WITH pos AS (SELECT txid, event_id FROM webhook_fanout WHERE id = 1),"
    " ev AS (SELECT e.id, e.txid, e.type FROM events e, pos c"
    "        WHERE (e.txid, e.id) > (c.txid, c.event_id)"
    "          AND e.txid < pg_snapshot_xmin(pg_current_snapshot())"
    "        ORDER BY e.txid, e.id LIMIT :limit),"
    " made AS (INSERT INTO webhook_deliveries (endpoint_id, event_id, next_attempt_at, enqueued_at)"
    "          SELECT w.id, ev.id, now(), now() FROM ev JOIN webhook_endpoints w"
    "            ON w.deleted_at IS NULL AND (ev.type = ANY(w.events) OR '*' = ANY(w.events))"
    "          ORDER BY ev.txid, ev.id, w.id"
    "          ON CONFLICT (endpoint_id, event_id) DO NOTHING RETURNING id),"
    " last AS (SELECT txid, id FROM ev ORDER BY txid DESC, id DESC LIMIT 1),"
    " moved AS (UPDATE webhook_fanout f SET txid = last.txid, event_id = last.id FROM last"
    "           WHERE f.id = 1 RETURNING 1)"
    " SELECT (SELECT count(*) FROM ev) AS events, (SELECT array_agg(id ORDER BY id) FROM made) AS ids"
)
# With no endpoint at all, nothing past the horizon needs fanning out: jump there (an endpoint
# gets the events that become readable after it was registered).
_SKIP_TO_HORIZON = text(
    "UPDATE webhook_fanout SET txid = (pg_snapshot_xmin(pg_current_snapshot())::text::numeric - 1)::text::xid8,"
    " event_id = 9223372036854775807"
    " WHERE id = 1 AND NOT EXISTS (SELECT 1 FROM webhook_endpoints WHERE deleted_at IS NULL)"
    " RETURNING 1"
)


def _fanout_page(session: Session):
    """One page of the fan-out under the cursor row's lock; None when another run holds it or
    there is no endpoint to fan out to."""
    if session.execute(text("SELECT 1 FROM webhook_fanout WHERE id = 1 FOR UPDATE SKIP LOCKED")).first() is None:
        return None
    if session.execute(_SKIP_TO_HORIZON).first() is not None:
        return None
    return session.execute(_FANOUT, {"limit": FANOUT_PAGE}).one()


def fanout(db: Database, send: Send) -> int:
    """Make the delivery rows of the events read since the last run, commit, then send them.
    Runs anywhere, any number of times at once: the cursor row's lock lets one run at a time
    (others skip). Returns the number of deliveries made."""
    made = 0
    for _ in range(FANOUT_PAGES):
        row = db.unit_of_work(_fanout_page)
        if row is None:
            return made  # another fan-out is running, or no endpoint exists
        ids = list(row.ids or [])
        if ids:
            made += len(ids)
            _send_safely(send, ids, None)
        if row.events < FANOUT_PAGE:
            return made
    return made


_SWEEP = text(
    "UPDATE webhook_deliveries d SET enqueued_at = now()"
    " FROM (SELECT id FROM webhook_deliveries"
    "       WHERE status = 'pending' AND next_attempt_at <= now() - make_interval(secs => :grace)"
    "         AND coalesce(enqueued_at, '-infinity') <= now() - make_interval(secs => :grace)"
    "         AND (lease_until IS NULL OR lease_until < now())"
    "       ORDER BY next_attempt_at LIMIT :limit FOR UPDATE SKIP LOCKED) due"
    " WHERE d.id = due.id RETURNING d.id"
)


def sweep_deliveries(db: Database, send: Send, grace_s: float) -> int:
    """Send again the deliveries due for `grace_s` whose message has not run: lost (broker
    flushed, worker killed mid-attempt: its lease ran out) or never sent (a backoff beyond
    MAX_COUNTDOWN_SECONDS). Returns how many."""
    ids = sorted(db.unit_of_work(lambda session: session.execute(
        _SWEEP, {"grace": grace_s, "limit": SWEEP_LIMIT}).scalars().all()))
    if ids:
        _send_safely(send, ids, None)
    return len(ids)


def _send_safely(send: Send, ids: Sequence[int], countdown: float | None) -> None:
    try:
        for start in range(0, len(ids), 100):
            send(ids[start:start + 100], countdown)
    except Exception:  # committed rows: the sweeper sends them
        log.exception("sending %d webhook deliveries failed; the sweeper will send them", len(ids))


# --- one attempt ---

_CLAIM = text(
    "UPDATE webhook_deliveries d SET attempts = d.attempts + 1, updated_at = now(),"
    "   lease_until = now() + make_interval(secs => :lease)"
    " FROM webhook_endpoints w, events e"
    " WHERE d.id = :id AND d.status = 'pending' AND d.next_attempt_at <= now() + interval '1 second'"
    "   AND (d.lease_until IS NULL OR d.lease_until < now())"
    "   AND w.id = d.endpoint_id AND w.deleted_at IS NULL AND e.id = d.event_id"
    " RETURNING d.id, d.attempts, w.url, w.secret, e.id AS event_id, e.type, e.object, e.created_at"
)
_RECORD = text(
    "UPDATE webhook_deliveries SET last_http_status = :status, last_error = :error, lease_until = NULL,"
    "   updated_at = now(),"
    "   status = CASE WHEN :delivered THEN 'delivered' WHEN :final THEN 'failed' ELSE 'pending' END,"
    "   delivered_at = CASE WHEN :delivered THEN now() END,"
    "   next_attempt_at = CASE WHEN :delivered OR :final THEN NULL"
    "                     ELSE now() + make_interval(secs => :backoff) END,"
    "   enqueued_at = CASE WHEN :scheduled THEN now() ELSE enqueued_at END"
    " WHERE id = :id AND status = 'pending'"  # not over a cancellation (endpoint deleted meanwhile)
    " RETURNING id"
)


def backoff_seconds(settings: Settings, attempts: int) -> float:
    """The wait after the `attempts`-th failed attempt: base, 2 base, 4 base..."""
    return settings.webhook_retry_base_seconds * 2 ** (attempts - 1)


def attempt(db: Database, settings: Settings, delivery_id: int, send: Send) -> str:
    """Claim the delivery, POST it, record the outcome; schedule the retry. Returns the outcome:
    delivered | retry | gave_up | skipped (not due, taken, done, or its endpoint deleted)."""
    claim = db.unit_of_work(lambda session: session.execute(_CLAIM, {
        "id": delivery_id, "lease": 2 * settings.webhook_timeout_seconds + LEASE_MARGIN_SECONDS,
    }).mappings().first())
    if claim is None:
        return "skipped"
    body = json.dumps(event_document({**claim, "id": claim["event_id"]}), separators=(",", ":")).encode()
    headers = {"Content-Type": "application/json", "User-Agent": "wallet-webhooks/1",
               EVENT_ID_HEADER: str(claim["event_id"]),
               SIGNATURE_HEADER: sign(claim["secret"], int(time.time()), body)}
    result = post(claim["url"], body, headers, settings.webhook_timeout_seconds,
                  settings.webhook_allow_private)
    final = not result.delivered and claim["attempts"] >= settings.webhook_max_attempts
    backoff = backoff_seconds(settings, claim["attempts"])
    scheduled = not result.delivered and not final and backoff <= MAX_COUNTDOWN_SECONDS
    recorded = db.unit_of_work(lambda session: session.execute(_RECORD, {
        "id": delivery_id, "status": result.status, "error": result.error,
        "delivered": result.delivered, "final": final, "backoff": backoff,
        "scheduled": scheduled}).first())
    outcome = "delivered" if result.delivered else "gave_up" if final else "retry"
    metrics.WEBHOOK_DELIVERIES.labels(outcome).inc()
    log.info("webhook attempt", extra={"delivery_id": delivery_id, "event_id": claim["event_id"],
                                       "attempt": claim["attempts"], "outcome": outcome,
                                       "http_status": result.status, "error": result.error})
    if recorded is not None and scheduled:
        _send_safely(send, [delivery_id], backoff)
    return outcome


# --- metrics, read at scrape time ---

_OLDEST_UNDELIVERED = text(
    "SELECT greatest("
    "  (SELECT extract(epoch FROM now() - e.created_at) FROM events e"
    "   WHERE e.id = (SELECT min(event_id) FROM webhook_deliveries WHERE status = 'pending')),"
    "  (SELECT extract(epoch FROM now() - e.created_at) FROM events e, webhook_fanout f"
    "   WHERE f.id = 1 AND (e.txid, e.id) > (f.txid, f.event_id)"
    "     AND EXISTS (SELECT 1 FROM webhook_endpoints WHERE deleted_at IS NULL)"
    "   ORDER BY e.txid, e.id LIMIT 1))"
)


def oldest_undelivered_age(session: Session) -> float:
    """Seconds since the oldest event still owed to an endpoint was written (0: none): both
    index lookups, cheap at any size."""
    return float(session.execute(_OLDEST_UNDELIVERED).scalar() or 0)
