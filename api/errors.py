"""Every error leaves as {"error": {"code", "message", "details"}}; domain errors map to HTTP here."""
from __future__ import annotations

import logging

from flask import Flask, jsonify
from sqlalchemy.exc import DBAPIError, TimeoutError as PoolTimeout
from werkzeug.exceptions import HTTPException

from common import errors
from common.db import is_unavailable

log = logging.getLogger("wallet.api")

STATUS = {
    errors.MalformedRequest: 400,
    errors.Unauthorized: 401,
    errors.NotFound: 404,
    errors.IdempotencyConflict: 409,
    errors.InvalidState: 409,
    errors.RequestTooLarge: 413,
    errors.Overloaded: 429,
    errors.ValidationFailed: 422,
    errors.InvalidAmount: 422,
    errors.UnknownCurrency: 422,
    errors.UnknownAccount: 422,
    errors.SameAccount: 422,
    errors.CurrencyMismatch: 422,
    errors.RefundExceedsPayment: 422,
}

HTTP_CODES = {400: "malformed_request", 401: "unauthorized", 404: "not_found",
              405: "method_not_allowed", 413: "request_too_large", 415: "unsupported_media_type"}


def error_response(status: int, code: str, message: str, details=None):
    response = jsonify({"error": {"code": code, "message": message, "details": details}})
    response.status_code = status
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="wallet"'
    if status == 429:
        response.headers["Retry-After"] = "1"
    return response


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(errors.WalletError)
    def wallet_error(exc: errors.WalletError):
        return error_response(STATUS.get(type(exc), 400), exc.code, exc.message, exc.details)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        code = HTTP_CODES.get(exc.code, "http_error")
        return error_response(exc.code or 500, code, exc.description or exc.name)

    @app.errorhandler(DBAPIError)
    def database_error(exc: DBAPIError):
        if is_unavailable(exc):
            log.warning("database unavailable: %s", exc.__class__.__name__)
            return error_response(503, "database_unavailable", "the database is unreachable; retry later")
        return unexpected(exc)

    @app.errorhandler(PoolTimeout)
    def pool_timeout(exc: PoolTimeout):
        return error_response(503, "database_unavailable", "no database connection free; retry later")

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log.exception("unhandled error")
        return error_response(500, "internal_error", "internal error")
