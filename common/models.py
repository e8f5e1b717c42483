"""The schema, as SQLAlchemy tables. Alembic migrations create it; these describe it to queries.

Table and column names are part of the operators' contract (dashboards and audits query them).
"""
from __future__ import annotations

from sqlalchemy import (
    BigInteger, Boolean, CheckConstraint, Column, DateTime, ForeignKey, Index, Integer, MetaData,
    Numeric, SmallInteger, String, Table, func, text,
)

metadata = MetaData()

# Unconstrained NUMERIC stores every amount exactly; the API enforces each currency's scale.
Money = Numeric(asdecimal=True)

currencies = Table(
    "currencies", metadata,
    Column("id", SmallInteger, primary_key=True),
    Column("code", String(12), nullable=False, unique=True),
    Column("name", String(64), nullable=False),
    Column("scale", SmallInteger, nullable=False),
    CheckConstraint("scale BETWEEN 0 AND 18", name="currencies_scale_range"),
)

# kind 'issuance' is the one system account per currency that issues opening balances; it has
# id = -currency_id (so customer ids start at 1) and is the only account allowed below zero.
accounts = Table(
    "accounts", metadata,
    Column("id", BigInteger, primary_key=True),
    Column("name", String(200), nullable=False),
    Column("currency_id", SmallInteger, ForeignKey("currencies.id"), nullable=False),
    Column("balance", Money, nullable=False, server_default="0"),
    Column("kind", String(16), nullable=False, server_default="customer"),
    Column("status", String(16), nullable=False, server_default="active"),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("kind <> 'customer' OR balance >= 0", name="accounts_customer_balance_nonnegative"),
    CheckConstraint("kind IN ('customer', 'issuance')", name="accounts_kind_valid"),
    CheckConstraint("status IN ('active', 'frozen')", name="accounts_status_valid"),
    Index("accounts_currency_id_idx", "currency_id", "id"),
)

batches = Table(
    "batches", metadata,
    Column("id", BigInteger, primary_key=True),
    Column("atomic", Boolean, nullable=False),
    Column("total", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

payments = Table(
    "payments", metadata,
    Column("id", BigInteger, primary_key=True),
    Column("buyer_account_id", BigInteger, ForeignKey("accounts.id"), nullable=False),
    Column("seller_account_id", BigInteger, ForeignKey("accounts.id"), nullable=False),
    Column("currency_id", SmallInteger, ForeignKey("currencies.id"), nullable=False),
    Column("amount", Money, nullable=False),
    Column("status", String(16), nullable=False, server_default="pending"),
    Column("failure_code", String(32)),
    Column("batch_id", BigInteger, ForeignKey("batches.id")),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("completed_at", DateTime(timezone=True)),
    # When the sweeper last re-enqueued it: a payment is re-sent at most once per sweep period.
    Column("swept_at", DateTime(timezone=True)),
    CheckConstraint("amount > 0", name="payments_amount_positive"),
    CheckConstraint("buyer_account_id <> seller_account_id", name="payments_distinct_accounts"),
    CheckConstraint("status IN ('pending', 'completed', 'failed')", name="payments_status_valid"),
    CheckConstraint("(status = 'failed') = (failure_code IS NOT NULL)", name="payments_failure_code_iff_failed"),
    CheckConstraint("(status = 'pending') = (completed_at IS NULL)", name="payments_completed_at_iff_terminal"),
    Index("payments_pending_idx", "created_at", postgresql_where=text("status = 'pending'")),
    Index("payments_buyer_idx", "buyer_account_id", "id"),
    Index("payments_seller_idx", "seller_account_id", "id"),
    Index("payments_batch_idx", "batch_id", "id", postgresql_where=text("batch_id IS NOT NULL")),
    Index("payments_status_idx", "status", "id"),
)

ledger_entries = Table(
    "ledger_entries", metadata,
    Column("id", BigInteger, primary_key=True),
    Column("account_id", BigInteger, ForeignKey("accounts.id"), nullable=False),
    Column("payment_id", BigInteger, ForeignKey("payments.id")),
    Column("amount", Money, nullable=False),
    Column("balance_after", Money, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("amount <> 0", name="ledger_entries_amount_nonzero"),
    Index("ledger_entries_account_idx", "account_id", "id"),
    Index("ledger_entries_payment_idx", "payment_id"),
)

# One row per Idempotency-Key, scoped to the API key that sent it. Its primary key is what makes
# two concurrent first requests with one key create exactly one resource.
idempotency_keys = Table(
    "idempotency_keys", metadata,
    Column("scope", String(64), primary_key=True),
    Column("key", String(255), primary_key=True),
    Column("request_hash", String(64), nullable=False),
    Column("resource_type", String(16), nullable=False),
    Column("resource_id", BigInteger),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

api_keys = Table(
    "api_keys", metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(100), nullable=False),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("revoked_at", DateTime(timezone=True)),
)
