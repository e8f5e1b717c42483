"""Customer accounts: opening (with the opening amount as entries), freezing."""
from __future__ import annotations

import json
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from common.errors import NotFound
from common.ledger.currencies import Currency
from common.ledger.entries import insert_entries
from common.ledger.idempotency import IdempotencyKey, idempotent

ACCOUNT_COLUMNS = "id, name, currency_id, balance, held, status, metadata, created_at"


def open_account(session: Session, currency: Currency, name: str, opening: Decimal,
                 key: IdempotencyKey | None = None, metadata: Mapping[str, str] | None = None
                 ) -> tuple[Mapping[str, Any], bool]:
    """Returns (account row, created now?)."""
    return idempotent(
        session, key, "account",
        create=lambda: _account_row(session, create_account(session, currency, name, opening, metadata)),
        load=lambda account_id: _account_row(session, account_id))


def _account_row(session: Session, account_id: int) -> Mapping[str, Any]:
    return session.execute(text(f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = :id"),
                           {"id": account_id}).mappings().one()


def create_account(session: Session, currency: Currency, name: str, opening: Decimal,
                   metadata: Mapping[str, str] | None = None) -> int:
    """A customer account; its opening amount is moved from the currency's issuance account so
    that every balance is the sum of its entries and each currency's entries sum to zero."""
    account_id = session.execute(text(
        "INSERT INTO accounts (name, currency_id, balance, metadata)"
        " VALUES (:name, :cid, :amount, CAST(:metadata AS jsonb)) RETURNING id"
    ), {"name": name, "cid": currency.id, "amount": opening,
        "metadata": json.dumps(dict(metadata or {}))}).scalar_one()
    if opening:
        issuer_balance = session.execute(text(
            "UPDATE accounts SET balance = balance - :amount, updated_at = now()"
            " WHERE id = :id AND kind = 'issuance' RETURNING balance"
        ), {"amount": opening, "id": issuance_account_id(currency.id)}).scalar_one()
        insert_entries(session, [
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
