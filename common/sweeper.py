"""Re-enqueue payments that stayed `pending` too long: a lost message delays a payment, never
loses it. Safe to run anywhere and any number of times, because applying is idempotent.
Also cancels authorizations past their expiry."""
from __future__ import annotations

from sqlalchemy import text

from common import ledger
from common.db import Database
from common.messaging import Sender

SWEEP_LIMIT = 10_000


def sweep(db: Database, sender: Sender, older_than_seconds: float) -> int:
    """Claim stale pending payments (skipping those a worker holds right now), mark them swept,
    and send them after the commit. Returns how many were re-enqueued."""
    rows = db.unit_of_work(lambda session: session.execute(text(
            "UPDATE payments p SET swept_at = now()"
            " FROM (SELECT s.id FROM open_payments o JOIN payments s ON s.id = o.payment_id"
            "       WHERE o.status = 'pending' AND s.status = 'pending'"
            "         AND coalesce(s.swept_at, s.created_at) < now() - make_interval(secs => :age)"
            "       ORDER BY o.payment_id LIMIT :limit FOR UPDATE OF s SKIP LOCKED) stale"
            " WHERE p.id = stale.id"
            " RETURNING p.id, p.buyer_account_id, p.seller_account_id, p.batch_id,"
            "   (SELECT b.atomic FROM batches b WHERE b.id = p.batch_id) AS atomic"
        ), {"age": older_than_seconds, "limit": SWEEP_LIMIT}).all())
    singles = [(r.id, r.buyer_account_id, r.seller_account_id) for r in rows if not r.atomic]
    sender.send_payments(singles)
    for batch_id in sorted({r.batch_id for r in rows if r.atomic}):
        sender.send_atomic_batch(batch_id)
    return len(rows)


def expire(db: Database) -> int:
    """Cancel (reason `expired`) the authorizations past their expiry; returns how many."""
    return len(db.unit_of_work(ledger.expire_authorizations))


def vacuum_open_payments(db: Database) -> None:
    """`open_payments` is a queue table: nearly every payment's row is inserted and deleted within
    a second, so its dead rows pile up between autovacuum's visits (`autovacuum_naptime`, a minute
    by default): 185,000 of them and 926 pages after 30 s of batches, which admission's count and
    the sweeper read through (bench/NOTES.md, 2026-12-02 midnight). The sweeper vacuums it at each
    run instead, a few milliseconds. SKIP_LOCKED: a vacuum already at it (autovacuum's) is not
    waited for."""
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM (SKIP_LOCKED) open_payments"))
