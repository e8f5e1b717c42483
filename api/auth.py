"""API keys: `Authorization: Bearer <key>` on every endpoint but /health.

Only SHA-256 hashes of keys are held, from WALLET_API_KEYS and from the api_keys table (keys made
with `flask --app api wallet api-key create`). Keys are never logged.
"""
from __future__ import annotations

import hmac
import time

from flask import current_app, g, request
from sqlalchemy import text

from api.wallet import wallet
from common.errors import Unauthorized
from common.settings import hash_api_key

PUBLIC_ENDPOINTS = {"meta.health"}
DB_KEYS_TTL_SECONDS = 5.0
DB_KEYS_MISS_REFRESH_SECONDS = 0.5


class KeyRing:
    """The accepted key hashes: the configured ones plus the database's, re-read every few seconds."""

    def __init__(self):
        self._db_hashes: frozenset[str] = frozenset()
        self._loaded_at: float | None = None  # never

    def accepts(self, key_hash: str) -> bool:
        # Configured keys first: they keep working (and /ready answers) while the database is down.
        if _matches(wallet().settings.api_key_hashes, key_hash):
            return True
        if _matches(self._database_hashes(DB_KEYS_TTL_SECONDS), key_hash):
            return True
        # A miss re-reads sooner, so a key just made with the CLI works at once; unknown keys
        # cost at most one query per DB_KEYS_MISS_REFRESH_SECONDS.
        return _matches(self._database_hashes(DB_KEYS_MISS_REFRESH_SECONDS), key_hash)

    def _database_hashes(self, max_age_s: float) -> frozenset[str]:
        if self._loaded_at is None or time.monotonic() - self._loaded_at > max_age_s:
            with wallet().db.read() as session:
                self._db_hashes = frozenset(session.execute(text(
                    "SELECT key_hash FROM api_keys WHERE revoked_at IS NULL")).scalars())
            self._loaded_at = time.monotonic()
        return self._db_hashes


def _matches(hashes: frozenset[str], key_hash: str) -> bool:
    # Compare against every hash, in constant time each, so timing says nothing of which matched.
    found = False
    for candidate in hashes:
        found |= hmac.compare_digest(candidate, key_hash)
    return found


def _keyring() -> KeyRing:
    # One per app (not per module): two apps in one process (tests, a CLI next to a server) on
    # different databases must not share, nor wait out, each other's cached database keys.
    return current_app.extensions.setdefault("wallet_keyring", KeyRing())


def require_api_key() -> None:
    if request.endpoint in PUBLIC_ENDPOINTS:
        return
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("send Authorization: Bearer <api key>")
    key_hash = hash_api_key(key.strip())
    if not _keyring().accepts(key_hash):
        raise Unauthorized("unknown API key")
    # Idempotency keys are scoped to the client's API key: clients never collide.
    g.client_scope = key_hash[:32]
