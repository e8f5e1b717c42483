"""Accounts: open, read, list, freeze; and an account's ledger entries."""
from __future__ import annotations

from flask import Blueprint, request

from api import render
from api.parsing import encode_cursor, page_args, parse_body
from api.routes.idempotency import idempotency_key
from api.schemas import AccountCreate
from api.wallet import wallet
from common import ledger, money, queries
from common.errors import MalformedRequest

bp = Blueprint("accounts", __name__)


@bp.post("/accounts")
def create_account():
    body = parse_body(AccountCreate)
    w = wallet()
    currency = w.currencies.resolve(body.currency_id, body.currency)
    opening = ledger.parse_amount(body.amount, currency, allow_zero=True)
    key = idempotency_key("account", lambda: {
        "name": body.name, "currency_id": currency.id, "amount": money.format_amount(opening),
        "metadata": body.metadata or {}})
    row, _ = w.db.unit_of_work(lambda session: ledger.open_account(session, currency, body.name,
                                                                   opening, key, body.metadata))
    return render.account(row, w.currencies), 201, {"Location": f"/accounts/{row['id']}"}


@bp.get("/accounts")
def list_accounts():
    after, limit = page_args()
    w = wallet()
    code = request.args.get("currency")
    currency_id = None
    if code:
        currency = w.currencies.by_code.get(code.upper())
        if currency is None:
            raise MalformedRequest(f"unknown currency {code!r}", {"parameter": "currency"})
        currency_id = currency.id
    with w.db.read() as session:
        page = queries.list_accounts(session, after=after, limit=limit, currency_id=currency_id)
    return {"accounts": [render.account(r, w.currencies) for r in page.rows],
            "next_cursor": encode_cursor(page.next_after)}


@bp.get("/accounts/<id:account_id>")
@bp.get("/account/<id:account_id>")
def get_account(account_id: int):
    w = wallet()
    with w.db.read() as session:
        row = queries.get_account(session, account_id)
    return render.account(row, w.currencies)


@bp.post("/accounts/<id:account_id>/freeze")
def freeze(account_id: int):
    return _set_status(account_id, "frozen")


@bp.post("/accounts/<id:account_id>/unfreeze")
def unfreeze(account_id: int):
    return _set_status(account_id, "active")


def _set_status(account_id: int, status: str):
    w = wallet()
    def work(session):
        ledger.set_account_status(session, account_id, status)
        return queries.get_account(session, account_id)
    row = w.db.unit_of_work(work)
    return render.account(row, w.currencies)


@bp.get("/accounts/<id:account_id>/entries")
def list_entries(account_id: int):
    after, limit = page_args()
    with wallet().db.read() as session:
        page = queries.list_entries(session, account_id, after=after, limit=limit)
    return {"entries": [render.entry(r) for r in page.rows], "next_cursor": encode_cursor(page.next_after)}
