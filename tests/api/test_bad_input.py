"""Bad input on every endpoint: each case answers the right 4xx with the error object and writes
nothing. Bodies are raw bytes, so the JSON text is exactly what the case says (no float detour)."""
from __future__ import annotations

import base64
import json
from collections import defaultdict
from datetime import datetime
from decimal import Decimal
from string import Template

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from sqlalchemy import text as sql

from common import ledger
from tests.api.conftest import assert_error
from tests.conftest import AUTH
from tests.support.processes import wait_until
from tests.support.db import committing

MAX_ID = 2**63 - 1


@pytest.fixture(scope="module")
def ids(app, db) -> dict[str, int]:
    """Accounts the cases refer to as $usd1, $usd2, $eur, $btc, $frozen (balances set up once),
    and payments in each lifecycle state: $authorized, $completed, $failed, $canceled, $refund
    (a completed refund of $completed), $capture_done (a captured manual payment)."""
    c = app.test_client()
    made = {}
    for name, body in {
        "usd1": {"name": "bad-usd1", "currency": "USD", "amount": "1000"},
        "usd2": {"name": "bad-usd2", "currency": "USD", "amount": "10"},
        "eur": {"name": "bad-eur", "currency": "EUR", "amount": "1000"},
        "btc": {"name": "bad-btc", "currency": "BTC", "amount": "1"},
        "btc2": {"name": "bad-btc2", "currency": "BTC"},
        "lcbuyer": {"name": "bad-lc-buyer", "currency": "USD", "amount": "1000"},
        "lcseller": {"name": "bad-lc-seller", "currency": "USD", "amount": "1000"},
    }.items():
        r = c.post("/accounts", json=body, headers=AUTH)
        assert r.status_code == 201, r.get_data(as_text=True)
        made[name] = r.get_json()["id"]
    made.update(lifecycle_payments(c, db, made["lcbuyer"], made["lcseller"]))
    return made


def applied(client, db, body: dict, status: str) -> int:
    """POST /payments, then apply it as a worker does (the ledger's own function, in a
    transaction of its own); returns its id once it is `status`."""
    r = client.post("/payments", json=body, headers=AUTH)
    assert r.status_code == 202, r.get_data(as_text=True)
    pid = r.get_json()["id"]
    got = apply_now(client, db, pid)
    assert got["status"] == status, got
    return pid


def apply_now(client, db, pid: int) -> dict:
    """Apply a pending payment as a worker does; a worker of the session that holds it right now
    makes this skip it, so poll until it is applied either way. Returns it."""
    def applied_once():
        with committing(db) as s:
            ledger.apply_payments(s, [pid])
        got = client.get(f"/payments/{pid}", headers=AUTH).get_json()
        return got if got["status"] != "pending" else None
    return wait_until(applied_once, 10, f"payment {pid} applied")


def lifecycle_payments(client, db, buyer: int, seller: int) -> dict[str, int]:
    pay_ = {"buyer_account_id": buyer, "seller_account_id": seller}
    made = {
        "authorized": applied(client, db, {**pay_, "amount": "10", "capture_method": "manual"}, "authorized"),
        "completed": applied(client, db, {**pay_, "amount": "10"}, "completed"),
        "failed": applied(client, db, {**pay_, "amount": "5000", "capture_method": "manual"}, "failed"),
        "canceled": applied(client, db, {**pay_, "amount": "1", "capture_method": "manual"}, "authorized"),
        "capture_done": applied(client, db, {**pay_, "amount": "2", "capture_method": "manual"}, "authorized"),
    }
    r = client.post(f"/payments/{made['canceled']}/cancel", headers=AUTH)
    assert r.status_code == 200 and r.get_json()["status"] == "canceled", r.get_data(as_text=True)
    r = client.post(f"/payments/{made['capture_done']}/capture", json={"amount": "1.5"}, headers=AUTH)
    assert r.status_code == 200 and r.get_json()["status"] == "completed", r.get_data(as_text=True)
    r = client.post(f"/payments/{made['completed']}/refunds", json={"amount": "4"}, headers=AUTH)
    assert r.status_code == 202, r.get_data(as_text=True)
    made["refund"] = r.get_json()["id"]
    assert apply_now(client, db, made["refund"])["status"] == "completed"
    return made


@pytest.fixture
def lifecycle_unchanged(db, ids):
    """Asserts, after the test, that the lifecycle payments and their accounts did not change
    (a refused capture, cancel or refund moves nothing, releases nothing)."""
    def snapshot():
        with committing(db) as s:
            payments = s.execute(sql(
                "SELECT id, status, amount_captured, amount_refunded, cancellation_reason, completed_at"
                " FROM payments WHERE id = ANY(:ids) ORDER BY id"),
                {"ids": [ids[k] for k in LIFECYCLE_PAYMENTS]}).all()
            accounts = s.execute(sql(
                "SELECT id, balance, held, status FROM accounts WHERE id = ANY(:ids) ORDER BY id"),
                {"ids": [ids["lcbuyer"], ids["lcseller"]]}).all()
        return payments, accounts
    before = snapshot()
    yield
    assert snapshot() == before, "a refused request changed a payment or an account"


LIFECYCLE_PAYMENTS = ("authorized", "completed", "failed", "canceled", "capture_done", "refund")


def call(client, method: str, path: str, body: bytes | None = None, headers=None):
    kwargs = {"headers": headers or {}}
    if body is not None:
        kwargs.update(data=body, content_type="application/json")
    return client.open(path, method=method, **kwargs)


def case(name, method, path, body, status, code=None, headers=None):
    return pytest.param(method, path, body, status, code, headers, id=name)


def pay(amount: str, buyer="$usd1", seller="$usd2", extra="") -> str:
    return f'{{"buyer_account_id": {buyer}, "seller_account_id": {seller}, "amount": {amount}{extra}}}'


def acct(amount: str, currency='"currency": "USD"', extra="") -> str:
    return f'{{"name": "n", {currency}, "amount": {amount}{extra}}}'


MALFORMED = {
    "malformed-json": '{"name": ',
    "trailing-garbage": '{"name": "a"} x',
    "single-quotes": "{'name': 'a'}",
    "empty-body": "",
    "whitespace-body": "   ",
    "array": "[]",
    "array-of-object": '[{"name": "a"}]',
    "string": '"hello"',
    "number": "42",
    "null": "null",
    "true": "true",
    "NaN-literal": "NaN",
    "deep-nesting": "[" * 100_000 + "]" * 100_000,
    "invalid-utf8": "\udcff",  # replaced by a raw 0xff byte below
    "huge-integer-literal": "1" * 5000,
}


def _raw(text: str) -> bytes:
    return b"\xff" if text == "\udcff" else text.encode()


CASES = []
for path in ("/accounts", "/payments", "/payments/batch"):
    for label, text in MALFORMED.items():
        CASES.append(case(f"POST {path} {label}", "POST", path, text, 400, "malformed_request"))

