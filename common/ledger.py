"""The ledger's rules, written once: accounts, accepting payments, applying them, reconciling.

Every function takes a SQLAlchemy `Session` that is already inside a transaction
(`Database.transaction()` / `Database.run()`); none of them commits. The API and the worker both
call these and nothing else writes balances.

Locking discipline (what makes concurrent application race-free and deadlock-free):
payments are locked before accounts, each set in ascending id order, accounts with
`FOR NO KEY UPDATE` (which does not block the `FOR KEY SHARE` locks that payment inserts take
through their foreign keys).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, localcontext
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from common import money
from common.db import Database, Prepared
from common.errors import (
    CurrencyMismatch, FailureCode, IdempotencyConflict, InvalidAmount, NotFound, SameAccount,
    UnknownAccount, UnknownCurrency, ValidationFailed, WalletError,
)


# --- currencies ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Currency:
    id: int
    code: str
    name: str
    scale: int


class Currencies:
    """The seeded currencies. They never change at run time, so each process loads them once."""

    def __init__(self, rows: Sequence[Currency]):
        self.by_id = {c.id: c for c in rows}
        self.by_code = {c.code: c for c in rows}

    @classmethod
    def load(cls, session: Session) -> "Currencies":
        rows = session.execute(text("SELECT id, code, name, scale FROM currencies ORDER BY id"))
        return cls([Currency(**r) for r in rows.mappings()])

    def resolve(self, currency_id: int | None, code: str | None) -> Currency:
        by_id = self.by_id.get(currency_id) if currency_id is not None else None
        by_code = self.by_code.get(code.upper()) if code is not None else None
        if currency_id is not None and by_id is None:
            raise UnknownCurrency(f"currency_id {currency_id} does not exist")
        if code is not None and by_code is None:
            raise UnknownCurrency(f"currency {code!r} does not exist")
        if by_id and by_code and by_id != by_code:
            raise CurrencyMismatch("currency_id and currency name different currencies")
        currency = by_id or by_code
        if currency is None:
            raise UnknownCurrency("give currency_id or currency")
        return currency


def parse_amount(raw: object, currency: Currency, *, allow_zero: bool = False) -> Decimal:
    try:
        return money.parse_amount(raw, currency.scale, allow_zero=allow_zero)
    except money.AmountError as exc:
        raise InvalidAmount(str(exc), {"reason": exc.reason, "scale": currency.scale}) from exc


# --- idempotency ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class IdempotencyKey:
    scope: str  # the API key's id: one client's keys never collide with another's
    key: str
    request_hash: str

    @classmethod
    def for_request(cls, scope: str, key: str, resource_type: str, request: Mapping[str, Any]):
        canonical = json.dumps([resource_type, request], sort_keys=True, default=str)
        return cls(scope, key, hashlib.sha256(canonical.encode()).hexdigest())


def idempotent(session: Session, key: IdempotencyKey | None, resource_type: str,
               create: Callable[[], Mapping[str, Any]],
               load: Callable[[int], Mapping[str, Any]]) -> tuple[Mapping[str, Any], bool]:
    """Create a resource at most once per key. Returns (resource, created now?).

    The key's primary key decides between concurrent first requests: the second INSERT waits for
    the first transaction and then sees its row. A request that fails rolls its key back with it.
    """
    if key is None:
        return create(), True
    params = {"scope": key.scope, "key": key.key}
    inserted = session.execute(text(
        "INSERT INTO idempotency_keys (scope, key, request_hash, resource_type)"
        " VALUES (:scope, :key, :hash, :type) ON CONFLICT DO NOTHING RETURNING 1"
    ), {**params, "hash": key.request_hash, "type": resource_type}).first()
    if inserted is None:
        row = session.execute(text(
            "SELECT request_hash, resource_type, resource_id FROM idempotency_keys"
            " WHERE scope = :scope AND key = :key"
        ), params).one()
        if row.request_hash != key.request_hash or row.resource_type != resource_type:
            raise IdempotencyConflict(
                "this Idempotency-Key was already used with a different request",
                {"idempotency_key": key.key})
        return load(row.resource_id), False
    resource = create()
    session.execute(text(
        "UPDATE idempotency_keys SET resource_id = :id WHERE scope = :scope AND key = :key"
    ), {**params, "id": resource["id"]})
    return resource, True


# --- accounts ------------------------------------------------------------------------------------

def open_account(session: Session, currency: Currency, name: str, opening: Decimal,
                 key: IdempotencyKey | None = None) -> tuple[Mapping[str, Any], bool]:
    """Returns (account row, created now?)."""
    return idempotent(
        session, key, "account",
        create=lambda: _account_row(session, create_account(session, currency, name, opening)),
        load=lambda account_id: _account_row(session, account_id))


def _account_row(session: Session, account_id: int) -> Mapping[str, Any]:
    return session.execute(text(
        "SELECT id, name, currency_id, balance, status, created_at FROM accounts WHERE id = :id"
    ), {"id": account_id}).mappings().one()


def create_account(session: Session, currency: Currency, name: str, opening: Decimal) -> int:
    """A customer account; its opening amount is moved from the currency's issuance account so
    that every balance is the sum of its entries and each currency's entries sum to zero."""
    account_id = session.execute(text(
        "INSERT INTO accounts (name, currency_id, balance) VALUES (:name, :cid, :amount) RETURNING id"
    ), {"name": name, "cid": currency.id, "amount": opening}).scalar_one()
    if opening:
        issuer_balance = session.execute(text(
            "UPDATE accounts SET balance = balance - :amount, updated_at = now()"
            " WHERE id = :id AND kind = 'issuance' RETURNING balance"
        ), {"amount": opening, "id": issuance_account_id(currency.id)}).scalar_one()
        _insert_entries(session, [
            (issuance_account_id(currency.id), None, -opening, issuer_balance),
            (account_id, None, opening, opening),
        ])
    return account_id


