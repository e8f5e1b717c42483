"""The seeded currencies, and amounts checked against a currency's scale."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy import text
from sqlalchemy.orm import Session

from common import money
from common.errors import CurrencyMismatch, InvalidAmount, UnknownCurrency

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


WIDEST_CURRENCY = Currency(0, "", "", 18)
