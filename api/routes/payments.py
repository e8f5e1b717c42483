"""Payments: accept (202, then poll), read, list; batches."""
from __future__ import annotations

import logging

from flask import Blueprint, request
from pydantic import TypeAdapter, ValidationError

from api import render
from api.parsing import encode_cursor, int_arg, page_args, parse_body, parse_optional_body, validate
from api.routes.backpressure import admit_new_work, batch_replay, refuse_again_at_once
from api.routes.idempotency import idempotency_key
from api.schemas import MAX_ID, STATUSES, BatchCreate, CancelCreate, CaptureCreate, PaymentCreate, RefundCreate
from api.wallet import wallet
from common import ledger, metrics, money, queries
from common.errors import MalformedRequest, Overloaded, ValidationFailed, WalletError

bp = Blueprint("payments", __name__)
log = logging.getLogger("wallet.api")


def _request(body: PaymentCreate) -> ledger.PaymentRequest:
    return ledger.PaymentRequest(body.buyer_account_id, body.seller_account_id, body.amount,
                                 body.currency_id, body.capture_method, body.authorization_expires_in,
                                 body.reference, body.metadata)


@bp.post("/payments")
def create_payment():
    refuse_again_at_once("payment")
    req = _request(parse_body(PaymentCreate))
    w = wallet()
    key = idempotency_key("payment", lambda: req.canonical(ledger.check_payment(w.currencies, req)))
    replay = admit_new_work([req], key, "payment", queries.get_payment)
    row, created = (replay, False) if replay else ledger.accept_payment(
        w.db, w.currencies, req, key, together=w.single_inserts)
    if created:  # a replay was sent when first created; if that was lost, the sweeper sends it
        metrics.PAYMENTS_ACCEPTED.labels("single").inc()
        w.dispatcher.submit([(row["id"], row["buyer_account_id"], row["seller_account_id"])])
    return render.payment(row, w.currencies), 202, {"Location": f"/payments/{row['id']}"}


@bp.get("/payments/<id:payment_id>")
def get_payment(payment_id: int):
    w = wallet()
    with w.db.read() as session:
        row = queries.get_payment(session, payment_id)
    return render.payment(row, w.currencies)


@bp.get("/payments")
def list_payments():
    after, limit = page_args()
    status = request.args.get("status")
    if status is not None and status not in STATUSES:
        raise MalformedRequest(f"status must be one of {', '.join(STATUSES)}", {"parameter": "status"})
    reference = request.args.get("reference")
    if reference is not None and not (1 <= len(reference) <= 128 and reference.isascii()
                                      and reference.isprintable()):
        raise MalformedRequest("reference must be 1 to 128 printable ASCII characters",
                               {"parameter": "reference"})
    w = wallet()
    with w.db.read() as session:
        page = queries.list_payments(
            session, after=after, limit=limit, status=status,
            account_id=int_arg("account_id", None, 1, MAX_ID),
            batch_id=int_arg("batch_id", None, 1, MAX_ID),
            refund_of=int_arg("refund_of", None, 1, MAX_ID), reference=reference)
    return {"payments": [render.payment(r, w.currencies) for r in page.rows],
            "next_cursor": encode_cursor(page.next_after)}


def _canonical_amount(raw: object) -> str | None:
    if raw is None:
        return None
    return money.format_amount(ledger.parse_amount(raw, ledger.WIDEST_CURRENCY))


@bp.post("/payments/<id:payment_id>/capture")
def capture_payment(payment_id: int):
    body = parse_optional_body(CaptureCreate)
    w = wallet()
    key = idempotency_key("capture", lambda: {"payment_id": payment_id, "amount": _canonical_amount(body.amount)})
    row, _ = w.db.unit_of_work(
        lambda session: ledger.capture_payment(session, w.currencies, payment_id, body.amount, key))
    return render.payment(row, w.currencies)


@bp.post("/payments/<id:payment_id>/cancel")
def cancel_payment(payment_id: int):
    parse_optional_body(CancelCreate)
    w = wallet()
    key = idempotency_key("cancel", lambda: {"payment_id": payment_id})
    row, _ = w.db.unit_of_work(lambda session: ledger.cancel_payment(session, payment_id, key))
    return render.payment(row, w.currencies)


