"""open_payments: the pending and authorized payments are found through a table of their own,
which triggers keep; no index of `payments` names `status`, so applying a payment is a HOT update.

Why: a payment's row is written twice, by the INSERT that accepts it and by the UPDATE that
applies it. While an index names a column that UPDATE changes (`status` was in three:
payments_status_idx, and the partial payments_pending_idx and payments_authorized_expiry_idx),
PostgreSQL writes a new entry into every index of the table for it (six here), and vacuum later
removes as many dead ones. Without them, and with room left on each page for the new version
(fillfactor 45: a batch's rows fill pages together and are applied together), the UPDATE is
heap-only: no index entry at all. PostgreSQL's CPU to apply a payment, in sets of 500: 63-87 us
before, 47-62 us after (in-process pairs); per batch payment in `make bench`, accepting and
applying, 0.137-0.138 ms before and 0.094-0.108 ms after (bench/NOTES.md, 2026-12-02 midnight).

The price: the heap keeps room on every page (about twice the pages once vacuumed; the indexes
are smaller, with no second entry per payment), and each accepting statement runs the insert
trigger (~25-50 us of PostgreSQL, noticeable only for single payments).

What finds the open payments now:
- `open_payments` holds one row per payment whose status is `pending` or `authorized`, with that
  status and the authorization's expiry. Statement triggers on `payments` keep it, from the
  transition tables of each INSERT and UPDATE, in the writing transaction: whatever writes a
  payment (the accepting INSERT, the worker's apply, a capture, a test), its row follows. It is
  small (at most the backlog admission control allows, plus the live authorizations), and reads
  of it (admission's count, the sweeper, expiry, listing `pending` or `authorized`) join
  `payments` by primary key, whose `status` stays the authority;
- failed and canceled payments are listed through partial indexes on `failure_code` and
  `cancellation_reason` (set only with those statuses, by constraint). Completed payments, the
  bulk of the table, are listed by the primary key.
- reconcile checks that `open_payments` is exactly the open payments.

Safe to run while payments are written: `payments` is locked (SHARE ROW EXCLUSIVE) before the
open rows are copied, so every later write goes through the triggers. Processes of the previous
code still running afterwards stay correct, but find the pending payments by a scan of `payments`
until they are replaced.

Revision ID: 0006
Revises: 0005
"""
import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

OPEN = "('pending', 'authorized')"


def upgrade() -> None:
    op.execute("LOCK TABLE payments IN SHARE ROW EXCLUSIVE MODE")
    op.create_table(
        'open_payments',
        sa.Column('payment_id', sa.BigInteger(), primary_key=True),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('authorization_expires_at', sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(f"status IN {OPEN}", name='open_payments_status_valid'),
    )
    op.create_index('open_payments_expiry_idx', 'open_payments', ['authorization_expires_at'],
                    postgresql_where=sa.text("status = 'authorized'"))
    op.execute(
        "CREATE FUNCTION wallet_open_payments_inserted() RETURNS trigger LANGUAGE plpgsql AS $$"
        " BEGIN"
        "   INSERT INTO open_payments (payment_id, status, authorization_expires_at)"
        f"  SELECT id, status, authorization_expires_at FROM inserted WHERE status IN {OPEN};"
        "   RETURN NULL;"
        " END $$")
    # A payment leaves the open set (deleted), or stays in it with a new status or expiry
    # (pending -> authorized). It never comes back: no status leads back to pending or authorized.
    # The ids go in as an array, so that the DELETE is planned as primary-key lookups whatever
    # the sizes: a trigger's statements are planned once per session and the plan kept (until
    # statistics change), and a join to the transition table could have kept a hash join over a
    # sequential scan of open_payments.
    op.execute(
        "CREATE FUNCTION wallet_open_payments_updated() RETURNS trigger LANGUAGE plpgsql AS $$"
        " BEGIN"
        "   DELETE FROM open_payments WHERE payment_id = ANY(ARRAY("
        f"    SELECT id FROM updated WHERE status NOT IN {OPEN}));"
        "   INSERT INTO open_payments AS o (payment_id, status, authorization_expires_at)"
        f"  SELECT id, status, authorization_expires_at FROM updated WHERE status IN {OPEN}"
        "   ON CONFLICT (payment_id) DO UPDATE"
        "     SET status = excluded.status, authorization_expires_at = excluded.authorization_expires_at"
        "     WHERE (o.status, o.authorization_expires_at)"
        "           IS DISTINCT FROM (excluded.status, excluded.authorization_expires_at);"
        "   RETURN NULL;"
        " END $$")
    op.execute("CREATE TRIGGER payments_open_inserted AFTER INSERT ON payments"
               " REFERENCING NEW TABLE AS inserted"
               " FOR EACH STATEMENT EXECUTE FUNCTION wallet_open_payments_inserted()")
    op.execute("CREATE TRIGGER payments_open_updated AFTER UPDATE ON payments"
               " REFERENCING NEW TABLE AS updated"
               " FOR EACH STATEMENT EXECUTE FUNCTION wallet_open_payments_updated()")
    op.execute("INSERT INTO open_payments (payment_id, status, authorization_expires_at)"
               f" SELECT id, status, authorization_expires_at FROM payments WHERE status IN {OPEN}")

    op.drop_index('payments_status_idx', table_name='payments')
    op.drop_index('payments_pending_idx', table_name='payments')
    op.drop_index('payments_authorized_expiry_idx', table_name='payments')
    op.create_index('payments_failed_idx', 'payments', ['id'],
                    postgresql_where=sa.text('failure_code IS NOT NULL'))
    op.create_index('payments_canceled_idx', 'payments', ['id'],
                    postgresql_where=sa.text('cancellation_reason IS NOT NULL'))
    # New pages only; the existing ones fill up as they are.
    op.execute("ALTER TABLE payments SET (fillfactor = 45)")


def downgrade() -> None:
    op.execute("ALTER TABLE payments RESET (fillfactor)")
    op.drop_index('payments_canceled_idx', table_name='payments')
    op.drop_index('payments_failed_idx', table_name='payments')
    op.create_index('payments_authorized_expiry_idx', 'payments', ['authorization_expires_at'],
                    postgresql_where=sa.text("status = 'authorized'"))
    op.create_index('payments_pending_idx', 'payments', ['created_at'],
                    postgresql_where=sa.text("status = 'pending'"))
    op.create_index('payments_status_idx', 'payments', ['status', 'id'])
    op.execute("DROP TRIGGER payments_open_updated ON payments")
    op.execute("DROP TRIGGER payments_open_inserted ON payments")
    op.execute("DROP FUNCTION wallet_open_payments_updated()")
    op.execute("DROP FUNCTION wallet_open_payments_inserted()")
    op.drop_table('open_payments')
