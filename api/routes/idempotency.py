"""The Idempotency-Key header, turned into the domain's key (scoped to the caller's API key)."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flask import g, request

from common.errors import MalformedRequest
from common.ledger import IdempotencyKey

MAX_KEY_LENGTH = 255


def idempotency_key(resource_type: str, canonical: Callable[[], Mapping[str, Any]]
                    ) -> IdempotencyKey | None:
    """`canonical` gives the request in a normal form (what "the same body" means); it is only
    called when the request carries a key."""
    raw = request.headers.get("Idempotency-Key")
    if raw is None:
        return None
    if not (1 <= len(raw) <= MAX_KEY_LENGTH and raw.isascii() and raw.isprintable()):
        raise MalformedRequest(f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable ASCII characters")
    return IdempotencyKey.for_request(g.client_scope, raw, resource_type, canonical())