@bp.post("/payments/<id:payment_id>/refunds")
def refund_payment(payment_id: int):
    body = parse_optional_body(RefundCreate)
    w = wallet()
    key = idempotency_key("refund", lambda: {
        "payment_id": payment_id, "reference": body.reference, "metadata": body.metadata,
        "amount": _canonical_amount(body.amount)})
    replay = _refund_replay_when_full(key)
    if replay is not None:
        return render.payment(replay, w.currencies), 202, {"Location": f"/payments/{replay['id']}"}
    row, created = w.db.unit_of_work(lambda session: ledger.refund_payment(
        session, w.currencies, payment_id, body.amount, body.reference, body.metadata, key))
    if created:
        metrics.PAYMENTS_ACCEPTED.labels("refund").inc()
        w.dispatcher.submit([(row["id"], row["buyer_account_id"], row["seller_account_id"])])
    return render.payment(row, w.currencies), 202, {"Location": f"/payments/{row['id']}"}


def _refund_replay_when_full(key: ledger.IdempotencyKey | None):
    """A refund is new work: refused (429) while the backlog is full, unless its key already made
    one, which is answered again."""
    w = wallet()
    try:
        w.admission.admit(1)
        return None
    except Overloaded:
        if key is not None:
            with w.db.read() as session:
                refund_id = ledger.replayed(session, key, "refund")
                if refund_id is not None:
                    return queries.get_payment(session, refund_id)
        raise


@bp.post("/payments/batch")
def create_batch():
    refuse_again_at_once("batch")
    body = parse_body(BatchCreate)
    w = wallet()
    if len(body.payments) > w.settings.max_batch_items:
        raise ValidationFailed(f"a batch holds at most {w.settings.max_batch_items} payments")
    reqs = _batch_requests(body.payments)
    key = idempotency_key("batch", lambda: {
        "atomic": body.atomic,
        "payments": [r.canonical(ledger.check_payment(w.currencies, r)) for r in reqs]})
    replay = admit_new_work(reqs, key, "batch", batch_replay)
    if replay:
        batch_id, rows, created = replay["id"], replay["payments"], False
    else:
        batch_id, rows, created = w.db.unit_of_work(
            lambda session: ledger.submit_batch(session, w.currencies, reqs, body.atomic, key))
    if created:
        metrics.PAYMENTS_ACCEPTED.labels("atomic_batch" if body.atomic else "batch").inc(len(rows))
        _enqueue_batch(w, batch_id, rows, body.atomic)
    return ({"batch_id": batch_id, "atomic": body.atomic,
             "payments": [render.payment(r, w.currencies) for r in rows]},
            202, {"Location": f"/batches/{batch_id}"})


# All the items in one call into pydantic-core (one call per item cost ~1 us more each, on every
# batch, refused ones included). Only when some item is invalid are they validated one by one,
# so that each bad one gets exactly the error it would get as a POST /payments body.
_ITEMS = TypeAdapter(list[PaymentCreate])


def _batch_requests(items: list[dict]) -> list[ledger.PaymentRequest]:
    """Validate every item; if any is bad, answer 422 listing each bad one with its index."""
    try:
        parsed, problems = list(enumerate(map(_request, _ITEMS.validate_python(items)))), []
    except ValidationError:
        parsed, problems = [], []
        for index, item in enumerate(items):
            try:
                parsed.append((index, _request(validate(PaymentCreate, item))))
            except WalletError as exc:
                problems.append((index, exc))
    reqs = [req for _, req in parsed]
    w = wallet()
    if problems or ledger.check_payments(w.currencies, reqs)[1]:
        # The well-formed items are checked against the accounts too, so that the client sees
        # every bad index at once.
        with w.db.read() as session:
            found = ledger.payment_problems(session, w.currencies, reqs, w.accounts)
        problems = sorted(problems + [(parsed[i][0], exc) for i, exc in found], key=lambda p: p[0])
        raise ledger.batch_refused(problems, len(items))
    return reqs


def _enqueue_batch(w, batch_id: int, rows, atomic: bool) -> None:
    if not atomic:
        w.dispatcher.submit([(r["id"], r["buyer_account_id"], r["seller_account_id"]) for r in rows])
        return
    w.dispatcher.submit_atomic_batch(batch_id)  # committed: if it is lost, the sweeper sends it


@bp.get("/batches/<id:batch_id>")
def get_batch(batch_id: int):
    with wallet().db.read() as session:
        return render.batch(queries.get_batch(session, batch_id))