# --- POST /payments ------------------------------------------------------------------------------
P = "/payments"
for name, body, status, code in [
    ("empty-object", "{}", 422, "validation_error"),
    ("missing-amount", '{"buyer_account_id": $usd1, "seller_account_id": $usd2}', 422, "validation_error"),
    ("missing-buyer", '{"seller_account_id": $usd2, "amount": "1"}', 422, "validation_error"),
    ("missing-seller", '{"buyer_account_id": $usd1, "amount": "1"}', 422, "validation_error"),
    ("extra-field", pay('"1"', extra=', "note": "x"'), 422, "validation_error"),
    ("extra-status-field", pay('"1"', extra=', "status": "completed"'), 422, "validation_error"),
    ("string-buyer-id", pay('"1"', buyer='"$usd1"'), 422, "validation_error"),
    ("string-seller-id", pay('"1"', seller='"$usd2"'), 422, "validation_error"),
    ("float-buyer-id", pay('"1"', buyer="$usd1.0"), 422, "validation_error"),
    ("exponent-buyer-id", pay('"1"', buyer="1e0"), 422, "validation_error"),
    ("bool-buyer-id", pay('"1"', buyer="true"), 422, "validation_error"),
    ("null-buyer-id", pay('"1"', buyer="null"), 422, "validation_error"),
    ("object-buyer-id", pay('"1"', buyer='{"id": $usd1}'), 422, "validation_error"),
    ("list-buyer-id", pay('"1"', buyer="[$usd1]"), 422, "validation_error"),
    ("zero-buyer-id", pay('"1"', buyer="0"), 422, "validation_error"),
    ("negative-buyer-id", pay('"1"', buyer="-1"), 422, "validation_error"),
    ("bigint-overflow-id", pay('"1"', seller=str(MAX_ID + 1)), 422, "validation_error"),
    ("40-digit-id", pay('"1"', seller="9" * 40), 422, "validation_error"),
    ("max-bigint-unknown-id", pay('"1"', seller=str(MAX_ID)), 422, "unknown_account"),
    ("unknown-buyer", pay('"1"', buyer="987654321"), 422, "unknown_account"),
    ("unknown-seller", pay('"1"', seller="987654321"), 422, "unknown_account"),
    ("same-account", pay('"1"', seller="$usd1"), 422, "same_account"),
    ("currency-mismatch-accounts", pay('"1"', seller="$eur"), 422, "currency_mismatch"),
    ("explicit-currency-differs", pay('"1"', extra=', "currency_id": 2'), 422, "currency_mismatch"),
    ("explicit-currency-unknown", pay('"1"', extra=', "currency_id": 99'), 422, "unknown_currency"),
    ("explicit-currency-zero", pay('"1"', extra=', "currency_id": 0'), 422, "validation_error"),
    ("explicit-currency-string", pay('"1"', extra=', "currency_id": "1"'), 422, "validation_error"),
    ("explicit-currency-float", pay('"1"', extra=', "currency_id": 1.0'), 422, "validation_error"),
    ("explicit-currency-huge", pay('"1"', extra=', "currency_id": 99999999'), 422, "validation_error"),
    ("amount-zero", pay("0"), 422, "invalid_amount"),
    ("amount-zero-string", pay('"0"'), 422, "invalid_amount"),
    ("amount-zero-decimal", pay("0.00"), 422, "invalid_amount"),
    ("amount-negative-zero", pay("-0.0"), 422, "invalid_amount"),
    ("amount-negative", pay("-5"), 422, "invalid_amount"),
    ("amount-negative-decimal", pay("-0.01"), 422, "invalid_amount"),
    ("amount-negative-string", pay('"-5"'), 422, "invalid_amount"),
    ("amount-NaN-literal", pay("NaN"), 400, "malformed_request"),
    ("amount-Infinity-literal", pay("Infinity"), 400, "malformed_request"),
    ("amount-minus-Infinity-literal", pay("-Infinity"), 400, "malformed_request"),
    ("amount-NaN-string", pay('"NaN"'), 422, "invalid_amount"),
    ("amount-Infinity-string", pay('"Infinity"'), 422, "invalid_amount"),
    ("amount-sNaN-string", pay('"sNaN"'), 422, "invalid_amount"),
    ("amount-1e999999", pay("1e999999"), 422, "invalid_amount"),
    ("amount-1e-999999", pay("1e-999999"), 422, "invalid_amount"),
    ("amount-1e-99999999", pay("1e-99999999"), 422, "invalid_amount"),
    ("amount-1e99999999", pay("1e99999999"), 422, "invalid_amount"),
    ("amount-40-digits", pay("1" + "0" * 39), 422, "invalid_amount"),
    ("amount-40-digits-string", pay('"' + "1" * 40 + '"'), 422, "invalid_amount"),
    ("amount-40-digit-decimal", pay("1." + "1" * 39), 422, "invalid_amount"),
    ("amount-10^18", pay("1000000000000000000"), 422, "invalid_amount"),
    ("amount-3-decimals-usd", pay("0.001"), 422, "invalid_amount"),
    ("amount-3-decimals-usd-string", pay('"500.123"'), 422, "invalid_amount"),
    ("amount-9-decimals-btc", pay("0.000000001", buyer="$btc", seller="$btc2"), 422, "invalid_amount"),
    ("amount-19-decimals", pay("0.0000000000000000001"), 422, "invalid_amount"),
    ("amount-leading-space", pay('" 1"'), 422, "invalid_amount"),
    ("amount-trailing-space", pay('"1 "'), 422, "invalid_amount"),
    ("amount-inner-space", pay('"1 000"'), 422, "invalid_amount"),
    ("amount-plus-sign", pay('"+1"'), 422, "invalid_amount"),
    ("amount-exponent-string", pay('"1e3"'), 422, "invalid_amount"),
    ("amount-hex-string", pay('"0x10"'), 422, "invalid_amount"),
    ("amount-underscore", pay('"1_000"'), 422, "invalid_amount"),
    ("amount-comma-decimal", pay('"1,5"'), 422, "invalid_amount"),
    ("amount-leading-zero", pay('"01"'), 422, "invalid_amount"),
    ("amount-dot-only", pay('".5"'), 422, "invalid_amount"),
    ("amount-trailing-dot", pay('"5."'), 422, "invalid_amount"),
    ("amount-arabic-digits", pay('"\u0661\u0662\u0663"'), 422, "invalid_amount"),
    ("amount-arabic-digits-escaped", pay('"\\u0661\\u0662"'), 422, "invalid_amount"),
    ("amount-fullwidth-digits", pay('"\uff11"'), 422, "invalid_amount"),
    ("amount-empty-string", pay('""'), 422, "invalid_amount"),
    ("amount-long-string", pay('"' + "1" * 100 + '"'), 422, "invalid_amount"),
    ("amount-true", pay("true"), 422, None),
    ("amount-false", pay("false"), 422, None),
    ("amount-null", pay("null"), 422, None),
    ("amount-object", pay('{"value": "1"}'), 422, None),
    ("amount-list", pay('["1"]'), 422, None),
    ("amount-nul-string", pay('"1\\u0000"'), 422, "invalid_amount"),
]:
    CASES.append(case(f"POST {P} {name}", "POST", P, body, status, code))

# --- lifecycle fields (SPEC 9): POST /payments, each batch item, POST /accounts' metadata -------
def meta(value: str) -> str:
    return ', "metadata": ' + value


