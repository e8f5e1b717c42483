from decimal import Decimal

import pytest
from hypothesis import given, strategies as st

from common.money import AmountError, format_amount, parse_amount


@pytest.mark.parametrize("raw, scale, expected", [
    ("500.1", 2, "500.1"),
    (Decimal("500.1"), 2, "500.1"),  # what json.loads(parse_float=Decimal) gives for 500.1
    (1000, 2, "1000"),
    ("1000", 2, "1000"),
    ("0.10", 2, "0.1"),
    (Decimal("1E+2"), 2, "100"),     # JSON number 1e2
    ("0.000000000000000001", 18, "0.000000000000000001"),
    ("999999999999999999.99", 2, "999999999999999999.99"),
])
def test_parses_exactly(raw, scale, expected):
    assert format_amount(parse_amount(raw, scale)) == expected
    assert parse_amount(raw, scale) == Decimal(expected)


@pytest.mark.parametrize("raw, reason", [
    ("0", "not_positive"), (0, "not_positive"), (Decimal("-0"), "not_positive"),
    (Decimal("-5"), "not_positive"), (-5, "not_positive"),
    ("-1", "malformed"), ("+1", "malformed"), (" 1", "malformed"), ("1 ", "malformed"),
    ("1e3", "malformed"), ("١٢٣", "malformed"), ("01", "malformed"), ("1.", "malformed"),
    (".5", "malformed"), ("", "malformed"), ("NaN", "malformed"), ("Infinity", "malformed"),
    ("1_000", "malformed"), ("0x10", "malformed"),
    (Decimal("NaN"), "not_finite"), (Decimal("Infinity"), "not_finite"),
    (Decimal("1e999999"), "too_large"), (10**40, "too_large"), ("1" * 40, "too_large"),
    ("1000000000000000000", "too_large"),
    ("1.001", "too_many_decimals"), (Decimal("1e-999999"), "too_many_decimals"),
    (True, "wrong_type"), (None, "wrong_type"), ([1], "wrong_type"), ({"a": 1}, "wrong_type"),
    (1.5, "wrong_type"),  # a float never gets in: the API parses JSON numbers as Decimal
])
def test_refuses(raw, reason):
    with pytest.raises(AmountError) as err:
        parse_amount(raw, 2)
    assert err.value.reason == reason


def test_zero_allowed_for_opening_balances():
    assert parse_amount("0", 2, allow_zero=True) == 0


@given(st.decimals(min_value=Decimal("0.01"), max_value=Decimal("1e17"), places=2,
                   allow_nan=False, allow_infinity=False))
def test_round_trips_through_text(value):
    text = format_amount(value)
    assert parse_amount(text, 2) == value
    assert parse_amount(Decimal(text), 2) == value
    assert "E" not in text and not text.endswith(".")


@given(st.integers(min_value=1, max_value=10**17), st.integers(min_value=0, max_value=18))
def test_scale_is_enforced(units, scale):
    value = Decimal(units).scaleb(-scale)
    assert parse_amount(format_amount(value), 18) == value
    if value.normalize().as_tuple().exponent < -2:
        with pytest.raises(AmountError):
            parse_amount(format_amount(value), 2)


@pytest.mark.parametrize("raw", [
    "12345678901.123456789012345678",          # 29 significant digits (ETH has scale 18)
    "999999999999999999.999999999999999999",   # 36
    Decimal("12345678901.123456789012345678"),
])
def test_many_digits_stay_exact(raw):
    # abs() in the default context (28 digits) once rounded these silently.
    assert format_amount(parse_amount(raw, 18)) == str(raw)
    assert parse_amount(raw, 18) == Decimal(str(raw))


@given(st.from_regex(r"(0|[1-9][0-9]{0,19})(\.[0-9]{0,20})?", fullmatch=True),
       st.integers(min_value=0, max_value=18), st.booleans())
def test_string_fast_path_agrees_with_the_general_path(raw, scale, allow_zero):
    # parse_amount reads a plain string without building Decimals first; Decimal input takes
    # the general path. Both must agree, value, representation and refusal reason alike.
    def outcome(value):
        try:
            parsed = parse_amount(value, scale, allow_zero=allow_zero)
            return "ok", parsed.as_tuple()
        except AmountError as exc:
            return "refused", exc.reason
    general = outcome(Decimal(raw)) if not raw.endswith(".") else ("refused", "malformed")
    assert outcome(raw) == general
