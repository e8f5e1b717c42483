"""Events: a transactional outbox. Every change of a payment's status writes its event in the
transaction that makes the change (SPEC section 10), rendered in SQL from the changed row.

- payment.authorized | payment.completed | payment.failed: the worker's apply (common.ledger
  .applying adds `APPLY_EVENTS` to its one write statement: one set-based INSERT per message);
- payment.completed (capture), payment.canceled (cancel, expiry): common.ledger.holds;
- batch.finished: when a batch has no `pending` payment left. `batches.settled` counts the
  payments that left `pending`; the UPDATE that brings it to `total` holds the batch row, so of
  two transactions finishing a batch's last payments at once only the second (which waited for
  the first's commit and read its count) sees `settled = total`: exactly one event per batch.

The object is rendered here in SQL as api/render.py renders it in Python; a test compares an
event's object with GET /payments/<id> (and /batches/<id>) for every status.

The feed (`read_feed`) is ordered by (txid, id), where txid is the writing transaction's id, and
serves only rows whose txid is below the snapshot's xmin (every transaction with a smaller id has
ended): a row that becomes visible later always sorts after everything already served, so a
consumer following the cursor never skips one. Its price: the feed lags behind the oldest
running write transaction (bounded by the statement timeout in this code base).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

PAYMENT_TYPES = ("payment.authorized", "payment.completed", "payment.failed", "payment.canceled")
BATCH_FINISHED = "batch.finished"
EVENT_TYPES = (*PAYMENT_TYPES, BATCH_FINISHED)


def _time(column: str) -> str:
    """`column` (timestamptz) as Python's `datetime.isoformat()` writes the value psycopg2 reads
    (the session's time zone; no fraction when the microseconds are 0)."""
    return (f"CASE WHEN date_trunc('second', {column}) = {column}"
            f" THEN to_char({column}, 'YYYY-MM-DD\"T\"HH24:MI:SSTZH:TZM')"
            f" ELSE to_char({column}, 'YYYY-MM-DD\"T\"HH24:MI:SS.USTZH:TZM') END")


def _amount(column: str) -> str:
    # numeric's text has no exponent; trim_scale drops the trailing zeros (format_amount's text).
    return f"trim_scale({column})::text"


# api/render.payment, in SQL: `p` a payments row, `c` its currency. row_to_json of a row built in
# a subquery: 4.3 us per row against 6.5-8.8 us for json_build_object with 19 pairs (measured
# on the shared 2-core machine; it runs once per applied payment).
_PAYMENT_FIELDS = (
    ("id", "p.id"), ("status", "p.status"), ("buyer_account_id", "p.buyer_account_id"),
    ("seller_account_id", "p.seller_account_id"), ("amount", _amount("p.amount")),
    ("currency_id", "p.currency_id"), ("currency", "c.code"), ("failure_code", "p.failure_code"),
    ("batch_id", "p.batch_id"), ("created_at", _time("p.created_at")),
    ("completed_at", _time("p.completed_at")), ("capture_method", "p.capture_method"),
    ("amount_captured", _amount("p.amount_captured")), ("amount_refunded", _amount("p.amount_refunded")),
    ("refund_of", "p.refund_of"), ("authorization_expires_at", _time("p.authorization_expires_at")),
    ("cancellation_reason", "p.cancellation_reason"), ("reference", "p.reference"),
    ("metadata", "p.metadata"),
)
PAYMENT_OBJECT = ("(SELECT row_to_json(o) FROM (SELECT "
                  + ", ".join(f"{expr} AS {name}" for name, expr in _PAYMENT_FIELDS) + ") o)")

# api/render.batch, in SQL: `b` a batches row, `n` its counts by status.
BATCH_OBJECT = (
    "json_build_object('id', b.id, 'atomic', b.atomic, 'total', b.total, 'counts',"
    " json_build_object('pending', n.pending, 'completed', n.completed, 'failed', n.failed,"
    "   'authorized', n.authorized, 'canceled', n.canceled),"
    " 'finished', n.pending = 0, 'created_at', " + _time("b.created_at") + ")"
)


def _events_of(changed: str, settled: bool) -> str:
    """CTEs to append to a statement whose CTE `changed` returns the changed payments rows (after
    the change), then the final SELECT: the ids of the batches this statement finished."""
    progress = (
        ", batch_progress AS ("
        "  UPDATE batches b SET settled = b.settled + s.n"
        f"  FROM (SELECT batch_id, count(*) AS n FROM {changed} WHERE batch_id IS NOT NULL"
        "        GROUP BY batch_id) s"
        "  WHERE b.id = s.batch_id RETURNING b.id, b.settled = b.total AS finished)"
    ) if settled else ""
    return (
        f"{progress}, payment_events AS ("
        "  INSERT INTO events (type, object_id, object)"
        f"  SELECT 'payment.' || p.status, p.id, {PAYMENT_OBJECT}"
        f"  FROM {changed} p JOIN currencies c ON c.id = p.currency_id ORDER BY p.id RETURNING 1)"
        + (" SELECT id FROM batch_progress WHERE finished" if settled else " SELECT 0 WHERE false")
    )


# For common.ledger.applying's write statement: its CTE `paid` is the UPDATE of the payments,
# `RETURNING p.*`. Every payment applied there leaves `pending`.
APPLY_EVENTS = _events_of("paid", settled=True)

_RECORD = {
    settled: text("WITH changed AS (SELECT * FROM payments WHERE id = ANY(:ids))"
                  + _events_of("changed", settled))
    for settled in (True, False)
}


def record_payment_events(session: Session, payment_ids: Sequence[int], *, settled: bool = True) -> None:
    """Write the event of each payment's current status, in the caller's transaction, after the
    status change. `settled`: these payments have just left `pending` (counted on their batches,
    which then get batch.finished when none is left); False for changes of authorized payments
    (capture, cancel, expiry). For any path that ends payments other than the worker's apply
    statement (e.g. failing one with internal_error): call it once with their ids."""
    if not payment_ids:
        return
    finished = session.execute(_RECORD[settled], {"ids": sorted(payment_ids)}).scalars().all()
    record_batch_finished(session, finished)


_BATCH_COUNTS = (
    "SELECT batch_id,"
    " count(*) FILTER (WHERE status = 'pending') AS pending,"
    " count(*) FILTER (WHERE status = 'completed') AS completed,"
    " count(*) FILTER (WHERE status = 'failed') AS failed,"
    " count(*) FILTER (WHERE status = 'authorized') AS authorized,"
    " count(*) FILTER (WHERE status = 'canceled') AS canceled"
    " FROM payments WHERE batch_id = ANY(:ids) GROUP BY batch_id"
)
_BATCH_FINISHED = text(
    "INSERT INTO events (type, object_id, object)"
    f" SELECT '{BATCH_FINISHED}', b.id, {BATCH_OBJECT}"
    f" FROM batches b JOIN ({_BATCH_COUNTS}) n ON n.batch_id = b.id"
    " WHERE b.id = ANY(:ids) ORDER BY b.id"
)


def record_batch_finished(session: Session, batch_ids: Sequence[int]) -> None:
    """Write batch.finished for batches this transaction has just finished (it holds their rows:
    their `settled` reached `total` in its UPDATE). A statement of its own, so that (READ
    COMMITTED) it counts the payments other transactions committed meanwhile. Once per batch."""
    if batch_ids:
        session.execute(_BATCH_FINISHED, {"ids": sorted(batch_ids)})


# --- reading ---

EVENT_COLUMNS = "id, txid::text AS txid, type, object_id, object, created_at"


def event_document(row: Mapping[str, Any]) -> dict[str, Any]:
    """The event as the API serves it and a webhook posts it."""
    return {"id": row["id"], "type": row["type"], "created_at": row["created_at"].isoformat(),
            "data": {"object": row["object"]}}


@dataclass(frozen=True)
class Position:
    """A place in the feed: after the event (txid, id)."""
    txid: int
    id: int


START = Position(0, 0)
_MAX_ID = 2**63 - 1


@dataclass(frozen=True)
class FeedPage:
    rows: list[Mapping[str, Any]]
    next: Position


_FEED = (
    "WITH h AS (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xmin)"
    " SELECT h.xmin::text AS horizon, e.* FROM h LEFT JOIN LATERAL ("
    f"   SELECT {EVENT_COLUMNS} FROM events"
    "   WHERE (txid, id) > (CAST(:txid AS xid8), CAST(:id AS bigint)) AND txid < h.xmin {type}"
    "   ORDER BY txid, id LIMIT :limit) e ON true"
)
_FEED_ALL = text(_FEED.format(type=""))
_FEED_TYPE = text(_FEED.format(type="AND type = :type"))


def read_feed(session: Session, after: Position, limit: int, type_: str | None = None) -> FeedPage:
    """Events after `after` that are safe to read, oldest first, and where to resume."""
    params = {"txid": str(after.txid), "id": after.id, "limit": limit, "type": type_}
    result = session.execute(_FEED_TYPE if type_ else _FEED_ALL, params).mappings().all()
    rows = [r for r in result if r["id"] is not None]
    horizon = int(result[0]["horizon"])
    if len(rows) == limit:
        last = rows[-1]
        return FeedPage(rows, Position(int(last["txid"]), last["id"]))
    # Not a full page: every event of a transaction below the horizon has been read (of this
    # type), so the next read may start at the horizon.
    resume = Position(horizon - 1, _MAX_ID)
    if rows and (int(rows[-1]["txid"]), rows[-1]["id"]) > (resume.txid, resume.id):
        resume = Position(int(rows[-1]["txid"]), rows[-1]["id"])
    return FeedPage(rows, max(resume, after, key=lambda p: (p.txid, p.id)))


def get_event(session: Session, event_id: int) -> Mapping[str, Any] | None:
    return session.execute(text(f"SELECT {EVENT_COLUMNS} FROM events WHERE id = :id"),
                           {"id": event_id}).mappings().first()


# --- reconciling ---

def event_problems(session: Session) -> list[str]:
    """Every authorized or terminal payment has the event of its status (a captured or canceled
    manual payment also its payment.authorized), none has two of a type, a pending one has none;
    every batch's `settled` is right and a finished batch has exactly one batch.finished."""
    problems = []
    for row in session.execute(text(
        "WITH expected AS ("
        "  SELECT id, 'payment.' || status AS type FROM payments WHERE status <> 'pending'"
        "  UNION ALL SELECT id, 'payment.authorized' FROM payments"
        "  WHERE capture_method = 'manual' AND status IN ('completed', 'canceled')),"
        " found AS (SELECT object_id AS id, type, count(*) AS n FROM events"
        "  WHERE type LIKE 'payment.%' GROUP BY object_id, type)"
        " SELECT coalesce(x.id, f.id) AS id, coalesce(x.type, f.type) AS type, coalesce(f.n, 0) AS n,"
        "   x.id IS NOT NULL AS expected"
        " FROM expected x FULL JOIN found f ON f.id = x.id AND f.type = x.type"
        " WHERE x.id IS NULL OR f.n IS DISTINCT FROM 1"
        " ORDER BY 1 LIMIT 1000"
    )):
        if row.expected:
            problems.append(f"payment {row.id}: {row.n} {row.type} events, not 1")
        else:
            problems.append(f"payment {row.id}: a {row.type} event, but the payment is not so")
    for row in session.execute(text(
        "SELECT b.id, b.total, b.settled, coalesce(p.settled, 0) AS counted, coalesce(e.n, 0) AS events"
        " FROM batches b"
        " LEFT JOIN (SELECT batch_id, count(*) FILTER (WHERE status <> 'pending') AS settled"
        "            FROM payments WHERE batch_id IS NOT NULL GROUP BY batch_id) p ON p.batch_id = b.id"
        f" LEFT JOIN (SELECT object_id, count(*) AS n FROM events WHERE type = '{BATCH_FINISHED}'"
        "            GROUP BY object_id) e ON e.object_id = b.id"
        " WHERE b.settled <> coalesce(p.settled, 0)"
        "    OR coalesce(e.n, 0) <> CASE WHEN coalesce(p.settled, 0) = b.total THEN 1 ELSE 0 END"
        " ORDER BY b.id LIMIT 1000"
    )):
        problems.append(f"batch {row.id}: {row.counted} of {row.total} payments settled, counter"
                        f" {row.settled}, {row.events} batch.finished events")
    return problems
