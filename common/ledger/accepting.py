"""Accepting payments: validate, then record them `pending` with one statement.

What is refused here writes nothing; what is accepted is applied later by a worker
(common.ledger.applying)."""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.orm import Session

from common import metrics, money, pgarray
from common.db import Database, Prepared
from common.errors import CurrencyMismatch, SameAccount, UnknownAccount, UnknownCurrency, ValidationFailed, WalletError
from common.group_commit import GroupCommit
from common.ledger.currencies import WIDEST_CURRENCY, Currencies, parse_amount
from common.ledger.directory import AccountDirectory
from common.ledger.idempotency import IdempotencyKey, idempotent

CAPTURE_METHODS = ("automatic", "manual")
DEFAULT_AUTHORIZATION_SECONDS = 7 * 24 * 3600
MAX_AUTHORIZATION_SECONDS = 30 * 24 * 3600


@dataclass(frozen=True)
class PaymentRequest:
    buyer_account_id: int
    seller_account_id: int
    amount_raw: object
    currency_id: int | None = None
    capture_method: str = "automatic"
    authorization_expires_in: int | None = None  # seconds from acceptance; manual payments only
    reference: str | None = None
    metadata: Mapping[str, str] | None = None
    refund_of: int | None = None  # set by common.ledger.refunds, never by a client

    @property
    def expires_in_seconds(self) -> int | None:
        if self.capture_method != "manual":
            return None
        return self.authorization_expires_in or DEFAULT_AUTHORIZATION_SECONDS

    def canonical(self, amount: Decimal) -> dict[str, Any]:
        return {"buyer_account_id": self.buyer_account_id, "seller_account_id": self.seller_account_id,
                "amount": money.format_amount(amount), "currency_id": self.currency_id,
                "capture_method": self.capture_method, "authorization_expires_in": self.expires_in_seconds,
                "reference": self.reference, "metadata": dict(self.metadata or {})}


PAYMENT_COLUMNS = (
    "id, status, buyer_account_id, seller_account_id, amount, currency_id, failure_code, batch_id,"
    " created_at, completed_at, capture_method, amount_captured, amount_refunded, refund_of,"
    " authorization_expires_at, cancellation_reason, reference, metadata"
)


def check_payment(currencies: Currencies, req: PaymentRequest) -> Decimal:
    """Validate what can be validated before reading the accounts; returns the exact amount.
    The scale is checked against the accounts' currency in `submit_payments`."""
    if req.buyer_account_id == req.seller_account_id:
        raise SameAccount("buyer and seller must be different accounts")
    if req.currency_id is not None and req.currency_id not in currencies.by_id:
        raise UnknownCurrency(f"currency_id {req.currency_id} does not exist")
    if req.capture_method not in CAPTURE_METHODS:
        raise ValidationFailed("capture_method must be automatic or manual", {"field": "capture_method"})
    if req.authorization_expires_in is not None and req.capture_method != "manual":
        raise ValidationFailed("authorization_expires_in is for capture_method manual only",
                               {"field": "authorization_expires_in"})
    return parse_amount(req.amount_raw, WIDEST_CURRENCY)



def submit_payment(session: Session, currencies: Currencies, req: PaymentRequest,
                   key: IdempotencyKey | None = None) -> tuple[Mapping[str, Any], bool]:
    """Record one payment as `pending`. Returns (payment row, created now?)."""
    return idempotent(
        session, key, "payment",
        create=lambda: submit_payments(session, currencies, [req])[0],
        load=lambda payment_id: payment_rows(session, [payment_id])[0])


