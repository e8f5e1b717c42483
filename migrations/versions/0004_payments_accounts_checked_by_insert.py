"""payments: its accounts and currency are checked by the INSERT that records it, not by
foreign-key triggers; accounts and currencies can no longer be deleted (or truncated).

Why: a foreign-key check locks the referenced row FOR KEY SHARE, per inserted payment: every
payment locked its two accounts and the one currency row. Those locks are WAL-logged, and with
other transactions holding the same rows (the workers lock the accounts, every API transaction
the currency) each becomes a MultiXact. The three checks cost ~40 % of a batch INSERT on its own
(bench/NOTES.md, 2026-12-02), and the INSERT is the largest statement PostgreSQL runs.

What still holds, and where:
- the INSERT joins the accounts it names (common.ledger.accepting: existing customer accounts of
  one currency, the amount's scale): a payment naming anything else is not written;
- an account or a currency row, once it exists, exists for good: the triggers below refuse
  DELETE and TRUNCATE, so no payment can come to name a missing one; reconcile checks it too;
- payments.batch_id and refund_of keep their foreign keys (their rows are the transaction's own or
  rare), and so do ledger_entries (their rows are already locked by the worker's transaction).

Revision ID: 0004
Revises: 0003
"""
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

_DROPPED = (
    ("payments_buyer_account_id_fkey", "buyer_account_id", "accounts"),
    ("payments_seller_account_id_fkey", "seller_account_id", "accounts"),
    ("payments_currency_id_fkey", "currency_id", "currencies"),
)
_KEPT_FOREVER = ("accounts", "currencies")


def upgrade() -> None:
    for name, _column, _table in _DROPPED:
        op.drop_constraint(name, "payments", type_="foreignkey")
    op.execute(
        "CREATE FUNCTION wallet_refuse_removal() RETURNS trigger LANGUAGE plpgsql AS $$"
        " BEGIN"
        "   RAISE EXCEPTION '% rows are never removed: payments name them', TG_TABLE_NAME"
        "     USING ERRCODE = 'restrict_violation';"
        " END $$")
    for table in _KEPT_FOREVER:
        op.execute(f"CREATE TRIGGER {table}_never_deleted BEFORE DELETE ON {table}"
                   " FOR EACH ROW EXECUTE FUNCTION wallet_refuse_removal()")
        op.execute(f"CREATE TRIGGER {table}_never_truncated BEFORE TRUNCATE ON {table}"
                   " FOR EACH STATEMENT EXECUTE FUNCTION wallet_refuse_removal()")


def downgrade() -> None:
    for table in _KEPT_FOREVER:
        op.execute(f"DROP TRIGGER {table}_never_truncated ON {table}")
        op.execute(f"DROP TRIGGER {table}_never_deleted ON {table}")
    op.execute("DROP FUNCTION wallet_refuse_removal()")
    for name, column, table in _DROPPED:
        op.create_foreign_key(name, "payments", table, [column], ["id"])
