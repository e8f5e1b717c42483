"""ledger_entries: their account and payment are guaranteed by the statement that writes them, not
by foreign-key triggers; payments can no longer be deleted, entries no longer changed or deleted.

Why: every applied payment writes two entries, and each entry ran two foreign-key checks (its
account, its payment): four queries per payment, on rows the same statement has just locked and
updated. They were ~17 % of PostgreSQL's CPU in applying a payment (104 -> 86 us a payment, in
sets of 500; bench/NOTES.md, 2026-12-02 evening).

What still holds, and where:
- entries are written only by the worker's write statement (common.ledger.applying, holds,
  refunds) and by account creation, for accounts they hold locked and payments they update in
  the same statement, so both exist;
- accounts are never removed (migration 0004), and now payments neither: the ledger is
  append-only, so an entry never comes to name a missing row;
- an entry, once written, is never updated nor deleted (the balance_after of every later entry
  of its account rests on it);
- reconcile reports any entry naming a missing account or payment.

Revision ID: 0005
Revises: 0004
"""
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

_DROPPED = (
    ("ledger_entries_account_id_fkey", "account_id", "accounts"),
    ("ledger_entries_payment_id_fkey", "payment_id", "payments"),
)


def upgrade() -> None:
    for name, _column, _table in _DROPPED:
        op.drop_constraint(name, "ledger_entries", type_="foreignkey")
    op.execute(
        "CREATE FUNCTION wallet_refuse_ledger_change() RETURNS trigger LANGUAGE plpgsql AS $$"
        " BEGIN"
        "   RAISE EXCEPTION '% on %: the ledger is append-only', TG_OP, TG_TABLE_NAME"
        "     USING ERRCODE = 'restrict_violation';"
        " END $$")
    op.execute("CREATE TRIGGER payments_never_deleted BEFORE DELETE ON payments"
               " FOR EACH ROW EXECUTE FUNCTION wallet_refuse_ledger_change()")
    op.execute("CREATE TRIGGER ledger_entries_never_changed BEFORE UPDATE OR DELETE ON ledger_entries"
               " FOR EACH ROW EXECUTE FUNCTION wallet_refuse_ledger_change()")
    for table in ("payments", "ledger_entries"):
        op.execute(f"CREATE TRIGGER {table}_never_truncated BEFORE TRUNCATE ON {table}"
                   " FOR EACH STATEMENT EXECUTE FUNCTION wallet_refuse_ledger_change()")


def downgrade() -> None:
    for table in ("payments", "ledger_entries"):
        op.execute(f"DROP TRIGGER {table}_never_truncated ON {table}")
    op.execute("DROP TRIGGER ledger_entries_never_changed ON ledger_entries")
    op.execute("DROP TRIGGER payments_never_deleted ON payments")
    op.execute("DROP FUNCTION wallet_refuse_ledger_change()")
    for name, column, table in _DROPPED:
        op.create_foreign_key(name, "ledger_entries", table, [column], ["id"])
