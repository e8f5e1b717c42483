"""Exact money: every amount is a `Decimal`, parsed from JSON without ever touching a float."""
from __future__ import annotations

import decimal
import re
from decimal import Decimal

# JSON's number grammar without sign or exponent: what a string amount may look like.
# `Decimal()` alone is too lenient: it takes "١٢٣", " 1", "1e3", "NaN" and "+1".
_AMOUNT_STRING = re.compile(r"(0|[1-9][0-9]*)(\.[0-9]+)?", re.ASCII)

# Amounts are below 10**18 units of any currency: far above any real payment, and it keeps
# every sum exact in MONEY_CONTEXT below.
MAX_INTEGER_DIGITS = 18
MAX_STRING_LENGTH = 64

# Arithmetic on balances happens under this context: wide enough for any sum of amounts, and
# trapping on anything inexact so that a rounding can never pass silently.
MONEY_CONTEXT = decimal.Context(
    prec=80,
    rounding=decimal.ROUND_HALF_EVEN,
    traps=[decimal.InvalidOperation, decimal.Inexact, decimal.Rounded, decimal.Overflow,
           decimal.DivisionByZero],
)


class AmountError(ValueError):
    """Why an amount was refused; `reason` is a stable machine-readable word."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def parse_amount(raw: object, scale: int, *, allow_zero: bool = False) -> Decimal:
    """Parse a JSON-decoded amount (str, int or Decimal from `parse_float=Decimal`) exactly."""
    if type(raw) is str:
        fast = _parse_plain_string(raw, scale)
        if fast is not None:
            return fast
    value = _to_decimal(raw)
    if not value.is_finite():
        raise AmountError("not_finite", "amount must be a finite number")
    sign, digits, _ = value.as_tuple()
    if len(digits) > MAX_STRING_LENGTH:
        raise AmountError("too_many_digits", f"amount has more than {MAX_STRING_LENGTH} digits")
    if sign and value != 0:
        raise AmountError("not_positive", "amount must be positive")
    if value == 0 and not allow_zero:
        raise AmountError("not_positive", "amount must be positive")
    if value.adjusted() >= MAX_INTEGER_DIGITS:
        raise AmountError("too_large", f"amount must be below 10^{MAX_INTEGER_DIGITS}")
    if _decimal_places(value) > scale:
        raise AmountError("too_many_decimals", f"amount has more than {scale} decimal places")
    # Canonical and exact: no sign on zero, no exponent, no trailing zeros.
    return Decimal(format_amount(value))


def _parse_plain_string(raw: str, scale: int) -> Decimal | None:
    """The common case, read from the text alone: a well-formed positive string amount within the
    bounds and the scale. None for anything else, which the general path then refuses (or, for
    zero, accepts) with its own reason; the result is the one the general path would return.
    Every batch item's amount is parsed here, refused (429) batches included: the general path
    (Decimal, as_tuple twice, normalize) cost ~10 us per amount."""
    if len(raw) > MAX_STRING_LENGTH:
        return None
    match = _AMOUNT_STRING.fullmatch(raw)
    if match is None:
        return None
    whole, fraction = match.groups()
    fraction = fraction[1:].rstrip("0") if fraction else ""
    if len(fraction) > scale or len(whole) > MAX_INTEGER_DIGITS or (whole == "0" and not fraction):
        return None  # too many decimals, too large, or zero
    return Decimal(f"{whole}.{fraction}" if fraction else whole)


def _to_decimal(raw: object) -> Decimal:
    if isinstance(raw, bool):  # bool is an int subclass: `true` is not an amount
        raise AmountError("wrong_type", "amount must be a string or a number")
    if isinstance(raw, int):
        if len(str(abs(raw))) > MAX_INTEGER_DIGITS + 1:
            raise AmountError("too_large", f"amount must be below 10^{MAX_INTEGER_DIGITS}")
        return Decimal(raw)
    if isinstance(raw, Decimal):
        return raw
    if isinstance(raw, str):
        if len(raw) > MAX_STRING_LENGTH or not _AMOUNT_STRING.fullmatch(raw):
            raise AmountError("malformed", 'amount string must look like "123" or "123.45"')
        return Decimal(raw)
    raise AmountError("wrong_type", "amount must be a string or a number")


def _decimal_places(value: Decimal) -> int:
    # From the digits, not `normalize()`: that rounds (and so traps) on exponents past the
    # context's range, e.g. 1e-99999999, which must be refused as too many decimals instead.
    if not value:
        return 0
    _, digits, exponent = value.as_tuple()
    trailing_zeros = len(digits) - len("".join(map(str, digits)).rstrip("0"))
    return max(0, -(int(exponent) + trailing_zeros))


def format_amount(value: Decimal) -> str:
    """The canonical text of an amount: no exponent, no trailing zeros ("499.9", "1000", "0")."""
    if not value:
        return "0"
    # copy_abs, not abs(): abs() rounds to the current context (28 digits by default), silently.
    return format(value.copy_abs().normalize(MONEY_CONTEXT).copy_sign(value), "f")