def many_keys(n: int) -> str:
    return "{" + ", ".join(f'"k{i}": "v"' for i in range(n)) + "}"


BAD_METADATA = {
    "metadata-string": '"x"',
    "metadata-list": '[]',
    "metadata-list-of-pairs": '[["k", "v"]]',
    "metadata-number": "5",
    "metadata-bool": "true",
    "metadata-21-keys": many_keys(21),
    "metadata-key-empty": '{"": "v"}',
    "metadata-key-41-chars": '{"' + "k" * 41 + '": "v"}',
    "metadata-key-space": '{"a b": "v"}',
    "metadata-key-non-ascii": '{"cl\\u00e9": "v"}',
    "metadata-key-slash": '{"a/b": "v"}',
    "metadata-key-trailing-newline": '{"ab\\n": "v"}',
    "metadata-key-nul": '{"a\\u0000": "v"}',
    "metadata-value-number": '{"k": 5}',
    "metadata-value-null": '{"k": null}',
    "metadata-value-object": '{"k": {}}',
    "metadata-value-list": '{"k": ["v"]}',
    "metadata-value-bool": '{"k": false}',
    "metadata-value-501-chars": '{"k": "' + "v" * 501 + '"}',
    "metadata-value-nul": '{"k": "a\\u0000b"}',
    "metadata-value-lone-surrogate": '{"k": "a\\ud800b"}',
}
BAD_REFERENCE = {
    "reference-empty": '""',
    "reference-129-chars": '"' + "r" * 129 + '"',
    "reference-non-ascii": '"caf\\u00e9"',
    "reference-tab": '"a\\tb"',
    "reference-nul": '"a\\u0000"',
    "reference-del": '"a\\u007f"',
    "reference-trailing-newline": '"ab\\n"',
    "reference-number": "5",
    "reference-bool": "true",
    "reference-object": '{}',
    "reference-list": '["r"]',
}
PAYMENT_LIFECYCLE = [
    ("capture-method-number", ', "capture_method": 1'),
    ("capture-method-upper", ', "capture_method": "MANUAL"'),
    ("capture-method-title", ', "capture_method": "Manual"'),
    ("capture-method-empty", ', "capture_method": ""'),
    ("capture-method-space", ', "capture_method": "manual "'),
    ("capture-method-unknown", ', "capture_method": "later"'),
    ("capture-method-null", ', "capture_method": null'),
    ("capture-method-bool", ', "capture_method": true'),
    ("capture-method-list", ', "capture_method": ["manual"]'),
    ("expires-in-zero", ', "capture_method": "manual", "authorization_expires_in": 0'),
    ("expires-in-2592001", ', "capture_method": "manual", "authorization_expires_in": 2592001'),
    ("expires-in-negative", ', "capture_method": "manual", "authorization_expires_in": -1'),
    ("expires-in-float", ', "capture_method": "manual", "authorization_expires_in": 60.5'),
    ("expires-in-integral-float", ', "capture_method": "manual", "authorization_expires_in": 60.0'),
    ("expires-in-exponent", ', "capture_method": "manual", "authorization_expires_in": 6e1'),
    ("expires-in-string", ', "capture_method": "manual", "authorization_expires_in": "60"'),
    ("expires-in-bool", ', "capture_method": "manual", "authorization_expires_in": true'),
    ("expires-in-huge", ', "capture_method": "manual", "authorization_expires_in": ' + str(2**64)),
    ("expires-in-automatic", ', "capture_method": "automatic", "authorization_expires_in": 60'),
    ("expires-in-default-automatic", ', "authorization_expires_in": 60'),
    *((name, meta(value)) for name, value in BAD_METADATA.items()),
    *((name, ', "reference": ' + value) for name, value in BAD_REFERENCE.items()),
]
for name, extra in PAYMENT_LIFECYCLE:
    CASES.append(case(f"POST {P} {name}", "POST", P, pay('"1"', extra=extra), 422, "validation_error"))
    CASES.append(case(f"POST /payments/batch item-{name}", "POST", "/payments/batch",
                      '{"payments": [' + pay('"1"') + ", " + pay('"1"', extra=extra) + "]}",
                      422, "validation_error"))
    CASES.append(case(f"POST /payments/batch atomic item-{name}", "POST", "/payments/batch",
                      '{"atomic": true, "payments": [' + pay('"1"', extra=extra) + "]}",
                      422, "validation_error"))
for name, value in BAD_METADATA.items():
    CASES.append(case(f"POST /accounts {name}", "POST", "/accounts", acct('"1"', extra=meta(value)),
                      422, "validation_error"))
for name, extra in [("reference", ', "reference": "r"'), ("capture-method", ', "capture_method": "manual"'),
                    ("held", ', "held": "1"')]:
    CASES.append(case(f"POST /accounts extra-{name}", "POST", "/accounts", acct('"1"', extra=extra),
                      422, "validation_error"))

# --- capture, cancel, refunds (SPEC 9), on the payments of `lifecycle_payments` ------------------
for action in ("capture", "cancel", "refunds"):
    for name, path in [("unknown", "/payments/987654321"), ("abc", "/payments/abc"),
                       ("zero", "/payments/0"), ("negative", "/payments/-1"),
                       ("beyond-bigint", f"/payments/{MAX_ID + 1}"), ("max-bigint", f"/payments/{MAX_ID}"),
                       ("unicode-digit", "/payments/%D9%A1")]:
        CASES.append(case(f"POST {action} {name}", "POST", f"{path}/{action}", "{}", 404, "not_found"))
        CASES.append(case(f"POST {action} {name} no-body", "POST", f"{path}/{action}", None, 404, "not_found"))
    CASES.append(case(f"GET {action}", "GET", f"/payments/$authorized/{action}", None, 405,
                      "method_not_allowed"))
    for label, text_ in MALFORMED.items():
        if label in ("empty-body", "whitespace-body"):
            continue
        target = "$completed" if action == "refunds" else "$authorized"
        CASES.append(case(f"POST {action} {label}", "POST", f"/payments/{target}/{action}", text_, 400,
                          "malformed_request"))
    for label, key in {"too-long": "k" * 256, "non-ascii": "cl\u00e9", "empty": "", "control-char": "a\tb"}.items():
        target = "$completed" if action == "refunds" else "$authorized"
        body = '{"amount": "0.5"}' if action != "cancel" else "{}"
        CASES.append(case(f"POST {action} idempotency-key-{label}", "POST", f"/payments/{target}/{action}",
                          body, 400, "malformed_request", {"Idempotency-Key": key}))

# whitespace only is a body that is not JSON (an empty body means `{}` on these endpoints)
CASES.append(case("POST capture whitespace-body", "POST", "/payments/$authorized/capture", "   ", 400,
                  "malformed_request"))
