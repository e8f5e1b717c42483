"""events (a transactional outbox) and signed webhooks: events, batches.settled, webhook
endpoints, deliveries and the fan-out cursor.

Revision ID: 0003
Revises: 0002
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

EMPTY = sa.text("'{}'::jsonb")


def upgrade() -> None:
    # txid: the writing transaction's id. The feed serves only rows whose txid is below the
    # oldest transaction still running (pg_snapshot_xmin), ordered by (txid, id): that order never
    # changes once a row is visible, however transactions commit (ids are taken before commit).
    op.execute(
        "CREATE TABLE events ("
        " id bigserial PRIMARY KEY,"
        " txid xid8 NOT NULL DEFAULT pg_current_xact_id(),"
        " type varchar(32) NOT NULL,"
        " object_id bigint NOT NULL,"
        " object json NOT NULL,"
        " created_at timestamptz NOT NULL DEFAULT now())"
    )
    op.create_index('events_feed_idx', 'events', ['txid', 'id'])
    op.create_index('events_type_feed_idx', 'events', ['type', 'txid', 'id'])

    # How many of the batch's payments have left `pending`: the transaction that makes it reach
    # `total` (its UPDATE of the batch row serialises with the others') writes batch.finished.
    op.add_column('batches', sa.Column('settled', sa.Integer(), server_default='0', nullable=False))
    op.execute("UPDATE batches b SET settled = (SELECT count(*) FROM payments p"
               " WHERE p.batch_id = b.id AND p.status <> 'pending')")

    op.create_table(
        'webhook_endpoints',
        sa.Column('id', sa.BigInteger(), primary_key=True),
        sa.Column('url', sa.Text(), nullable=False),
        sa.Column('events', ARRAY(sa.Text()), nullable=False),
        sa.Column('secret', sa.Text(), nullable=False),
        sa.Column('metadata', JSONB(), server_default=EMPTY, nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.Column('deleted_at', sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index('webhook_endpoints_active_idx', 'webhook_endpoints', ['id'],
                    postgresql_where=sa.text('deleted_at IS NULL'))
    op.create_table(
        'webhook_deliveries',
        sa.Column('id', sa.BigInteger(), primary_key=True),
        sa.Column('endpoint_id', sa.BigInteger(), sa.ForeignKey('webhook_endpoints.id'), nullable=False),
        sa.Column('event_id', sa.BigInteger(), sa.ForeignKey('events.id'), nullable=False),
        sa.Column('status', sa.String(16), server_default='pending', nullable=False),
        sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
        sa.Column('last_http_status', sa.Integer(), nullable=True),
        sa.Column('last_error', sa.Text(), nullable=True),
        sa.Column('delivered_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('enqueued_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.CheckConstraint("status IN ('pending', 'delivered', 'failed', 'canceled')",
                           name='webhook_deliveries_status_valid'),
        sa.CheckConstraint("(status = 'pending') = (next_attempt_at IS NOT NULL)",
                           name='webhook_deliveries_next_attempt_iff_pending'),
        sa.CheckConstraint("(status = 'delivered') = (delivered_at IS NOT NULL)",
                           name='webhook_deliveries_delivered_at_iff_delivered'),
        sa.UniqueConstraint('endpoint_id', 'event_id', name='webhook_deliveries_endpoint_event_key'),
    )
    op.create_index('webhook_deliveries_endpoint_idx', 'webhook_deliveries', ['endpoint_id', 'id'])
    op.create_index('webhook_deliveries_due_idx', 'webhook_deliveries', ['next_attempt_at'],
                    postgresql_where=sa.text("status = 'pending'"))
    op.create_index('webhook_deliveries_undelivered_idx', 'webhook_deliveries', ['event_id'],
                    postgresql_where=sa.text("status = 'pending'"))
    # The fan-out's place in the event feed: one row, locked by the fan-out that runs.
    op.execute("CREATE TABLE webhook_fanout (id smallint PRIMARY KEY CHECK (id = 1),"
               " txid xid8 NOT NULL, event_id bigint NOT NULL)")
    op.execute("INSERT INTO webhook_fanout VALUES (1, '0', 0)")
    backfill()


# Frozen here (a migration must not change meaning when the application code moves on): the
# events of what happened before this revision, so that reconcile finds every one.
_TIME = ("(to_char({c}, 'YYYY-MM-DD\"T\"HH24:MI:SS') || CASE WHEN extract(microseconds FROM {c})"
         " % 1000000 = 0 THEN '' ELSE to_char({c}, '.US') END || to_char({c}, 'TZH:TZM'))")
_PAYMENT = (
    "json_build_object('id', p.id, 'status', p.status, 'buyer_account_id', p.buyer_account_id,"
    " 'seller_account_id', p.seller_account_id, 'amount', trim_scale(p.amount)::text,"
    " 'currency_id', p.currency_id, 'currency', c.code, 'failure_code', p.failure_code,"
    " 'batch_id', p.batch_id, 'created_at', {created}, 'completed_at', {completed},"
    " 'capture_method', p.capture_method, 'amount_captured', trim_scale(p.amount_captured)::text,"
    " 'amount_refunded', trim_scale(p.amount_refunded)::text, 'refund_of', p.refund_of,"
    " 'authorization_expires_at', {expires}, 'cancellation_reason', p.cancellation_reason,"
    " 'reference', p.reference, 'metadata', p.metadata)"
).format(created=_TIME.format(c="p.created_at"), completed=_TIME.format(c="p.completed_at"),
         expires=_TIME.format(c="p.authorization_expires_at"))


def backfill() -> None:
    # A captured or canceled manual payment was authorized first.
    op.execute(
        "INSERT INTO events (type, object_id, object, created_at)"
        f" SELECT 'payment.authorized', p.id, {_PAYMENT.replace('p.status', chr(39) + 'authorized' + chr(39))},"
        "   p.created_at FROM payments p JOIN currencies c ON c.id = p.currency_id"
        " WHERE p.capture_method = 'manual' AND p.status IN ('completed', 'canceled') ORDER BY p.id")
    op.execute(
        "INSERT INTO events (type, object_id, object, created_at)"
        f" SELECT 'payment.' || p.status, p.id, {_PAYMENT}, coalesce(p.completed_at, p.created_at)"
        " FROM payments p JOIN currencies c ON c.id = p.currency_id"
        " WHERE p.status <> 'pending' ORDER BY p.id")
    op.execute(
        "INSERT INTO events (type, object_id, object)"
        " SELECT 'batch.finished', b.id, json_build_object('id', b.id, 'atomic', b.atomic,"
        "   'total', b.total, 'counts', json_build_object("
        "     'pending', 0, 'completed', count(*) FILTER (WHERE p.status = 'completed'),"
        "     'failed', count(*) FILTER (WHERE p.status = 'failed'),"
        "     'authorized', count(*) FILTER (WHERE p.status = 'authorized'),"
        "     'canceled', count(*) FILTER (WHERE p.status = 'canceled')),"
        f"   'finished', true, 'created_at', {_TIME.format(c='b.created_at')})"
        " FROM batches b JOIN payments p ON p.batch_id = b.id"
        " WHERE b.settled = b.total GROUP BY b.id ORDER BY b.id")


def downgrade() -> None:
    op.execute("DROP TABLE webhook_fanout")
    op.drop_table('webhook_deliveries')
    op.drop_table('webhook_endpoints')
    op.drop_column('batches', 'settled')
    op.drop_table('events')