def issuance_account_id(currency_id: int) -> int:
    return -currency_id


def set_account_status(session: Session, account_id: int, status: str) -> None:
    updated = session.execute(text(
        "UPDATE accounts SET status = :status, updated_at = now()"
        " WHERE id = :id AND kind = 'customer' RETURNING id"
    ), {"status": status, "id": account_id}).first()
    if updated is None:
        raise NotFound(f"account {account_id} does not exist")


# --- accepting payments --------------------------------------------------------------------------

@dataclass(frozen=True)
class PaymentRequest:
    buyer_account_id: int
    seller_account_id: int
    amount_raw: object
    currency_id: int | None = None

    def canonical(self, amount: Decimal) -> dict[str, Any]:
        return {"buyer_account_id": self.buyer_account_id, "seller_account_id": self.seller_account_id,
                "amount": money.format_amount(amount), "currency_id": self.currency_id}


PAYMENT_COLUMNS = (
    "id, status, buyer_account_id, seller_account_id, amount, currency_id, failure_code, batch_id,"
    " created_at, completed_at"
)


def check_payment(currencies: Currencies, req: PaymentRequest) -> Decimal:
    """Validate what can be validated before reading the accounts; returns the exact amount.
    The scale is checked against the accounts' currency in `submit_payments`."""
    if req.buyer_account_id == req.seller_account_id:
        raise SameAccount("buyer and seller must be different accounts")
    if req.currency_id is not None and req.currency_id not in currencies.by_id:
        raise UnknownCurrency(f"currency_id {req.currency_id} does not exist")
    return parse_amount(req.amount_raw, WIDEST_CURRENCY)


WIDEST_CURRENCY = Currency(0, "", "", 18)


def submit_payment(session: Session, currencies: Currencies, req: PaymentRequest,
                   key: IdempotencyKey | None = None) -> tuple[Mapping[str, Any], bool]:
    """Record one payment as `pending`. Returns (payment row, created now?)."""
    return idempotent(
        session, key, "payment",
        create=lambda: submit_payments(session, currencies, [req])[0],
        load=lambda payment_id: _payment_rows(session, [payment_id])[0])