CAPTURE = "/payments/$authorized/capture"
for name, body, status, code in [
    ("amount-zero", '{"amount": 0}', 422, "invalid_amount"),
    ("amount-zero-string", '{"amount": "0"}', 422, "invalid_amount"),
    ("amount-zero-decimal", '{"amount": 0.00}', 422, "invalid_amount"),
    ("amount-negative", '{"amount": -1}', 422, "invalid_amount"),
    ("amount-negative-string", '{"amount": "-1"}', 422, "invalid_amount"),
    ("amount-3-decimals", '{"amount": 0.001}', 422, "invalid_amount"),
    ("amount-3-decimals-string", '{"amount": "0.001"}', 422, "invalid_amount"),
    ("amount-NaN-string", '{"amount": "NaN"}', 422, "invalid_amount"),
    ("amount-Infinity-string", '{"amount": "Infinity"}', 422, "invalid_amount"),
    ("amount-NaN-literal", '{"amount": NaN}', 400, "malformed_request"),
    ("amount-1e999999", '{"amount": 1e999999}', 422, "invalid_amount"),
    ("amount-exponent-string", '{"amount": "1e1"}', 422, "invalid_amount"),
    ("amount-spaces", '{"amount": " 1"}', 422, "invalid_amount"),
    ("amount-empty-string", '{"amount": ""}', 422, "invalid_amount"),
    ("amount-above-authorized", '{"amount": "10.01"}', 422, "invalid_amount"),
    ("amount-far-above-authorized", '{"amount": 1000000}', 422, "invalid_amount"),
    ("amount-bool", '{"amount": true}', 422, None),
    ("amount-object", '{"amount": {}}', 422, None),
    ("amount-list", '{"amount": ["1"]}', 422, None),
    ("extra-field", '{"amount": "1", "note": "x"}', 422, "validation_error"),
    ("extra-field-only", '{"final": true}', 422, "validation_error"),
    ("metadata-field", '{"metadata": {}}', 422, "validation_error"),
]:
    CASES.append(case(f"POST capture {name}", "POST", CAPTURE, body, status, code))
CASES.append(case("POST cancel extra-field", "POST", "/payments/$authorized/cancel", '{"reason": "x"}', 422,
                  "validation_error"))
CASES.append(case("POST cancel amount", "POST", "/payments/$authorized/cancel", '{"amount": "1"}', 422,
                  "validation_error"))
# the wrong state: 409 invalid_state, whatever the body
for state in ("completed", "failed", "canceled", "refund", "capture_done"):
    for action, body in (("capture", None), ("capture", '{"amount": "1"}'), ("cancel", None), ("cancel", "{}")):
        CASES.append(case(f"POST {action} of {state}{' with body' if body else ''}", "POST",
                          f"/payments/${state}/{action}", body, 409, "invalid_state"))
for state in ("authorized", "failed", "canceled"):
    for body in (None, '{"amount": "1"}'):
        CASES.append(case(f"POST refunds of {state}{' with body' if body else ''}", "POST",
                          f"/payments/${state}/refunds", body, 409, "invalid_state"))
REFUNDS = "/payments/$completed/refunds"  # 10 captured, 4 refunded: 6 left
for name, body, status, code in [
    ("amount-zero", '{"amount": 0}', 422, "invalid_amount"),
    ("amount-zero-string", '{"amount": "0.00"}', 422, "invalid_amount"),
    ("amount-negative", '{"amount": -1}', 422, "invalid_amount"),
    ("amount-negative-string", '{"amount": "-0.01"}', 422, "invalid_amount"),
    ("amount-3-decimals", '{"amount": 0.001}', 422, "invalid_amount"),
    ("amount-NaN-string", '{"amount": "NaN"}', 422, "invalid_amount"),
    ("amount-NaN-literal", '{"amount": NaN}', 400, "malformed_request"),
    ("amount-1e999999", '{"amount": 1e999999}', 422, "invalid_amount"),
    ("amount-plus-sign", '{"amount": "+1"}', 422, "invalid_amount"),
    ("amount-bool", '{"amount": true}', 422, None),
    ("amount-list", '{"amount": [1]}', 422, None),
    ("amount-more-than-left", '{"amount": "6.01"}', 422, "refund_exceeds_payment"),
    ("amount-more-than-captured", '{"amount": "10"}', 422, "refund_exceeds_payment"),
    ("extra-field", '{"amount": "1", "reason": "x"}', 422, "validation_error"),
    ("buyer-field", '{"buyer_account_id": 1}', 422, "validation_error"),
    ("capture-method-field", '{"capture_method": "manual"}', 422, "validation_error"),
    *((name, '{"amount": "1"' + meta(value) + "}", 422, "validation_error") for name, value in BAD_METADATA.items()),
    *((name, '{"amount": "1", "reference": ' + value + "}", 422, "validation_error")
      for name, value in BAD_REFERENCE.items()),
]:
    CASES.append(case(f"POST refunds {name}", "POST", REFUNDS, body, status, code))
CASES.append(case("POST refunds of a refund", "POST", "/payments/$refund/refunds", None, 422, "validation_error"))
CASES.append(case("POST refunds of a refund with amount", "POST", "/payments/$refund/refunds", '{"amount": "1"}',
                  422, "validation_error"))
CASES.append(case("POST refunds above partial capture", "POST", "/payments/$capture_done/refunds",
                  '{"amount": "1.51"}', 422, "refund_exceeds_payment"))

# --- POST /accounts ------------------------------------------------------------------------------
A = "/accounts"
for name, body, status, code in [
    ("empty-object", "{}", 422, "validation_error"),
    ("missing-name", '{"currency": "USD"}', 422, "validation_error"),
    ("missing-currency", '{"name": "n"}', 422, "unknown_currency"),
    ("extra-field", acct('"1"', extra=', "balance": "5"'), 422, "validation_error"),
    ("extra-id-field", acct('"1"', extra=', "id": 5'), 422, "validation_error"),
    ("name-empty", '{"name": "", "currency": "USD"}', 422, "validation_error"),
    ("name-number", '{"name": 5, "currency": "USD"}', 422, "validation_error"),
    ("name-null", '{"name": null, "currency": "USD"}', 422, "validation_error"),
    ("name-object", '{"name": {}, "currency": "USD"}', 422, "validation_error"),
    ("name-too-long", '{"name": "' + "x" * 201 + '", "currency": "USD"}', 422, "validation_error"),
    ("name-nul-char", '{"name": "a\\u0000b", "currency": "USD"}', 422, "validation_error"),
    ("name-tab-char", '{"name": "a\\tb", "currency": "USD"}', 422, "validation_error"),
    ("name-lone-surrogate", '{"name": "a\\ud800b", "currency": "USD"}', 422, "validation_error"),
    ("currency-unknown", acct('"1"', currency='"currency": "XYZ"'), 422, "unknown_currency"),
    ("currency-empty", acct('"1"', currency='"currency": ""'), 422, "validation_error"),
    ("currency-number", acct('"1"', currency='"currency": 1'), 422, "validation_error"),
    ("currency-null-only", acct('"1"', currency='"currency": null'), 422, "unknown_currency"),
    ("currency-id-unknown", acct('"1"', currency='"currency_id": 99'), 422, "unknown_currency"),
    ("currency-id-zero", acct('"1"', currency='"currency_id": 0'), 422, "validation_error"),
    ("currency-id-negative", acct('"1"', currency='"currency_id": -1'), 422, "validation_error"),
    ("currency-id-string", acct('"1"', currency='"currency_id": "1"'), 422, "validation_error"),
    ("currency-id-float", acct('"1"', currency='"currency_id": 1.0'), 422, "validation_error"),
    ("currency-id-bool", acct('"1"', currency='"currency_id": true'), 422, "validation_error"),
    ("currency-id-beyond-bigint", acct('"1"', currency=f'"currency_id": {MAX_ID + 1}'), 422, "validation_error"),
    ("currency-id-and-code-differ", acct('"1"', currency='"currency_id": 1, "currency": "EUR"'), 422,
     "currency_mismatch"),
    ("amount-negative", acct("-1"), 422, "invalid_amount"),
    ("amount-negative-string", acct('"-0.01"'), 422, "invalid_amount"),
    ("amount-NaN-literal", acct("NaN"), 400, "malformed_request"),
    ("amount-Infinity-literal", acct("Infinity"), 400, "malformed_request"),
    ("amount-minus-Infinity-literal", acct("-Infinity"), 400, "malformed_request"),
    ("amount-NaN-string", acct('"NaN"'), 422, "invalid_amount"),
    ("amount-1e999999", acct("1e999999"), 422, "invalid_amount"),
    ("amount-1e-99999999", acct("1e-99999999"), 422, "invalid_amount"),
    ("amount-40-digits", acct("1" * 40), 422, "invalid_amount"),
    ("amount-3-decimals-usd", acct("500.123"), 422, "invalid_amount"),
    ("amount-9-decimals-btc", acct('"0.123456789"', currency='"currency": "BTC"'), 422, "invalid_amount"),
    ("amount-spaces", acct('" 5 "'), 422, "invalid_amount"),
    ("amount-sign", acct('"+5"'), 422, "invalid_amount"),
    ("amount-exponent-string", acct('"5E2"'), 422, "invalid_amount"),
    ("amount-unicode-digits", acct('"\u0665"'), 422, "invalid_amount"),
    ("amount-bool", acct("true"), 422, None),
    ("amount-null", acct("null"), 422, None),
    ("amount-object", acct("{}"), 422, None),
]:
    CASES.append(case(f"POST {A} {name}", "POST", A, body, status, code))

