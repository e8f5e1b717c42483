"""The ledger's rules, written once: one module per concern, all re-exported here.

Every function takes a SQLAlchemy `Session` that is already inside a transaction (the unit of
work of `common.db.Database`); none of them commits. The API and the worker both call these and
nothing else writes balances.

- currencies: the seeded currencies, amounts against a currency's scale
- idempotency: at most one resource per Idempotency-Key
- accounts: opening and freezing accounts
- accepting: validating and recording payments as `pending`
- directory: what never changes about an account (its currency), remembered per process
- applying: the worker's side, moving money or holding it (locking discipline in its docstring)
- holds: capturing, canceling and expiring authorized payments
- refunds: refunds as payments of their own, never more than was captured
- entries: the ledger entries every balance change writes
- isolating: failing what cannot be applied (internal_error), so it holds up nothing
- reconciling: the invariants over the whole database
- events: the outbox (an event per status change, in its transaction) and the feed
"""
from common.ledger.accepting import (
    PAYMENT_COLUMNS, PaymentRequest, accept_payment, batch_refused, check_payment, check_payments,
    payment_problems, single_inserts, submit_batch, submit_payment, submit_payments,
)
from common.ledger.accounts import create_account, issuance_account_id, open_account, set_account_status
from common.ledger.applying import Outcome, apply_as_one_set, apply_atomic_batch, apply_payments
from common.ledger.currencies import WIDEST_CURRENCY, Currencies, Currency, parse_amount
from common.ledger.directory import AccountDirectory
from common.ledger.events import record_batch_finished, record_payment_events
from common.ledger.holds import cancel_payment, capture_payment, expire_authorizations
from common.ledger.idempotency import IdempotencyKey, idempotent, replayed
from common.ledger.isolating import fail_payments
from common.ledger.reconciling import reconcile
from common.ledger.refunds import refund_payment

__all__ = [
    "PAYMENT_COLUMNS", "WIDEST_CURRENCY", "AccountDirectory", "Currencies", "Currency", "IdempotencyKey", "Outcome",
    "PaymentRequest", "accept_payment", "apply_as_one_set", "apply_atomic_batch", "apply_payments",
    "batch_refused", "cancel_payment", "capture_payment", "check_payment", "check_payments",
    "create_account", "expire_authorizations", "fail_payments", "idempotent", "issuance_account_id",
    "open_account", "parse_amount", "payment_problems", "reconcile", "record_batch_finished",
    "record_payment_events", "refund_payment", "replayed",
    "set_account_status", "single_inserts", "submit_batch",
    "submit_payment", "submit_payments",
]