def accept_payment(db: Database, currencies: Currencies, req: PaymentRequest,
                   key: IdempotencyKey | None = None) -> tuple[Mapping[str, Any], bool]:
    """`submit_payment` in a transaction of its own, the API's unit of work for POST /payments.

    Without an idempotency key the unit of work is the one INSERT, so it runs alone (autocommit,
    prepared): one round trip instead of three (BEGIN, INSERT, COMMIT) and no planning, on the
    path every single payment takes. Same statement, same checks, same outcome.
    """
    if key is not None:
        with db.transaction() as session:
            return submit_payment(session, currencies, req, key)
    amounts, problems = check_payments(currencies, [req])
    if problems:
        raise problems[0][1]
    rows = db.execute_alone(_INSERT_PAYMENTS_ALONE, _insert_params([req], amounts, None))
    if rows:
        return rows[0], True
    with db.transaction() as session:  # refused: read the accounts to say why
        raise _refused(session, currencies, [req])
def submit_batch(session: Session, currencies: Currencies, reqs: Sequence[PaymentRequest],
                 atomic: bool, key: IdempotencyKey | None = None
                 ) -> tuple[int, list[Mapping[str, Any]], bool]:
    """Record a batch and all its payments in one go. Returns (batch id, payment rows, created?)."""
    def create() -> Mapping[str, Any]:
        batch_id = session.execute(text(
            "INSERT INTO batches (atomic, total) VALUES (:atomic, :total) RETURNING id"
        ), {"atomic": atomic, "total": len(reqs)}).scalar_one()
        return {"id": batch_id, "payments": submit_payments(session, currencies, reqs, batch_id)}

    def load(batch_id: int) -> Mapping[str, Any]:
        ids = session.execute(text("SELECT id FROM payments WHERE batch_id = :id ORDER BY id"),
                              {"id": batch_id}).scalars().all()
        return {"id": batch_id, "payments": _payment_rows(session, list(ids))}

    batch, created = idempotent(session, key, "batch", create=create, load=load)
    return batch["id"], batch["payments"], created


def _payment_rows(session: Session, ids: list[int]) -> list[Mapping[str, Any]]:
    return list(session.execute(text(
        f"SELECT {PAYMENT_COLUMNS} FROM payments WHERE id = ANY(:ids) ORDER BY id"
    ), {"ids": ids}).mappings())


# The accounts are read by primary key into a small materialized set first: joined directly, the
# planner may reach the seller through the currency index (s.currency_id = b.currency_id makes it
# an equivalence) and scan every account of the currency for each payment.
_INSERT_PAYMENTS_SQL = (
    "WITH r AS (SELECT * FROM unnest(CAST(:buyers AS bigint[]), CAST(:sellers AS bigint[]),"
    "                                CAST(:amounts AS numeric[]), CAST(:currencies AS smallint[]))"
    "           WITH ORDINALITY AS r(buyer, seller, amount, currency_id, n)),"
    " known AS MATERIALIZED ("
    "   SELECT a.id, a.currency_id, c.scale FROM accounts a JOIN currencies c ON c.id = a.currency_id"
    "   WHERE a.id = ANY(CAST(:buyers AS bigint[]) || CAST(:sellers AS bigint[]))"
    "     AND a.kind = 'customer')"
    " INSERT INTO payments (buyer_account_id, seller_account_id, currency_id, amount, batch_id)"
    " SELECT r.buyer, r.seller, b.currency_id, r.amount, CAST(:batch_id AS bigint)"
    " FROM r JOIN known b ON b.id = r.buyer JOIN known s ON s.id = r.seller"
    " WHERE s.currency_id = b.currency_id"
    "   AND (r.currency_id IS NULL OR r.currency_id = b.currency_id)"
    "   AND scale(r.amount) <= b.scale"
    " ORDER BY r.n"
    f" RETURNING {PAYMENT_COLUMNS}"
)
_INSERT_PAYMENTS = text(_INSERT_PAYMENTS_SQL)
_INSERT_PAYMENTS_ALONE = Prepared("wallet_insert_payments", _INSERT_PAYMENTS_SQL)


