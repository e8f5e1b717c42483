"""The domain's errors. Each has a stable `code`; the API maps classes to HTTP in one place."""
from __future__ import annotations

from enum import StrEnum
from typing import Any


class FailureCode(StrEnum):
    """Why a payment ended `failed` (stored in payments.failure_code)."""

    INSUFFICIENT_FUNDS = "insufficient_funds"
    ACCOUNT_FROZEN = "account_frozen"
    BATCH_FAILED = "batch_failed"
    # Applying it raised an error that is not retried (a data bug, a constraint, a trigger), the
    # same on every attempt: it is failed so that it holds up nothing (SPEC section 12).
    INTERNAL_ERROR = "internal_error"


class WalletError(Exception):
    code = "wallet_error"

    def __init__(self, message: str, details: Any = None):
        super().__init__(message)
        self.message = message
        self.details = details


class MalformedRequest(WalletError):
    code = "malformed_request"


class RequestTooLarge(WalletError):
    code = "request_too_large"


class Unauthorized(WalletError):
    code = "unauthorized"


class NotFound(WalletError):
    code = "not_found"


class ValidationFailed(WalletError):
    code = "validation_error"


class InvalidAmount(WalletError):
    code = "invalid_amount"


class UnknownCurrency(WalletError):
    code = "unknown_currency"


class UnknownAccount(WalletError):
    code = "unknown_account"


class SameAccount(WalletError):
    code = "same_account"


class CurrencyMismatch(WalletError):
    code = "currency_mismatch"


class IdempotencyConflict(WalletError):
    code = "idempotency_conflict"


class InvalidState(WalletError):
    """The payment is not in a state that allows this (capture or cancel of a payment that is not
    authorized, a refund of one that is not completed). `details` holds its status."""
    code = "invalid_state"


class RefundExceedsPayment(WalletError):
    code = "refund_exceeds_payment"


class Overloaded(WalletError):
    """Too many accepted payments are still pending: retry later (HTTP 429)."""
    code = "backlog_full"