# --- POST /payments/batch ------------------------------------------------------------------------
B = "/payments/batch"
GOOD = pay('"1"')
for name, body, status, code in [
    ("empty-object", "{}", 422, "validation_error"),
    ("payments-empty-list", '{"payments": []}', 422, "validation_error"),
    ("payments-null", '{"payments": null}', 422, "validation_error"),
    ("payments-object", '{"payments": {}}', 422, "validation_error"),
    ("payments-string", '{"payments": "x"}', 422, "validation_error"),
    ("extra-field", '{"payments": [' + GOOD + '], "note": 1}', 422, "validation_error"),
    ("atomic-string", '{"payments": [' + GOOD + '], "atomic": "true"}', 422, "validation_error"),
    ("atomic-number", '{"payments": [' + GOOD + '], "atomic": 1}', 422, "validation_error"),
    ("atomic-null", '{"payments": [' + GOOD + '], "atomic": null}', 422, "validation_error"),
    ("item-not-object", '{"payments": [' + GOOD + ', 5]}', 422, "validation_error"),
    ("item-null", '{"payments": [null]}', 422, "validation_error"),
    ("items-1001", '{"payments": [' + ", ".join([GOOD] * 1001) + "]}", 422, "validation_error"),
    ("one-bad-amount", '{"payments": [' + GOOD + ", " + pay("0") + "]}", 422, "validation_error"),
    ("one-unknown-account", '{"payments": [' + GOOD + ", " + pay('"1"', seller="987654321") + "]}",
     422, "validation_error"),
    ("one-currency-mismatch", '{"payments": [' + GOOD + ", " + pay('"1"', seller="$eur") + "]}",
     422, "validation_error"),
    ("one-scale", '{"payments": [' + GOOD + ", " + pay('"0.001"') + "]}", 422, "validation_error"),
    ("atomic-one-bad", '{"atomic": true, "payments": [' + GOOD + ", " + pay('"1"', seller="$usd1") + "]}",
     422, "validation_error"),
    ("item-nan-literal", '{"payments": [' + pay("NaN") + "]}", 400, "malformed_request"),
]:
    CASES.append(case(f"POST {B} {name}", "POST", B, body, status, code))

# --- URLs and query strings ----------------------------------------------------------------------
for name, method, path, status, code in [
    ("payment-abc", "GET", "/payments/abc", 404, "not_found"),
    ("payment-negative", "GET", "/payments/-1", 404, "not_found"),
    ("payment-zero", "GET", "/payments/0", 404, "not_found"),
    ("payment-float", "GET", "/payments/1.0", 404, "not_found"),
    ("payment-beyond-bigint", "GET", f"/payments/{MAX_ID + 1}", 404, "not_found"),
    ("payment-20-digits", "GET", "/payments/99999999999999999999", 404, "not_found"),
    ("payment-max-bigint", "GET", f"/payments/{MAX_ID}", 404, "not_found"),
    ("payment-unicode-digits", "GET", "/payments/%D9%A1", 404, "not_found"),
    ("account-abc", "GET", "/accounts/abc", 404, "not_found"),
    ("account-negative", "GET", "/accounts/-1", 404, "not_found"),
    ("account-issuance", "GET", "/accounts/1", None, None),  # placeholder replaced below
    ("account-20-digits", "GET", "/accounts/99999999999999999999", 404, "not_found"),
    ("account-max-bigint", "GET", f"/accounts/{MAX_ID}", 404, "not_found"),
    ("account-singular-abc", "GET", "/account/abc", 404, "not_found"),
    ("account-singular-unknown", "GET", "/account/987654321", 404, "not_found"),
    ("account-unknown", "GET", "/accounts/987654321", 404, "not_found"),
    ("entries-unknown", "GET", "/accounts/987654321/entries", 404, "not_found"),
    ("entries-abc", "GET", "/accounts/abc/entries", 404, "not_found"),
    ("freeze-unknown", "POST", "/accounts/987654321/freeze", 404, "not_found"),
    ("freeze-abc", "POST", "/accounts/abc/freeze", 404, "not_found"),
    ("freeze-negative", "POST", "/accounts/-1/freeze", 404, "not_found"),
    ("unfreeze-unknown", "POST", "/accounts/987654321/unfreeze", 404, "not_found"),
    ("unfreeze-beyond-bigint", "POST", "/accounts/99999999999999999999/unfreeze", 404, "not_found"),
    ("batch-abc", "GET", "/batches/abc", 404, "not_found"),
    ("batch-unknown", "GET", "/batches/987654321", 404, "not_found"),
    ("batch-beyond-bigint", "GET", "/batches/99999999999999999999", 404, "not_found"),
    ("unknown-path", "GET", "/nope", 404, "not_found"),
    ("get-on-post-only", "GET", "/payments/batch", 405, "method_not_allowed"),
    ("delete-account", "DELETE", "/accounts/$usd1", 405, "method_not_allowed"),
    ("put-payment", "PUT", "/payments/1", 405, "method_not_allowed"),
]:
    if name == "account-issuance":
        continue
    CASES.append(case(f"{method} {name}", method, path, None, status, code))