def _insert_params(reqs: Sequence[PaymentRequest], amounts: Sequence[Decimal],
                   batch_id: int | None) -> dict[str, Any]:
    return {
        "batch_id": batch_id,
        "buyers": [r.buyer_account_id for r in reqs],
        "sellers": [r.seller_account_id for r in reqs],
        "amounts": amounts,
        "currencies": [r.currency_id for r in reqs],
    }


def submit_payments(session: Session, currencies: Currencies, reqs: Sequence[PaymentRequest],
                    batch_id: int | None = None) -> list[Mapping[str, Any]]:
    """Record payments as `pending` with one statement, which also checks the accounts exist and
    agree on the currency, and the amount's scale. The rows come back in request order.

    Raises when any request is invalid (the caller's transaction then writes nothing): the
    request's own error for a single payment, ValidationFailed listing every bad item for several.
    """
    amounts, problems = check_payments(currencies, reqs)
    if not problems:
        rows = session.execute(_INSERT_PAYMENTS, _insert_params(reqs, amounts, batch_id)
                               ).mappings().all()
        if len(rows) == len(reqs):
            # INSERT ... SELECT ... ORDER BY takes ids in request order; RETURNING's order is not
            # promised, so sort by id.
            return sorted(rows, key=lambda row: row["id"])
    # Raising rolls back the caller's transaction, with any rows the INSERT did write.
    raise _refused(session, currencies, reqs)


def _refused(session: Session, currencies: Currencies, reqs: Sequence[PaymentRequest]) -> WalletError:
    """The error for requests the INSERT refused: the request's own for a single payment,
    ValidationFailed listing every bad item for several."""
    problems = payment_problems(session, currencies, reqs)
    if not problems:
        raise AssertionError("payments were refused for no known reason")
    if len(reqs) == 1:
        return problems[0][1]
    return batch_refused(problems, len(reqs))


def batch_refused(problems: Sequence[tuple[int, WalletError]], total: int) -> ValidationFailed:
    """The 422 of a batch: every bad item's index with its error."""
    return ValidationFailed(f"{len(problems)} of {total} payments are invalid; none was recorded", [
        {"index": index, "code": exc.code, "message": exc.message, "details": exc.details}
        for index, exc in problems])


def check_payments(currencies: Currencies, reqs: Sequence[PaymentRequest]
                   ) -> tuple[list[Decimal | None], list[tuple[int, WalletError]]]:
    """`check_payment` for each request: (amounts, None where refused; (index, error) refusals)."""
    amounts, problems = [], []
    for index, req in enumerate(reqs):
        try:
            amounts.append(check_payment(currencies, req))
        except WalletError as exc:
            amounts.append(None)
            problems.append((index, exc))
    return amounts, problems


def payment_problems(session: Session, currencies: Currencies, reqs: Sequence[PaymentRequest]
                     ) -> list[tuple[int, WalletError]]:
    """Every refused request with its reason, in index order (the error path of a batch)."""
    amounts, problems = check_payments(currencies, reqs)
    return sorted(problems + _diagnose(session, currencies, reqs, amounts), key=lambda p: p[0])


def _diagnose(session: Session, currencies: Currencies, reqs: Sequence[PaymentRequest],
              amounts: Sequence[Decimal]) -> list[tuple[int, WalletError]]:
    """Only on the error path: which requests the single INSERT refused, and why."""
    ids = sorted({i for r in reqs for i in (r.buyer_account_id, r.seller_account_id)})
    found = {row.id: row.currency_id for row in session.execute(text(
        "SELECT id, currency_id FROM accounts WHERE id = ANY(:ids) AND kind = 'customer'"
    ), {"ids": ids})}
    problems = []
    for index, (req, amount) in enumerate(zip(reqs, amounts)):
        if amount is None:
            continue  # already refused before the accounts were read
        try:
            _check_against_accounts(req, amount, found, currencies)
        except WalletError as exc:
            problems.append((index, exc))
    return problems


