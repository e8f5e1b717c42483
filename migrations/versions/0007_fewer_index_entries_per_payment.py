"""Fewer index entries per payment: ledger_entries keyed by (account_id, id) with no index on
payment_id, and payments.batch_id guaranteed by the accepting statement, not by a foreign key.

Why: an applied payment wrote 17 index entries (pg_waldump, `bench.profile_paths`), more WAL than
its rows. Two entries per payment each went into three indexes: the primary key on `id`, the
history's `(account_id, id)` and `payment_id`. Nothing reads entries by `id` alone or by
`payment_id` (reconcile scans them all); the history reads `(account_id, id)`, which is unique
since `id` is. So that index becomes the primary key, and the other two go: four index entries
and about 300 bytes of WAL less per payment (bench/NOTES.md, 2026-12-03).

Every payment of a batch ran the foreign-key check of `batch_id` (a query and a row lock on the
batch, per row), on the batch row the same transaction had inserted just before
(common.ledger.accepting.submit_batch). That is what guarantees it now, with batches never
deleted (a trigger, as payments since 0005); reconcile reports a payment naming a missing batch.

Not safe to run under write load: adding the primary key builds an index over ledger_entries
while holding it locked against writes (minutes on a large ledger); run it in a maintenance
window, with the workers stopped.

Revision ID: 0007
Revises: 0006
"""
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_constraint("payments_batch_id_fkey", "payments", type_="foreignkey")
    op.execute("CREATE TRIGGER batches_never_deleted BEFORE DELETE ON batches"
               " FOR EACH ROW EXECUTE FUNCTION wallet_refuse_ledger_change()")
    op.execute("CREATE TRIGGER batches_never_truncated BEFORE TRUNCATE ON batches"
               " FOR EACH STATEMENT EXECUTE FUNCTION wallet_refuse_ledger_change()")
    op.drop_index("ledger_entries_payment_idx", table_name="ledger_entries")
    op.drop_constraint("ledger_entries_pkey", "ledger_entries", type_="primary")
    op.create_primary_key("ledger_entries_pkey", "ledger_entries", ["account_id", "id"])
    op.drop_index("ledger_entries_account_idx", table_name="ledger_entries")


def downgrade() -> None:
    op.create_index("ledger_entries_account_idx", "ledger_entries", ["account_id", "id"])
    op.drop_constraint("ledger_entries_pkey", "ledger_entries", type_="primary")
    op.create_primary_key("ledger_entries_pkey", "ledger_entries", ["id"])
    op.create_index("ledger_entries_payment_idx", "ledger_entries", ["payment_id"])
    op.execute("DROP TRIGGER batches_never_truncated ON batches")
    op.execute("DROP TRIGGER batches_never_deleted ON batches")
    op.create_foreign_key("payments_batch_id_fkey", "payments", "batches", ["batch_id"], ["id"])
