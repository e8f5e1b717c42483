"""What never changes about a customer account, remembered by one process: that it exists as a
customer account, and its currency.

An account's currency and kind are fixed when it is opened and accounts are never deleted, so a
remembered fact can never go stale. Only what was found is remembered: an id not found is read
again next time (it may be opened in between). This serves the paths that read the accounts only
to explain a refusal: under overload, admission control must still answer an invalid request
with its 422 (SPEC section 12), and a client retrying refused batches every 100 ms would
otherwise cost PostgreSQL a read of up to 200 accounts per refusal, for nothing.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

from sqlalchemy import text
from sqlalchemy.orm import Session

from common import pgarray

DEFAULT_MAX_ACCOUNTS = 200_000  # ~20 MB per process at most; past it, nothing more is remembered

_READ = text("SELECT id, currency_id FROM accounts"
             " WHERE id = ANY(CAST(:ids AS bigint[])) AND kind = 'customer'")


class AccountDirectory:
    def __init__(self, max_accounts: int = DEFAULT_MAX_ACCOUNTS):
        self._max_accounts = max_accounts
        # Shared by the threads of a process without a lock: each entry is written once, with
        # its one true value, and a dict's single operations are atomic under the GIL.
        self._currency_ids: dict[int, int] = {}

    def currency_ids(self, session: Session, account_ids: Iterable[int]) -> Mapping[int, int]:
        """account id -> currency id, for those of `account_ids` that are customer accounts.
        Reads (in `session`) only the ids not remembered: none at all once they are known."""
        wanted = set(account_ids)
        known = self._currency_ids
        missing = sorted(i for i in wanted if i not in known)
        if missing:
            found = dict(session.execute(_READ, {"ids": pgarray.integers(missing)}).tuples().all())
            if len(known) + len(found) <= self._max_accounts:
                known.update(found)
            return {i: c for i in wanted if (c := known.get(i, found.get(i))) is not None}
        return {i: known[i] for i in wanted}