def _check_against_accounts(req: PaymentRequest, amount: Decimal, found: Mapping[int, int],
                            currencies: Currencies) -> None:
    for field in ("buyer_account_id", "seller_account_id"):
        account_id = getattr(req, field)
        if account_id not in found:
            raise UnknownAccount(f"account {account_id} does not exist", {"field": field})
    currency_id = found[req.buyer_account_id]
    if found[req.seller_account_id] != currency_id:
        raise CurrencyMismatch("buyer and seller accounts hold different currencies")
    if req.currency_id is not None and req.currency_id != currency_id:
        raise CurrencyMismatch("currency_id differs from the accounts' currency")
    parse_amount(amount, currencies.by_id[currency_id])  # InvalidAmount when past the scale


# --- applying payments ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    payment_id: int
    failure_code: FailureCode | None  # None: completed

    @property
    def status(self) -> str:
        return "completed" if self.failure_code is None else "failed"


_LOCK_PENDING = (
    "SELECT p.id, p.buyer_account_id AS buyer, p.seller_account_id AS seller, p.amount"
    " FROM payments p WHERE {where} AND p.status = 'pending'"
    " ORDER BY p.id FOR UPDATE OF p{skip}"
)


_LOCK_SINGLES = text(_LOCK_PENDING.format(skip=" SKIP LOCKED", where=(
    "p.id = ANY(:ids) AND (p.batch_id IS NULL"
    " OR NOT (SELECT b.atomic FROM batches b WHERE b.id = p.batch_id))")))
_LOCK_BATCH = text(_LOCK_PENDING.format(skip="", where="p.batch_id = :batch_id"))


def apply_payments(session: Session, payment_ids: Sequence[int]) -> list[Outcome]:
    """Apply the still-pending payments among `payment_ids`, each on its own merits, in id order.

    Payments already terminal are skipped, so a redelivered or re-swept message is harmless.
    Payments of atomic batches are left to `apply_atomic_batch`.
    """
    # SKIP LOCKED: a payment locked right now is being applied by another transaction (a
    # redelivered or re-swept copy of its message); waiting for it would only find it terminal.
    # Should that transaction roll back instead, the payment is still pending and is swept again.
    payments = session.execute(_LOCK_SINGLES, {"ids": list(payment_ids)}).all()
    return _apply(session, payments, atomic=False)


def apply_atomic_batch(session: Session, batch_id: int) -> list[Outcome]:
    """All payments of an atomic batch complete together, or all fail together."""
    # No SKIP LOCKED here: an atomic batch must see all of its payments, so it waits.
    payments = session.execute(_LOCK_BATCH, {"batch_id": batch_id}).all()
    return _apply(session, payments, atomic=True)


def _apply(session: Session, payments: Sequence[Any], *, atomic: bool) -> list[Outcome]:
    if not payments:
        return []
    account_ids = sorted({i for p in payments for i in (p.buyer, p.seller)})
    accounts = {row.id: row for row in session.execute(text(
        "SELECT id, balance, status FROM accounts WHERE id = ANY(:ids)"
        " ORDER BY id FOR NO KEY UPDATE"
    ), {"ids": account_ids})}
    balances = {i: row.balance for i, row in accounts.items()}
    outcomes, entries = [], []
    with localcontext(money.MONEY_CONTEXT):
        for p in payments:
            code = _refusal(p, accounts, balances)
            outcomes.append(Outcome(p.id, code))
            if code is None:
                balances[p.buyer] -= p.amount
                balances[p.seller] += p.amount
                entries.append((p.buyer, p.id, -p.amount, balances[p.buyer]))
                entries.append((p.seller, p.id, p.amount, balances[p.seller]))
    if atomic and any(o.failure_code for o in outcomes):
        outcomes = [Outcome(o.payment_id, o.failure_code or FailureCode.BATCH_FAILED) for o in outcomes]
        entries, balances = [], {i: row.balance for i, row in accounts.items()}
    changed = {i: b for i, b in balances.items() if b != accounts[i].balance}
    # One round trip for all the writes: balances, entries and payment statuses.
    session.execute(text(
        "WITH balances AS ("
        "  UPDATE accounts a SET balance = v.balance, updated_at = now()"
        "  FROM unnest(CAST(:account_ids AS bigint[]), CAST(:balances AS numeric[])) AS v(id, balance)"
        "  WHERE a.id = v.id RETURNING 1),"
        f" entries AS ({_INSERT_ENTRIES} RETURNING 1)"
        " UPDATE payments p SET status = v.status, failure_code = v.code, completed_at = now()"
        " FROM unnest(CAST(:ids AS bigint[]), CAST(:statuses AS text[]), CAST(:codes AS text[]))"
        "      AS v(id, status, code)"
        " WHERE p.id = v.id"
    ), {"account_ids": list(changed), "balances": list(changed.values()), **_entry_params(entries),
        "ids": [o.payment_id for o in outcomes], "statuses": [o.status for o in outcomes],
        "codes": [o.failure_code and str(o.failure_code) for o in outcomes]})
    return outcomes


