"""initial schema: currencies (seeded), accounts with one issuance account per currency,
payments, batches, ledger entries, idempotency keys, API keys.

Revision ID: 0001
Revises: 
Create Date: 2026-11-25 13:27:46.855863
"""
from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('api_keys',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('key_hash', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('key_hash')
    )
    op.create_table('batches',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('atomic', sa.Boolean(), nullable=False),
    sa.Column('total', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('currencies',
    sa.Column('id', sa.SmallInteger(), nullable=False),
    sa.Column('code', sa.String(length=12), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('scale', sa.SmallInteger(), nullable=False),
    sa.CheckConstraint('scale BETWEEN 0 AND 18', name='currencies_scale_range'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('code')
    )
    op.create_table('idempotency_keys',
    sa.Column('scope', sa.String(length=64), nullable=False),
    sa.Column('key', sa.String(length=255), nullable=False),
    sa.Column('request_hash', sa.String(length=64), nullable=False),
    sa.Column('resource_type', sa.String(length=16), nullable=False),
    sa.Column('resource_id', sa.BigInteger(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('scope', 'key')
    )
    op.create_table('accounts',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('currency_id', sa.SmallInteger(), nullable=False),
    sa.Column('balance', sa.Numeric(), server_default='0', nullable=False),
    sa.Column('kind', sa.String(length=16), server_default='customer', nullable=False),
    sa.Column('status', sa.String(length=16), server_default='active', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("kind <> 'customer' OR balance >= 0", name='accounts_customer_balance_nonnegative'),
    sa.CheckConstraint("kind IN ('customer', 'issuance')", name='accounts_kind_valid'),
    sa.CheckConstraint("status IN ('active', 'frozen')", name='accounts_status_valid'),
    sa.ForeignKeyConstraint(['currency_id'], ['currencies.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('accounts_currency_id_idx', 'accounts', ['currency_id', 'id'], unique=False)
    op.create_table('payments',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('buyer_account_id', sa.BigInteger(), nullable=False),
    sa.Column('seller_account_id', sa.BigInteger(), nullable=False),
    sa.Column('currency_id', sa.SmallInteger(), nullable=False),
    sa.Column('amount', sa.Numeric(), nullable=False),
    sa.Column('status', sa.String(length=16), server_default='pending', nullable=False),
    sa.Column('failure_code', sa.String(length=32), nullable=True),
    sa.Column('batch_id', sa.BigInteger(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('completed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('swept_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("(status = 'failed') = (failure_code IS NOT NULL)", name='payments_failure_code_iff_failed'),
    sa.CheckConstraint("(status = 'pending') = (completed_at IS NULL)", name='payments_completed_at_iff_terminal'),
    sa.CheckConstraint("status IN ('pending', 'completed', 'failed')", name='payments_status_valid'),
    sa.CheckConstraint('amount > 0', name='payments_amount_positive'),
    sa.CheckConstraint('buyer_account_id <> seller_account_id', name='payments_distinct_accounts'),
    sa.ForeignKeyConstraint(['batch_id'], ['batches.id'], ),
    sa.ForeignKeyConstraint(['buyer_account_id'], ['accounts.id'], ),
    sa.ForeignKeyConstraint(['currency_id'], ['currencies.id'], ),
    sa.ForeignKeyConstraint(['seller_account_id'], ['accounts.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('payments_batch_idx', 'payments', ['batch_id', 'id'], unique=False, postgresql_where=sa.text('batch_id IS NOT NULL'))
    op.create_index('payments_buyer_idx', 'payments', ['buyer_account_id', 'id'], unique=False)
    op.create_index('payments_pending_idx', 'payments', ['created_at'], unique=False, postgresql_where=sa.text("status = 'pending'"))
    op.create_index('payments_seller_idx', 'payments', ['seller_account_id', 'id'], unique=False)
    op.create_index('payments_status_idx', 'payments', ['status', 'id'], unique=False)
    op.create_table('ledger_entries',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('account_id', sa.BigInteger(), nullable=False),
    sa.Column('payment_id', sa.BigInteger(), nullable=True),
    sa.Column('amount', sa.Numeric(), nullable=False),
    sa.Column('balance_after', sa.Numeric(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint('amount <> 0', name='ledger_entries_amount_nonzero'),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], ),
    sa.ForeignKeyConstraint(['payment_id'], ['payments.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ledger_entries_account_idx', 'ledger_entries', ['account_id', 'id'], unique=False)
    op.create_index('ledger_entries_payment_idx', 'ledger_entries', ['payment_id'], unique=False)
    seed()


# The data is frozen here, not imported from common.models: a migration must not change meaning
# when the application code moves on.
CURRENCIES = [
    (1, "USD", "US Dollar", 2),
    (2, "EUR", "Euro", 2),
    (3, "BTC", "Bitcoin", 8),
    (4, "ETH", "Ether", 18),
]


def seed() -> None:
    for currency_id, code, name, scale in CURRENCIES:
        op.execute(sa.text(
            "INSERT INTO currencies (id, code, name, scale) VALUES (:id, :code, :name, :scale)"
        ).bindparams(id=currency_id, code=code, name=name, scale=scale))
        # The issuance account gives each opening balance its counter-entry; id -currency_id
        # keeps customer ids starting at 1.
        op.execute(sa.text(
            "INSERT INTO accounts (id, name, currency_id, kind) VALUES (:id, :name, :cid, 'issuance')"
        ).bindparams(id=-currency_id, name=f"{code} issuance", cid=currency_id))


def downgrade() -> None:
    op.drop_index('ledger_entries_payment_idx', table_name='ledger_entries')
    op.drop_index('ledger_entries_account_idx', table_name='ledger_entries')
    op.drop_table('ledger_entries')
    op.drop_index('payments_status_idx', table_name='payments')
    op.drop_index('payments_seller_idx', table_name='payments')
    op.drop_index('payments_pending_idx', table_name='payments', postgresql_where=sa.text("status = 'pending'"))
    op.drop_index('payments_buyer_idx', table_name='payments')
    op.drop_index('payments_batch_idx', table_name='payments', postgresql_where=sa.text('batch_id IS NOT NULL'))
    op.drop_table('payments')
    op.drop_index('accounts_currency_id_idx', table_name='accounts')
    op.drop_table('accounts')
    op.drop_table('idempotency_keys')
    op.drop_table('currencies')
    op.drop_table('batches')
    op.drop_table('api_keys')
