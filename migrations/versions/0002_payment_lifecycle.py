"""payment lifecycle: holds (manual capture), refunds, available balance, metadata, reference.

Revision ID: 0002
Revises: 0001
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

EMPTY = sa.text("'{}'::jsonb")

PAYMENT_CHECKS = [
    ("payments_capture_method_valid", "capture_method IN ('automatic', 'manual')"),
    ("payments_expiry_iff_manual", "(capture_method = 'manual') = (authorization_expires_at IS NOT NULL)"),
    ("payments_authorized_only_manual", "status <> 'authorized' OR capture_method = 'manual'"),
    ("payments_cancellation_reason_iff_canceled", "(status = 'canceled') = (cancellation_reason IS NOT NULL)"),
    ("payments_cancellation_reason_valid", "cancellation_reason IN ('requested', 'expired')"),
    ("payments_captured_iff_completed", "(status = 'completed') = (amount_captured IS NOT NULL)"),
    ("payments_captured_range", "amount_captured > 0 AND amount_captured <= amount"),
    ("payments_refunded_range", "amount_refunded >= 0 AND amount_refunded <= coalesce(amount_captured, 0)"),
    ("payments_refund_automatic", "refund_of IS NULL OR capture_method = 'automatic'"),
]


def upgrade() -> None:
    op.add_column('accounts', sa.Column('held', sa.Numeric(), server_default='0', nullable=False))
    op.add_column('accounts', sa.Column('metadata', JSONB(), server_default=EMPTY, nullable=False))
    op.create_check_constraint('accounts_held_nonnegative', 'accounts', 'held >= 0')
    op.create_check_constraint('accounts_customer_available_nonnegative', 'accounts',
                               "kind <> 'customer' OR balance - held >= 0")

    op.add_column('payments', sa.Column('capture_method', sa.String(16), server_default='automatic',
                                        nullable=False))
    op.add_column('payments', sa.Column('amount_captured', sa.Numeric(), nullable=True))
    op.add_column('payments', sa.Column('amount_refunded', sa.Numeric(), server_default='0', nullable=False))
    op.add_column('payments', sa.Column('refund_of', sa.BigInteger(), nullable=True))
    op.add_column('payments', sa.Column('authorization_expires_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('payments', sa.Column('cancellation_reason', sa.String(16), nullable=True))
    op.add_column('payments', sa.Column('reference', sa.String(128), nullable=True))
    op.add_column('payments', sa.Column('metadata', JSONB(), server_default=EMPTY, nullable=False))
    op.create_foreign_key(None, 'payments', 'payments', ['refund_of'], ['id'])
    # Payments completed before this revision moved their whole amount.
    op.execute("UPDATE payments SET amount_captured = amount WHERE status = 'completed'")

    op.drop_constraint('payments_status_valid', 'payments', type_='check')
    op.create_check_constraint('payments_status_valid', 'payments',
                               "status IN ('pending', 'completed', 'failed', 'authorized', 'canceled')")
    op.drop_constraint('payments_completed_at_iff_terminal', 'payments', type_='check')
    op.create_check_constraint('payments_completed_at_iff_terminal', 'payments',
                               "(status IN ('pending', 'authorized')) = (completed_at IS NULL)")
    for name, condition in PAYMENT_CHECKS:
        op.create_check_constraint(name, 'payments', condition)

    op.create_index('payments_refund_of_idx', 'payments', ['refund_of', 'id'],
                    postgresql_where=sa.text('refund_of IS NOT NULL'))
    op.create_index('payments_reference_idx', 'payments', ['reference', 'id'],
                    postgresql_where=sa.text('reference IS NOT NULL'))
    op.create_index('payments_authorized_expiry_idx', 'payments', ['authorization_expires_at'],
                    postgresql_where=sa.text("status = 'authorized'"))


def downgrade() -> None:
    op.drop_index('payments_authorized_expiry_idx', table_name='payments')
    op.drop_index('payments_reference_idx', table_name='payments')
    op.drop_index('payments_refund_of_idx', table_name='payments')
    for name, _ in PAYMENT_CHECKS:
        op.drop_constraint(name, 'payments', type_='check')
    op.drop_constraint('payments_completed_at_iff_terminal', 'payments', type_='check')
    op.create_check_constraint('payments_completed_at_iff_terminal', 'payments',
                               "(status = 'pending') = (completed_at IS NULL)")
    op.drop_constraint('payments_status_valid', 'payments', type_='check')
    op.create_check_constraint('payments_status_valid', 'payments',
                               "status IN ('pending', 'completed', 'failed')")
    for column in ('metadata', 'reference', 'cancellation_reason', 'authorization_expires_at',
                   'refund_of', 'amount_refunded', 'amount_captured', 'capture_method'):
        op.drop_column('payments', column)
    op.drop_constraint('accounts_customer_available_nonnegative', 'accounts', type_='check')
    op.drop_constraint('accounts_held_nonnegative', 'accounts', type_='check')
    op.drop_column('accounts', 'metadata')
    op.drop_column('accounts', 'held')