def _cursor(value) -> str:
    raw = value if isinstance(value, bytes) else value.encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


LISTS = ("/accounts", "/payments", "/accounts/$usd1/entries")
BAD_PAGING = {
    "limit-zero": "limit=0",
    "limit-negative": "limit=-1",
    "limit-too-big": "limit=1001",
    "limit-huge": "limit=99999999999999999999999",
    "limit-abc": "limit=abc",
    "limit-float": "limit=1.5",
    "limit-exponent": "limit=1e2",
    "limit-space": "limit=%2010",
    "limit-plus": "limit=%2B10",
    "limit-unicode-digit": "limit=%D9%A1",
    "cursor-garbage": "cursor=abc",
    "cursor-not-base64": "cursor=%21%21%21",
    "cursor-wrong-version": "cursor=" + _cursor("v2:10"),
    "cursor-non-digit": "cursor=" + _cursor("v1:abc"),
    "cursor-negative": "cursor=" + _cursor("v1:-1"),
    "cursor-empty-value": "cursor=" + _cursor("v1:"),
    "cursor-unicode-digit": "cursor=" + _cursor("v1:\u0661"),
    "cursor-too-long": "cursor=" + _cursor("v1:" + "9" * 22),
    "cursor-beyond-bigint": "cursor=" + _cursor("v1:" + "9" * 19),
    "cursor-binary": "cursor=" + _cursor(b"\xff\xfe"),
}
for path in LISTS:
    for label, query in BAD_PAGING.items():
        CASES.append(case(f"GET {path} {label}", "GET", f"{path}?{query}", None, 400, "malformed_request"))
for label, query in {
    "status-unknown": "status=done",
    "status-upper": "status=PENDING",
    "status-empty-list": "status=pending,failed",
    "account-id-abc": "account_id=abc",
    "account-id-zero": "account_id=0",
    "account-id-negative": "account_id=-1",
    "account-id-float": "account_id=1.0",
    "account-id-beyond-bigint": "account_id=9223372036854775808",
    "batch-id-abc": "batch_id=abc",
    "batch-id-beyond-bigint": "batch_id=99999999999999999999",
    "status-expired": "status=expired",
    "status-Authorized": "status=Authorized",
    "refund-of-abc": "refund_of=abc",
    "refund-of-empty": "refund_of=",
    "refund-of-zero": "refund_of=0",
    "refund-of-negative": "refund_of=-1",
    "refund-of-float": "refund_of=1.0",
    "refund-of-beyond-bigint": "refund_of=9223372036854775808",
    "refund-of-unicode-digit": "refund_of=%D9%A1",
    "reference-empty": "reference=",
    "reference-129-chars": "reference=" + "r" * 129,
    "reference-non-ascii": "reference=caf%C3%A9",
    "reference-nul": "reference=a%00",
    "reference-tab": "reference=a%09b",
    "reference-newline": "reference=ab%0A",
    "reference-del": "reference=a%7F",
}.items():
    CASES.append(case(f"GET /payments {label}", "GET", f"/payments?{query}", None, 400, "malformed_request"))
for label, query in {"currency-unknown": "currency=XYZ", "currency-nul": "currency=%00"}.items():
    CASES.append(case(f"GET /accounts {label}", "GET", f"/accounts?{query}", None, 400, "malformed_request"))

# --- headers: Idempotency-Key and Authorization ----------------------------------------------------
for path, body in (("/payments", GOOD), ("/accounts", acct('"1"')),
                   ("/payments/batch", '{"payments": [' + GOOD + "]}")):
    for label, key in {"too-long": "k" * 256, "non-ascii": "cl\u00e9", "empty": "", "control-char": "a\tb"}.items():
        CASES.append(case(f"POST {path} idempotency-key-{label}", "POST", path, body, 400, "malformed_request",
                          {"Idempotency-Key": key}))

AUTH_CASES = {
    "no-authorization": None,
    "empty-authorization": "",
    "wrong-key": "Bearer not-a-key",
    "bearer-no-key": "Bearer ",
    "basic-scheme": "Basic dXNlcjpwYXNz",
    "key-without-scheme": "test-key",
}
for method, path, body in (("POST", "/accounts", acct('"1"')), ("POST", "/payments", GOOD),
                           ("POST", "/payments/batch", '{"payments": [' + GOOD + "]}"),
                           ("GET", "/accounts", None), ("GET", "/accounts/$usd1", None),
                           ("GET", "/payments", None), ("GET", "/currencies", None),
                           ("GET", "/ready", None), ("POST", "/accounts/$usd1/freeze", None),
                           ("GET", "/payments/abc", None),
                           ("POST", "/payments/$authorized/capture", None),
                           ("POST", "/payments/$authorized/capture", '{"amount": "1"}'),
                           ("POST", "/payments/$authorized/cancel", None),
                           ("POST", "/payments/$completed/refunds", '{"amount": "1"}'),
                           ("POST", "/payments/987654321/capture", None),
                           ("GET", "/payments?refund_of=$completed", None)):
    for label, value in AUTH_CASES.items():
        CASES.append(case(f"{method} {path} {label}", method, path, body, 401, "unauthorized",
                          {"Authorization": value}))


# --- a key given twice: the body reads two ways (first or last value wins), so it is refused -------
for name, path, body in [
    ("payment-amount-twice", "/payments", pay('"1"', extra=', "amount": "100"')),
    ("payment-buyer-twice", "/payments", pay('"1"', extra=', "buyer_account_id": $usd2')),
    ("payment-same-value-twice", "/payments", pay('"1"', extra=', "amount": "1"')),
    ("account-amount-twice", "/accounts", acct('"1"', extra=', "amount": "1000"')),
    ("batch-atomic-twice", "/payments/batch", '{"atomic": true, "payments": [' + pay('"1"') + '], "atomic": false}'),
    ("batch-item-amount-twice", "/payments/batch", '{"payments": [' + pay('"1"', extra=', "amount": "9"') + "]}"),
    ("nested-object-key-twice", "/payments", pay('"1"', extra=', "x": {"a": 1, "a": 2}')),
]:
    CASES.append(case(f"POST {path} duplicate-key {name}", "POST", path, body, 400, "malformed_request"))


@pytest.mark.parametrize("method,path,body,status,code,headers", CASES)
def test_bad_input(app, client, ids, nothing_written, lifecycle_unchanged, method, path, body, status, code,
                   headers):
    path = Template(path).substitute(ids)
    raw = None if body is None else _raw(Template(body).substitute(ids))
    headers = dict(headers or {})
    if "Authorization" in headers:
        value = headers.pop("Authorization")
        client = app.test_client()  # no default credentials
        if value is not None:
            headers["Authorization"] = value
    response = call(client, method, path, raw, headers)
    assert_error(response, status, code)
    if status == 401:
        assert response.headers.get("WWW-Authenticate", "").startswith("Bearer")


