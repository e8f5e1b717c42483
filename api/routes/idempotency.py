"""The Idempotency-Key header, turned into the domain's key (scoped to the caller's API key)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import g, request

from common.errors import MalformedRequest
from common.ledger import IdempotencyKey

MAX_KEY_LENGTH = 255


def idempotency_key(resource_type: str, canonical: Mapping[str, Any]) -> IdempotencyKey | None:
    raw = request.headers.get("Idempotency-Key")
    if raw is None:
        return None
    if not (1 <= len(raw) <= MAX_KEY_LENGTH and raw.isascii() and raw.isprintable()):
        raise MalformedRequest(f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable ASCII characters")
    return IdempotencyKey.for_request(g.client_scope, raw, resource_type, canonical)