def accept_payment(db: Database, currencies: Currencies, req: PaymentRequest,
                   key: IdempotencyKey | None = None, *, together: SingleInserts | None = None
                   ) -> tuple[Mapping[str, Any], bool]:
    """`submit_payment` in a transaction of its own, the API's unit of work for POST /payments.

    Without an idempotency key the unit of work is the one INSERT, so it runs alone (autocommit,
    prepared): one round trip instead of three (BEGIN, INSERT, COMMIT) and no planning, on the
    path every single payment takes. Same statement, same checks, same outcome. `together`: the
    process's group commit (`single_inserts`), which shares that INSERT with the single payments
    its other threads accept at the same moment.
    """
    if key is not None:
        return db.unit_of_work(lambda session: submit_payment(session, currencies, req, key))
    amounts, problems = check_payments(currencies, [req])
    if problems:
        raise problems[0][1]
    outcome = together.submit((req, amounts[0])) if together is not None else _ALONE
    row = _insert_alone(db, req, amounts[0]) if outcome is _ALONE else outcome
    if row is not None:
        return row, True
    with db.read() as session:  # refused: read the accounts to say why
        raise _refused(session, currencies, [req])


# What a group's run answers for each payment: its row, None when the INSERT refused it (alone),
# or _ALONE: insert it again by itself (the group was refused as a whole, see `_insert_group`).
_ALONE = object()
SingleInserts = GroupCommit[tuple[PaymentRequest, Decimal], Any]


def single_inserts(db: Database, max_payments: int) -> SingleInserts:
    """One process's group commit of single payments (common.group_commit): the single payments
    its threads accept while an INSERT is in flight share the next one, and its commit."""
    return GroupCommit(lambda group: _insert_group(db, group), max_payments,
                       on_group=lambda size: metrics.ACCEPT_GROUP_PAYMENTS.labels("single").observe(size))


def _insert_alone(db: Database, req: PaymentRequest, amount: Decimal) -> Mapping[str, Any] | None:
    # The special case of the unit of work: one statement, alone (common.db).
    rows = db.unit_of_work(_INSERT_PAYMENTS, _insert_params([req], [amount], None))
    return _accepted_rows([req], [amount], None, rows)[0] if rows else None


def _insert_group(db: Database, group: Sequence[tuple[PaymentRequest, Decimal]]) -> list[Any]:
    """One INSERT for the group's payments, all or none (the statement inserts nothing unless
    every payment passes its checks). Refused as a whole, by a check or by the server (a
    constraint: nothing was written), each payment is inserted again alone, so that one bad
    payment answers for itself only. A lost connection is not retried: the INSERT may have
    committed, and the caller's answer (503) says it is unknown, as for a payment alone."""
    if len(group) == 1:
        return [_insert_alone(db, *group[0])]
    reqs, amounts = [req for req, _ in group], [amount for _, amount in group]
    try:
        rows = db.unit_of_work(_INSERT_ALL_OR_NONE, _insert_params(reqs, amounts, None))
    except (IntegrityError, DataError):
        return [_ALONE] * len(group)
    if not rows:
        return [_ALONE] * len(group)
    return _accepted_rows(reqs, amounts, None, rows)


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
        return {"id": batch_id, "payments": payment_rows(session, list(ids))}

    batch, created = idempotent(session, key, "batch", create=create, load=load)
    return batch["id"], batch["payments"], created


def payment_rows(session: Session, ids: list[int]) -> list[Mapping[str, Any]]:
    return list(session.execute(text(
        f"SELECT {PAYMENT_COLUMNS} FROM payments WHERE id = ANY(:ids) ORDER BY id"
    ), {"ids": ids}).mappings())


# What the INSERT returns; the rest of each row is the request's or a column default, filled in
# by `_accepted_rows` (decoding 18 columns of 100 rows was ~0.4 ms of a batch's CPU).
_INSERTED_COLUMNS = "id, buyer_account_id, seller_account_id, currency_id, created_at, authorization_expires_at"