def test_lifecycle_fields_at_their_bounds_are_accepted(client, ids):
    """The edges just inside what the 422s above refuse (so those are about the bound), and null
    reference / metadata meaning absent. Returned exactly as given."""
    edge_meta = {f"k{i:02d}": "v" for i in range(19)} | {"K" * 40: "\u00e9\n\t" + "x" * 497}
    body = {"buyer_account_id": ids["usd1"], "seller_account_id": ids["usd2"], "amount": "0.01",
            "capture_method": "manual", "authorization_expires_in": 2592000,
            "reference": " !~" + "r" * 125, "metadata": edge_meta}
    r = client.post("/payments", json=body)
    assert r.status_code == 202, r.get_json()
    got = r.get_json()
    assert (got["reference"], got["metadata"], got["capture_method"]) == (body["reference"], edge_meta, "manual")
    assert got["authorization_expires_at"] is not None
    for extra in ({"reference": None, "metadata": None}, {"metadata": {}}, {"authorization_expires_in": 1},
                  {"authorization_expires_in": None}, {"capture_method": "automatic", "authorization_expires_in": None},
                  {"metadata": {"a-b_c.D9": ""}}):
        r = client.post("/payments", json={**body, **extra})
        assert r.status_code == 202, (extra, r.get_json())
        got = r.get_json()
        assert got["metadata"] == ((extra["metadata"] or {}) if "metadata" in extra else edge_meta)
        assert got["reference"] == extra.get("reference", body["reference"])
        assert got["capture_method"] == extra.get("capture_method", "manual")
        assert (got["authorization_expires_at"] is None) == (got["capture_method"] == "automatic")
        if got["capture_method"] == "manual":  # counted from acceptance
            seconds = {1: 1, None: 604800}.get(extra.get("authorization_expires_in", 0), 2592000)
            assert (datetime.fromisoformat(got["authorization_expires_at"]) - datetime.fromisoformat(
                got["created_at"])).total_seconds() == seconds, (extra, got)
    r = client.post("/accounts", json={"name": "edge", "currency": "USD", "metadata": edge_meta})
    assert r.status_code == 201 and r.get_json()["metadata"] == edge_meta, r.get_json()
    r = client.post("/accounts", json={"name": "edge", "currency": "USD", "metadata": None})
    assert r.status_code == 201 and r.get_json()["metadata"] == {}, r.get_json()
    r = client.get("/payments", query_string={"reference": body["reference"]})
    assert r.status_code == 200 and r.get_json()["payments"], r.get_json()
    assert client.get("/payments", query_string={"reference": "r" * 128}).status_code == 200


def test_batch_lists_every_bad_index(client, ids, nothing_written):
    items = [pay('"1"'), pay("0"), pay('"1"'), pay('"1"', seller="987654321"), pay('"1"', seller="$eur"),
             '{"buyer_account_id": "x"}', pay('"0.001"'), pay('"2"', seller="$usd1")]
    body = Template('{"payments": [' + ", ".join(items) + "]}").substitute(ids).encode()
    error = assert_error(call(client, "POST", "/payments/batch", body), 422, "validation_error")
    by_index = {d["index"]: d["code"] for d in error["details"]}
    assert by_index == {1: "invalid_amount", 3: "unknown_account", 4: "currency_mismatch",
                        5: "validation_error", 6: "invalid_amount", 7: "same_account"}


def test_body_over_size_limit(app, client, ids, nothing_written):
    limit = app.extensions["wallet"].settings.max_body_bytes
    assert limit == 1024 * 1024
    padding = b"x" * (limit + 1)
    for path, body in (("/accounts", b'{"name": "' + padding + b'", "currency": "USD"}'),
                       ("/payments", b'{"buyer_account_id": 1, "seller_account_id": 2, "amount": "1' +
                        b"0" * (limit + 1) + b'"}'),
                       ("/payments/batch", b'{"payments": [' + b", ".join(
                           [Template(GOOD).substitute(ids).encode()] * 20_000) + b"]}")):
        assert len(body) > limit
        assert_error(call(client, "POST", path, body), 413, "request_too_large")


def test_body_just_under_limit_is_parsed(app, client, ids, nothing_written):
    """A body below the limit gets as far as validation (so the 413 above is about size)."""
    limit = app.extensions["wallet"].settings.max_body_bytes
    body = b'{"name": "' + b"x" * (limit - 100) + b'", "currency": "USD"}'
    assert len(body) < limit
    assert_error(call(client, "POST", "/accounts", body), 422, "validation_error")


# --- fuzz ----------------------------------------------------------------------------------------

class Raw(str):
    """A JSON fragment written as is (numbers json.dumps could not produce)."""


NUMBER_TEXT = st.from_regex(r"\A-?(0|[1-9][0-9]{0,45})(\.[0-9]{1,25})?([eE][+-]?[0-9]{1,9})?\Z")
AMOUNT_STRINGS = st.sampled_from(["1", "0", "-1", "500.1", "0.001", "1e3", " 1", "+1", "NaN", "Infinity",
                                  "\u0661", "1" * 40, "", "0.00000001", "1.0", "9" * 18])
FIELDS = ["name", "currency", "currency_id", "amount", "buyer_account_id", "seller_account_id",
          "payments", "atomic"]


def scalars(ids: dict[str, int]):
    return st.one_of(
        st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
        st.sampled_from(list(ids.values()) + [1, 2, 3, 4, -1, 0, MAX_ID, MAX_ID + 1]),
        st.floats(allow_nan=True, allow_infinity=True), NUMBER_TEXT.map(Raw),
        st.text(max_size=20), AMOUNT_STRINGS, st.sampled_from(["USD", "EUR", "btc", "XYZ"]),
    )


def json_values(ids):
    return st.recursive(
        scalars(ids),
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=5)), children, max_size=5)),
        max_leaves=12)


def usually(good, other, tenths: int = 8):
    """`good` in about `tenths`/10 of the examples, else `other` (one_of alone favours neither)."""
    return st.sampled_from(range(10)).flatmap(lambda n: good if n < tenths else other)


def amounts(ids):
    plausible = st.one_of(st.from_regex(r"\A[1-9][0-9]{0,6}(\.[0-9]{1,3})?\Z"),
                          st.from_regex(r"\A[1-9][0-9]{0,6}(\.[0-9]{1,3})?\Z").map(Raw))
    return usually(plausible, st.one_of(NUMBER_TEXT.map(Raw), AMOUNT_STRINGS, scalars(ids)), 6)


def mostly_valid(required: dict, optional: dict):
    """Bodies that are often well-formed, so the fuzz gets past validation to the ledger too:
    sometimes a required field is dropped, sometimes an extra one is added."""
    keys = list(required)
    return st.tuples(
        st.fixed_dictionaries(required, optional=optional),
        usually(st.none(), st.sampled_from(keys), 9) if keys else st.none(),
        usually(st.none(), st.tuples(st.text(min_size=1, max_size=8), st.integers()), 9),
    ).map(lambda t: {**{k: v for k, v in t[0].items() if k != t[1]}, **(dict([t[2]]) if t[2] else {})})


METADATA_KEYS = st.one_of(st.from_regex(r"\A[A-Za-z0-9_.\-]{1,40}\Z"), st.text(max_size=45))


def metadata(ids):
    values = usually(st.text(max_size=30), st.one_of(st.text(min_size=490, max_size=510), scalars(ids)), 9)
    return usually(st.dictionaries(METADATA_KEYS, values, max_size=22), json_values(ids))


