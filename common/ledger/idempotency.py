"""Idempotency-Key: a resource is created at most once per key and client."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from common.errors import IdempotencyConflict

@dataclass(frozen=True)
class IdempotencyKey:
    scope: str  # the API key's id: one client's keys never collide with another's
    key: str
    request_hash: str

    @classmethod
    def for_request(cls, scope: str, key: str, resource_type: str, request: Mapping[str, Any]):
        canonical = json.dumps([resource_type, request], sort_keys=True, default=str)
        return cls(scope, key, hashlib.sha256(canonical.encode()).hexdigest())


def idempotent(session: Session, key: IdempotencyKey | None, resource_type: str,
               create: Callable[[], Mapping[str, Any]],
               load: Callable[[int], Mapping[str, Any]]) -> tuple[Mapping[str, Any], bool]:
    """Create a resource at most once per key. Returns (resource, created now?).

    The key's primary key decides between concurrent first requests: the second INSERT waits for
    the first transaction and then sees its row. A request that fails rolls its key back with it.
    """
    if key is None:
        return create(), True
    params = {"scope": key.scope, "key": key.key}
    inserted = session.execute(text(
        "INSERT INTO idempotency_keys (scope, key, request_hash, resource_type)"
        " VALUES (:scope, :key, :hash, :type) ON CONFLICT DO NOTHING RETURNING 1"
    ), {**params, "hash": key.request_hash, "type": resource_type}).first()
    if inserted is None:
        row = session.execute(text(
            "SELECT request_hash, resource_type, resource_id FROM idempotency_keys"
            " WHERE scope = :scope AND key = :key"
        ), params).one()
        if row.request_hash != key.request_hash or row.resource_type != resource_type:
            raise IdempotencyConflict(
                "this Idempotency-Key was already used with a different request",
                {"idempotency_key": key.key})
        return load(row.resource_id), False
    resource = create()
    session.execute(text(
        "UPDATE idempotency_keys SET resource_id = :id WHERE scope = :scope AND key = :key"
    ), {**params, "id": resource["id"]})
    return resource, True


def replayed(session: Session, key: IdempotencyKey, resource_type: str) -> int | None:
    """The id of the resource this key already made, or None if the key is new (a read: nothing
    is written). Raises IdempotencyConflict if the key was used with another request."""
    row = session.execute(text(
        "SELECT request_hash, resource_type, resource_id FROM idempotency_keys"
        " WHERE scope = :scope AND key = :key"
    ), {"scope": key.scope, "key": key.key}).first()
    if row is None or row.resource_id is None:
        return None
    if row.request_hash != key.request_hash or row.resource_type != resource_type:
        raise IdempotencyConflict("this Idempotency-Key was already used with a different request",
                                  {"idempotency_key": key.key})
    return row.resource_id