def _refusal(p: Any, accounts: Mapping[int, Any], balances: Mapping[int, Decimal]) -> FailureCode | None:
    if accounts[p.buyer].status != "active" or accounts[p.seller].status != "active":
        return FailureCode.ACCOUNT_FROZEN
    if balances[p.buyer] < p.amount:
        return FailureCode.INSUFFICIENT_FUNDS
    return None


_INSERT_ENTRIES = (
    "INSERT INTO ledger_entries (account_id, payment_id, amount, balance_after)"
    " SELECT e.account_id, e.payment_id, e.amount, e.balance_after"
    " FROM unnest(CAST(:entry_accounts AS bigint[]), CAST(:entry_payments AS bigint[]),"
    "             CAST(:entry_amounts AS numeric[]), CAST(:entry_after AS numeric[]))"
    "      WITH ORDINALITY AS e(account_id, payment_id, amount, balance_after, n)"
    " ORDER BY e.n"
)


def _entry_params(entries: Sequence[tuple]) -> dict[str, list]:
    """entries: (account_id, payment_id, signed amount, balance after), in the order they happened."""
    columns = [list(col) for col in zip(*entries)] or [[], [], [], []]
    return dict(zip(("entry_accounts", "entry_payments", "entry_amounts", "entry_after"), columns))


def _insert_entries(session: Session, entries: Sequence[tuple]) -> None:
    session.execute(text(_INSERT_ENTRIES), _entry_params(entries))


# --- reconciliation ------------------------------------------------------------------------------

def reconcile(session: Session) -> list[str]:
    """Check invariants 1-3 (and the entry/payment correspondence); returns the violations."""
    problems = []
    for row in session.execute(text(
        "SELECT c.code, sum(a.balance) AS total FROM accounts a JOIN currencies c ON c.id = a.currency_id"
        " GROUP BY c.code HAVING sum(a.balance) <> 0"
    )):
        problems.append(f"{row.code}: balances sum to {row.total}, not 0: money was created or destroyed")
    for row in session.execute(text(
        "SELECT id, balance FROM accounts WHERE kind = 'customer' AND balance < 0"
    )):
        problems.append(f"account {row.id}: negative balance {row.balance}")
    for row in session.execute(text(
        "SELECT a.id, a.balance, coalesce(e.total, 0) AS entries FROM accounts a"
        " LEFT JOIN (SELECT account_id, sum(amount) AS total FROM ledger_entries GROUP BY account_id) e"
        "   ON e.account_id = a.id"
        " WHERE a.balance <> coalesce(e.total, 0)"
    )):
        problems.append(f"account {row.id}: balance {row.balance} but its entries sum to {row.entries}")
    for row in session.execute(text(
        "SELECT p.id, p.status, count(e.id) AS entries FROM payments p"
        " LEFT JOIN ledger_entries e ON e.payment_id = p.id GROUP BY p.id, p.status"
        " HAVING count(e.id) <> CASE WHEN p.status = 'completed' THEN 2 ELSE 0 END"
    )):
        problems.append(f"payment {row.id}: {row.status} with {row.entries} ledger entries")
    return problems
