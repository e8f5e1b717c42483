"""Request bodies and query strings in, validated models out; JSON numbers become `Decimal`."""
from __future__ import annotations

import base64
import binascii
import json
from decimal import Decimal
from typing import TypeVar

from flask import request
from pydantic import BaseModel, ValidationError

from common.errors import MalformedRequest, RequestTooLarge, ValidationFailed

M = TypeVar("M", bound=BaseModel)

DEFAULT_LIMIT = 50
MAX_LIMIT = 1000
MAX_ID = 2**63 - 1


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


class DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """An object that names a key twice can be read two ways (first or last value wins, depending
    on the reader): refuse it rather than guess which the client meant."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKey(f"duplicate key {key[:100]!r} in an object")
            seen.add(key)
    return obj


def json_body() -> object:
    """The body as JSON, numbers exact (never through a float), NaN/Infinity and objects with a
    key given twice refused."""
    raw = request.get_data(cache=True)  # raises 413 past MAX_CONTENT_LENGTH (given a Content-Length)
    limit = request.max_content_length
    if request.content_length is None and limit is not None and len(raw) >= limit:
        # A chunked body is cut at the limit by Werkzeug, silently: what was read may even parse.
        # Reaching the limit means the body may be longer than allowed: refuse it.
        _drain(limit)
        raise RequestTooLarge(f"request body is larger than {limit} bytes")
    try:
        return json.loads(raw, parse_float=Decimal, parse_constant=_reject_constant,
                          object_pairs_hook=_unique_keys)
    except DuplicateKey as exc:
        raise MalformedRequest("request body is ambiguous: " + str(exc), {"reason": str(exc)}) from None
    except (ValueError, RecursionError) as exc:
        raise MalformedRequest("request body is not valid JSON", {"reason": str(exc)[:200]}) from None


def _drain(most_bytes: int) -> None:
    """Read (and drop) what is left of an over-long chunked body, up to a bound, so the 413 reaches
    the client: closing a socket with unread input makes the kernel reset the connection, and the
    client may lose the answer. A body longer than the bound still gets the reset."""
    stream = request.environ.get("wsgi.input")
    left = most_bytes
    try:
        while left > 0:
            chunk = stream.read(min(65536, left))
            if not chunk:
                return
            left -= len(chunk)
    except Exception:  # the client went away: nothing left to answer
        return


def parse_body(model: type[M]) -> M:
    data = json_body()
    if not isinstance(data, dict):
        raise MalformedRequest("request body must be a JSON object")
    return validate(model, data)


def parse_optional_body(model: type[M]) -> M:
    """For endpoints whose every field is optional: no body at all means `{}`."""
    if not request.get_data(cache=True) and not request.content_length:
        return validate(model, {})
    return parse_body(model)


def validate(model: type[M], data: dict) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ValidationFailed("request body is invalid", [
            {"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"], "type": e["type"]}
            for e in exc.errors(include_url=False, include_input=False, include_context=False)
        ]) from None


def encode_cursor(after_id: int | None) -> str | None:
    if after_id is None:
        return None
    return base64.urlsafe_b64encode(f"v1:{after_id}".encode()).decode().rstrip("=")


def page_args() -> tuple[int | None, int]:
    """(id to continue after, page size) from `cursor` and `limit`."""
    limit = int_arg("limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    cursor = request.args.get("cursor")
    if not cursor:
        return None, limit
    try:
        version, _, value = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode().partition(":")
        if version != "v1" or not (value.isascii() and value.isdigit()) or len(value) > 19:
            raise ValueError
        if int(value) > MAX_ID:
            raise ValueError
        return int(value), limit
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise MalformedRequest("cursor is not one this API issued", {"parameter": "cursor"}) from None


def int_arg(name: str, default: int | None, low: int, high: int) -> int | None:
    raw = request.args.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19 or not low <= int(raw) <= high:
        raise MalformedRequest(f"{name} must be an integer from {low} to {high}", {"parameter": name})
    return int(raw)