def _accepted_rows(reqs: Sequence[PaymentRequest], amounts: Sequence[Decimal], batch_id: int | None,
                   inserted: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The rows just inserted, as `SELECT PAYMENT_COLUMNS` would read them, in request order.

    INSERT ... SELECT ... ORDER BY r.n takes ids in request order (RETURNING's order is not
    promised, so the rows are sorted by id); the accounts are checked to pair each row with its
    request.
    """
    rows = []
    for req, amount, got in zip(reqs, amounts, sorted(inserted, key=lambda row: row["id"])):
        if (got["buyer_account_id"], got["seller_account_id"]) != (req.buyer_account_id, req.seller_account_id):
            raise AssertionError("inserted payments are not in request order")
        rows.append({
            "id": got["id"], "status": "pending", "buyer_account_id": req.buyer_account_id,
            "seller_account_id": req.seller_account_id, "amount": amount,
            "currency_id": got["currency_id"], "failure_code": None, "batch_id": batch_id,
            "created_at": got["created_at"], "completed_at": None,
            "capture_method": req.capture_method, "amount_captured": None,
            "amount_refunded": _ZERO, "refund_of": req.refund_of,
            "authorization_expires_at": got["authorization_expires_at"],
            "cancellation_reason": None, "reference": req.reference,
            "metadata": dict(req.metadata) if req.metadata else {},
        })
    return rows


_ZERO = Decimal(0)


# The accounts are read by primary key into a small materialized set first: joined directly, the
# planner may reach the seller through the currency index (s.currency_id = b.currency_id makes it
# an equivalence) and scan every account of the currency for each payment.
_REQUESTS_AND_ACCOUNTS = (
    "WITH r AS (SELECT * FROM unnest(CAST(:buyers AS bigint[]), CAST(:sellers AS bigint[]),"
    "                                CAST(:amounts AS numeric[]), CAST(:currencies AS smallint[]),"
    "                                CAST(:methods AS text[]), CAST(:expires AS integer[]),"
    "                                CAST(:refs AS text[]), CAST(:metas AS text[]),"
    "                                CAST(:refund_of AS bigint[]))"
    "           WITH ORDINALITY AS r(buyer, seller, amount, currency_id, capture_method, expires_in,"
    "                                reference, metadata, refund_of, n)),"
    " known AS MATERIALIZED ("
    "   SELECT a.id, a.currency_id, c.scale FROM accounts a JOIN currencies c ON c.id = a.currency_id"
    "   WHERE a.id = ANY(CAST(:buyers AS bigint[]) || CAST(:sellers AS bigint[]))"
    "     AND a.kind = 'customer')"
)
# The payments columns written, each with its value from a request `r` and its buyer `b`.
_COLUMNS = (
    ("buyer_account_id", "r.buyer"), ("seller_account_id", "r.seller"), ("currency_id", "b.currency_id"),
    ("amount", "r.amount"), ("batch_id", "CAST(:batch_id AS bigint)"), ("capture_method", "r.capture_method"),
    ("authorization_expires_at", "now() + make_interval(secs => r.expires_in)"),
    ("reference", "r.reference"), ("metadata", "coalesce(r.metadata::jsonb, '{}'::jsonb)"),
    ("refund_of", "r.refund_of"),
)
_CHECKED = (
    " FROM r JOIN known b ON b.id = r.buyer JOIN known s ON s.id = r.seller"
    " WHERE s.currency_id = b.currency_id"
    "   AND (r.currency_id IS NULL OR r.currency_id = b.currency_id)"
    "   AND scale(r.amount) <= b.scale"
)
_INSERT_INTO = f" INSERT INTO payments ({', '.join(name for name, _ in _COLUMNS)})"

# Every payment that passes its checks is inserted and a refused one left out; the caller (a
# batch's transaction, or one payment alone) sees fewer rows than requests.
_INSERT_PAYMENTS_SQL = (
    _REQUESTS_AND_ACCOUNTS + _INSERT_INTO
    + f" SELECT {', '.join(value for _, value in _COLUMNS)}" + _CHECKED + " ORDER BY r.n"
    + f" RETURNING {_INSERTED_COLUMNS}"
)
# All or none, for a group of single payments in autocommit (`_insert_group`): the checked rows
# are counted, and inserted only if none was refused. A statement of its own, so that a payment
# alone and a batch do not pay for the count (~0.007 ms of PostgreSQL per batch payment).
_INSERT_ALL_OR_NONE_SQL = (
    _REQUESTS_AND_ACCOUNTS
    + f", ok AS MATERIALIZED (SELECT r.n, {', '.join(f'{value} AS {name}' for name, value in _COLUMNS)}"
    + _CHECKED + ")"
    + _INSERT_INTO + f" SELECT {', '.join(name for name, _ in _COLUMNS)} FROM ok"
    + " WHERE (SELECT count(*) FROM ok) = cardinality(CAST(:buyers AS bigint[])) ORDER BY ok.n"
    + f" RETURNING {_INSERTED_COLUMNS}"
)
# Prepared, for a single payment alone (`accept_payment`) as for a batch in its transaction
# (`submit_payments`): planning it was ~0.45 ms a batch (pg_stat_statements, bench/NOTES.md
# 2026-12-02). It reads accounts by primary key only.
_INSERT_PAYMENTS = Prepared("wallet_insert_payments", _INSERT_PAYMENTS_SQL)
_INSERT_ALL_OR_NONE = Prepared("wallet_insert_payment_group", _INSERT_ALL_OR_NONE_SQL)


def _insert_params(reqs: Sequence[PaymentRequest], amounts: Sequence[Decimal],
                   batch_id: int | None) -> dict[str, Any]:
    # Array literals (common.pgarray): a batch of 100 is ~1,000 values.
    return {
        "batch_id": batch_id,
        "buyers": pgarray.integers([r.buyer_account_id for r in reqs]),
        "sellers": pgarray.integers([r.seller_account_id for r in reqs]),
        "amounts": pgarray.numerics(amounts),
        "currencies": pgarray.integers([r.currency_id for r in reqs]),
        "methods": pgarray.texts([r.capture_method for r in reqs]),
        "expires": pgarray.integers([r.expires_in_seconds for r in reqs]),
        "refs": pgarray.texts([r.reference for r in reqs]),
        "metas": pgarray.texts([json.dumps(dict(r.metadata)) if r.metadata else None for r in reqs]),
        "refund_of": pgarray.integers([r.refund_of for r in reqs]),
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
        rows = _INSERT_PAYMENTS.run(session, _insert_params(reqs, amounts, batch_id)).mappings().all()
        if len(rows) == len(reqs):
            return _accepted_rows(reqs, amounts, batch_id, rows)
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


def payment_problems(session: Session, currencies: Currencies, reqs: Sequence[PaymentRequest],
                     directory: AccountDirectory | None = None) -> list[tuple[int, WalletError]]:
    """Every refused request with its reason, in index order (the error path of a batch).
    `directory`: the process's memory of the accounts, so that known ones are not read again."""
    amounts, problems = check_payments(currencies, reqs)
    found = (directory or AccountDirectory()).currency_ids(
        session, (i for r in reqs for i in (r.buyer_account_id, r.seller_account_id)))
    return sorted(problems + _diagnose(found, currencies, reqs, amounts), key=lambda p: p[0])


def _diagnose(found: Mapping[int, int], currencies: Currencies, reqs: Sequence[PaymentRequest],
              amounts: Sequence[Decimal]) -> list[tuple[int, WalletError]]:
    """Only on the error path: which requests the single INSERT refused (or would), and why.
    found: account id -> currency id of the customer accounts among theirs."""
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
    currency = currencies.by_id[currency_id]
    # `amount` is canonical (check_payment): its exponent is its number of decimal places. Only
    # one past the scale is parsed again, for its InvalidAmount.
    if -amount.as_tuple().exponent > currency.scale:
        parse_amount(amount, currency)