def references(ids):
    return usually(st.from_regex(r"\A[\x20-\x7e]{1,130}\Z"), st.one_of(st.text(max_size=130), scalars(ids)))


def lifecycle_fields(ids) -> dict:
    return {"capture_method": usually(st.sampled_from(["automatic", "manual"]),
                                      st.one_of(st.sampled_from(["Manual", "", "MANUAL", "auto"]), scalars(ids))),
            "authorization_expires_in": usually(st.integers(min_value=1, max_value=2592000),
                                                st.one_of(st.integers(min_value=-10, max_value=2**40),
                                                          scalars(ids))),
            "metadata": metadata(ids), "reference": references(ids)}


def objects(ids, path):
    known = st.sampled_from(list(ids.values()) + [987654321])
    if path == "/payments":
        account = usually(known, scalars(ids), 9)
        return mostly_valid(
            {"buyer_account_id": account, "seller_account_id": account, "amount": amounts(ids)},
            {"currency_id": usually(st.sampled_from([1, 2, 3, 4, 99]), scalars(ids)), **lifecycle_fields(ids)})
    if path == "capture":
        return mostly_valid({}, {"amount": amounts(ids)})
    if path == "refunds":
        return mostly_valid({}, {"amount": amounts(ids), "metadata": metadata(ids), "reference": references(ids)})
    return mostly_valid(
        {"name": usually(st.text(min_size=1, max_size=30), scalars(ids))},
        {"currency": usually(st.sampled_from(["USD", "eur", "BTC", "ETH", "XYZ", ""]), scalars(ids)),
         "currency_id": usually(st.sampled_from([1, 2, 3, 4, 99]), scalars(ids)),
         "amount": amounts(ids), "metadata": metadata(ids)})


def encode(value) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {encode(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(encode(v) for v in value) + "]"
    return json.dumps(value)


@pytest.mark.parametrize("path", ["/payments", "/accounts"])
def test_fuzz_never_5xx(app, ids, path):
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = AUTH["Authorization"]

    @hsettings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=usually(objects(ids, path), json_values(ids)),
           mangle=st.sampled_from([""] * 18 + ["cut", "junk"]))
    def run(body, mangle):
        text = encode(body)
        if mangle == "cut":
            text = text[: len(text) // 2]
        elif mangle == "junk":
            text += "}"
        response = client.post(path, data=text.encode("utf-8", "surrogatepass"), content_type="application/json")
        assert response.status_code < 500, (text, response.get_data(as_text=True))
        if response.status_code >= 400:
            assert_error(response, response.status_code)
        else:
            assert response.status_code in (201, 202), response.status_code

    run()


def fuzz_body(text_: str, mangle: str) -> bytes:
    if mangle == "cut":
        text_ = text_[: len(text_) // 2]
    elif mangle == "junk":
        text_ += "}"
    elif mangle == "empty":
        text_ = ""
    return text_.encode("utf-8", "surrogatepass")


@pytest.mark.parametrize("action", ["capture", "refunds"])
def test_fuzz_lifecycle_never_5xx(app, db, ids, action):
    """Fuzzed bodies against POST /payments/<id>/capture of a real authorized payment and
    /refunds of a real completed one. Whenever one succeeds (a capture, or refunds using up what
    is left), the next examples get a fresh payment in that state, so the fuzz keeps reaching the
    ledger. Accepted refunds are applied at once, as a worker would."""
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = AUTH["Authorization"]
    buyer = client.post("/accounts", json={"name": "fuzz-buyer", "currency": "USD", "amount": "100000000"}).get_json()
    seller = client.post("/accounts", json={"name": "fuzz-seller", "currency": "USD"}).get_json()
    parties = {"buyer_account_id": buyer["id"], "seller_account_id": seller["id"]}
    method = "manual" if action == "capture" else "automatic"
    state = "authorized" if action == "capture" else "completed"

    made: list[int] = []

    def fresh() -> int:
        made.append(applied(client, db, {**parties, "amount": "250000", "capture_method": method}, state))
        return made[-1]

    target = [fresh()]
    seen = defaultdict(int)

    @hsettings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=usually(objects(ids, action), json_values(ids)),
           mangle=st.sampled_from([""] * 16 + ["cut", "junk", "empty"]))
    def run(body, mangle):
        raw = fuzz_body(encode(body), mangle)
        headers = {"Content-Type": "application/json"} if raw else {}
        response = client.post(f"/payments/{target[0]}/{action}", data=raw, headers=headers)
        seen[response.status_code] += 1
        assert response.status_code < 500, (raw, response.get_data(as_text=True))
        if response.status_code >= 400:
            error = assert_error(response, response.status_code)
            if response.status_code == 409:
                raise AssertionError(f"409 on a payment that is {state}: {error}")
            if error["code"] == "refund_exceeds_payment" and error["details"]["refundable"] == "0":
                target[0] = fresh()
            return
        got = response.get_json()
        if action == "capture":
            assert response.status_code == 200 and got["status"] == "completed", got
            assert Decimal(got["amount_captured"]) <= Decimal("250000")
            target[0] = fresh()
        else:
            assert response.status_code == 202 and got["refund_of"] == target[0], got
            made.append(got["id"])
            apply_now(client, db, got["id"])

    run()
    print(f"\n{action}: {dict(seen)}")
    assert seen[200 if action == "capture" else 202] > 0, dict(seen)  # the fuzz reached the ledger
    # The books of these two accounts and these payments (the session's database holds other
    # tests' rows too, so only their lines of the reconciliation are looked at).
    ours = [f"account {buyer['id']}:", f"account {seller['id']}:", *(f"payment {p}:" for p in made)]
    with committing(db) as s:
        assert [p for p in ledger.reconcile(s) if p.startswith(tuple(ours))] == []
        total = s.execute(sql("SELECT sum(balance) FROM accounts WHERE id = ANY(:ids)"),
                          {"ids": [buyer["id"], seller["id"]]}).scalar_one()
    assert total == Decimal("100000000")


def test_chunked_body_over_limit_through_gunicorn(api_url, ids, nothing_written):
    """Without a Content-Length (chunked upload) the limit still holds: 413, nothing written."""
    import httpx

    def chunks():
        yield Template('{"buyer_account_id": $usd1, "seller_account_id": $usd2, "amount": "1", "x": "').substitute(
            ids).encode()
        for _ in range(17):
            yield b"x" * 65536
        yield b'"}'

    with httpx.Client(base_url=api_url, headers=AUTH, timeout=30) as http:
        response = http.post("/payments", content=chunks(), headers={"Content-Type": "application/json"})
        assert "content-length" not in {k.lower() for k in response.request.headers}
        assert_error(response, 413, "request_too_large")
        # a small chunked body is read whole (it gets as far as the amount check)
        small = iter([Template('{"buyer_account_id": $usd1, ').substitute(ids).encode(),
                      Template('"seller_account_id": $usd2, "amount": "0"}').substitute(ids).encode()])
        assert_error(http.post("/payments", content=small, headers={"Content-Type": "application/json"}),
                     422, "invalid_amount")
