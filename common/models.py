"""The schema, as SQLAlchemy tables. Alembic migrations create it; these describe it to queries.

Table and column names are part of the operators' contract (dashboards and audits query them).
"""
from __future__ import annotations

from sqlalchemy import (
    BigInteger, Boolean, CheckConstraint, Column, DateTime, ForeignKey, Index, Integer, MetaData,
    Numeric, PrimaryKeyConstraint, SmallInteger, String, Table, Text, UniqueConstraint, func, text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSON, JSONB
from sqlalchemy.types import UserDefinedType


class Xid8(UserDefinedType):
    """PostgreSQL's 64-bit transaction id: the events feed orders by it (common.ledger.events)."""
    cache_ok = True

    def get_col_spec(self, **_):
        return "xid8"


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
    # The sum of the amounts of its authorized payments as buyer: reserved, not yet moved.
    # available = balance - held.
    Column("held", Money, nullable=False, server_default="0"),
    Column("metadata", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("kind", String(16), nullable=False, server_default="customer"),
    Column("status", String(16), nullable=False, server_default="active"),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("kind <> 'customer' OR balance >= 0", name="accounts_customer_balance_nonnegative"),
    CheckConstraint("held >= 0", name="accounts_held_nonnegative"),
    CheckConstraint("kind <> 'customer' OR balance - held >= 0",
                    name="accounts_customer_available_nonnegative"),
    CheckConstraint("kind IN ('customer', 'issuance')", name="accounts_kind_valid"),
    CheckConstraint("status IN ('active', 'frozen')", name="accounts_status_valid"),
    Index("accounts_currency_id_idx", "currency_id", "id"),
)

batches = Table(
    "batches", metadata,
    Column("id", BigInteger, primary_key=True),
    Column("atomic", Boolean, nullable=False),
    Column("total", Integer, nullable=False),
    # How many of its payments have left `pending`: the transaction that brings it to `total`
    # writes the one batch.finished event.
    Column("settled", Integer, nullable=False, server_default="0"),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

payments = Table(
    "payments", metadata,
    Column("id", BigInteger, primary_key=True),
    # No foreign keys on these three: the INSERT that records a payment joins its accounts, and
    # accounts and currencies are never removed (triggers; migration 0004 says why).
    Column("buyer_account_id", BigInteger, nullable=False),
    Column("seller_account_id", BigInteger, nullable=False),
    Column("currency_id", SmallInteger, nullable=False),
    Column("amount", Money, nullable=False),
    Column("status", String(16), nullable=False, server_default="pending"),
    Column("failure_code", String(32)),
    # No foreign key: the statement that records a batch's payments follows the INSERT of the batch,
    # in its transaction, and batches are never removed (triggers; migration 0007 says why).
    Column("batch_id", BigInteger),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # Set when the payment reaches a terminal state (completed, failed, canceled).
    Column("completed_at", DateTime(timezone=True)),
    # 'manual': applying only reserves the amount (status 'authorized'); a capture moves it.
    Column("capture_method", String(16), nullable=False, server_default="automatic"),
    Column("amount_captured", Money),  # what moved buyer to seller; set once completed
    Column("amount_refunded", Money, nullable=False, server_default="0"),  # completed refunds
    Column("refund_of", BigInteger, ForeignKey("payments.id")),
    Column("authorization_expires_at", DateTime(timezone=True)),  # manual payments only
    Column("cancellation_reason", String(16)),
    Column("reference", String(128)),
    Column("metadata", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    # When the sweeper last re-enqueued it: a payment is re-sent at most once per sweep period.
    Column("swept_at", DateTime(timezone=True)),
    CheckConstraint("amount > 0", name="payments_amount_positive"),
    CheckConstraint("buyer_account_id <> seller_account_id", name="payments_distinct_accounts"),
    CheckConstraint("status IN ('pending', 'completed', 'failed', 'authorized', 'canceled')",
                    name="payments_status_valid"),
    CheckConstraint("(status = 'failed') = (failure_code IS NOT NULL)", name="payments_failure_code_iff_failed"),
    CheckConstraint("(status IN ('pending', 'authorized')) = (completed_at IS NULL)",
                    name="payments_completed_at_iff_terminal"),
    CheckConstraint("capture_method IN ('automatic', 'manual')", name="payments_capture_method_valid"),
    CheckConstraint("(capture_method = 'manual') = (authorization_expires_at IS NOT NULL)",
                    name="payments_expiry_iff_manual"),
    CheckConstraint("status <> 'authorized' OR capture_method = 'manual'",
                    name="payments_authorized_only_manual"),
    CheckConstraint("(status = 'canceled') = (cancellation_reason IS NOT NULL)",
                    name="payments_cancellation_reason_iff_canceled"),
    CheckConstraint("cancellation_reason IN ('requested', 'expired')",
                    name="payments_cancellation_reason_valid"),
    CheckConstraint("(status = 'completed') = (amount_captured IS NOT NULL)",
                    name="payments_captured_iff_completed"),
    CheckConstraint("amount_captured > 0 AND amount_captured <= amount", name="payments_captured_range"),
    CheckConstraint("amount_refunded >= 0 AND amount_refunded <= coalesce(amount_captured, 0)",
                    name="payments_refunded_range"),
    CheckConstraint("refund_of IS NULL OR capture_method = 'automatic'", name="payments_refund_automatic"),
    Index("payments_buyer_idx", "buyer_account_id", "id"),
    Index("payments_seller_idx", "seller_account_id", "id"),
    Index("payments_batch_idx", "batch_id", "id", postgresql_where=text("batch_id IS NOT NULL")),
    # No index names `status` (nor any other column the apply UPDATE changes): that UPDATE is then
    # heap-only, and the table's fillfactor (45, migration 0006) leaves it room on the page. The
    # open payments are found through `open_payments`; failed and canceled ones through these.
    Index("payments_failed_idx", "id", postgresql_where=text("failure_code IS NOT NULL")),
    Index("payments_canceled_idx", "id", postgresql_where=text("cancellation_reason IS NOT NULL")),
    Index("payments_refund_of_idx", "refund_of", "id", postgresql_where=text("refund_of IS NOT NULL")),
    Index("payments_reference_idx", "reference", "id", postgresql_where=text("reference IS NOT NULL")),
)

# The pending and authorized payments, one row each: what indexes on payments.status would give,
# kept by statement triggers on `payments` (migration 0006) in the writing transaction. Readers
# join `payments`, whose status stays the authority; reconcile checks the two agree.
open_payments = Table(
    "open_payments", metadata,
    Column("payment_id", BigInteger, primary_key=True),
    Column("status", String(16), nullable=False),
    Column("authorization_expires_at", DateTime(timezone=True)),
    CheckConstraint("status IN ('pending', 'authorized')", name="open_payments_status_valid"),
    Index("open_payments_expiry_idx", "authorization_expires_at",
          postgresql_where=text("status = 'authorized'")),
)

ledger_entries = Table(
    "ledger_entries", metadata,
    Column("id", BigInteger, nullable=False, autoincrement=True),  # its sequence, from 0001
    # No foreign keys: entries are written only for accounts and payments their statement holds,
    # and neither is ever removed (triggers; migration 0005 says why).
    Column("account_id", BigInteger, nullable=False),
    Column("payment_id", BigInteger),
    Column("amount", Money, nullable=False),
    Column("balance_after", Money, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("amount <> 0", name="ledger_entries_amount_nonzero"),
    # (account_id, id): the order the balance history reads. Nothing reads an entry by its id
    # alone, nor by its payment, so neither has an index of its own (migration 0007).
    PrimaryKeyConstraint("account_id", "id", name="ledger_entries_pkey"),
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

# The transactional outbox: one row per status change, written in the change's transaction.
events = Table(
    "events", metadata,
    Column("id", BigInteger, primary_key=True),
    Column("txid", Xid8, nullable=False, server_default=text("pg_current_xact_id()")),
    Column("type", String(32), nullable=False),
    Column("object_id", BigInteger, nullable=False),
    Column("object", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("events_feed_idx", "txid", "id"),
    Index("events_type_feed_idx", "type", "txid", "id"),
)

webhook_endpoints = Table(
    "webhook_endpoints", metadata,
    Column("id", BigInteger, primary_key=True),
    Column("url", Text, nullable=False),
    Column("events", ARRAY(Text), nullable=False),
    Column("secret", Text, nullable=False),
    Column("metadata", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("deleted_at", DateTime(timezone=True)),
    Index("webhook_endpoints_active_idx", "id", postgresql_where=text("deleted_at IS NULL")),
)

webhook_deliveries = Table(
    "webhook_deliveries", metadata,
    Column("id", BigInteger, primary_key=True),
    Column("endpoint_id", BigInteger, ForeignKey("webhook_endpoints.id"), nullable=False),
    Column("event_id", BigInteger, ForeignKey("events.id"), nullable=False),
    Column("status", String(16), nullable=False, server_default="pending"),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("last_http_status", Integer),
    Column("last_error", Text),
    Column("delivered_at", DateTime(timezone=True)),
    Column("next_attempt_at", DateTime(timezone=True)),
    Column("enqueued_at", DateTime(timezone=True)),
    Column("lease_until", DateTime(timezone=True)),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("status IN ('pending', 'delivered', 'failed', 'canceled')",
                    name="webhook_deliveries_status_valid"),
    CheckConstraint("(status = 'pending') = (next_attempt_at IS NOT NULL)",
                    name="webhook_deliveries_next_attempt_iff_pending"),
    CheckConstraint("(status = 'delivered') = (delivered_at IS NOT NULL)",
                    name="webhook_deliveries_delivered_at_iff_delivered"),
    UniqueConstraint("endpoint_id", "event_id", name="webhook_deliveries_endpoint_event_key"),
    Index("webhook_deliveries_endpoint_idx", "endpoint_id", "id"),
    Index("webhook_deliveries_due_idx", "next_attempt_at", postgresql_where=text("status = 'pending'")),
    Index("webhook_deliveries_undelivered_idx", "event_id", postgresql_where=text("status = 'pending'")),
)

# The fan-out's cursor in the events feed: one row.
webhook_fanout = Table(
    "webhook_fanout", metadata,
    Column("id", SmallInteger, primary_key=True, autoincrement=False),
    Column("txid", Xid8, nullable=False),
    Column("event_id", BigInteger, nullable=False),
    CheckConstraint("id = 1", name="webhook_fanout_id_check"),
)
