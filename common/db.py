"""Engine and the one transaction boundary.

`Database.transaction()` is the only place where a unit of work commits: callers put domain
functions (common.ledger) inside it and never commit themselves.
"""
from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from common.settings import Settings

T = TypeVar("T")

# SQLSTATEs that mean "the same transaction may well succeed if run again".
RETRYABLE_SQLSTATES = {"40001", "40P01"}  # serialization_failure, deadlock_detected


def is_retryable(exc: BaseException) -> bool:
    orig = getattr(exc, "orig", None)
    return isinstance(exc, DBAPIError) and getattr(orig, "pgcode", None) in RETRYABLE_SQLSTATES


def is_unavailable(exc: BaseException) -> bool:
    """The database could not be reached (as opposed to refusing what we asked)."""
    if isinstance(exc, OperationalError) and not is_retryable(exc):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


class Database:
    def __init__(self, settings: Settings, *, pool_size: int | None = None):
        self.engine: Engine = create_engine(
            settings.database_url,
            pool_size=pool_size or settings.db_pool_size,
            max_overflow=settings.db_max_overflow,
            # No pre-ping: it costs a round trip per checkout. A connection found dead raises a
            # disconnect error, which invalidates the pool (the request answers 503, the next
            # one reconnects).
            pool_pre_ping=False,
            pool_timeout=5,
            connect_args={
                "connect_timeout": 5,
                "options": f"-c statement_timeout={settings.db_statement_timeout_ms}"
                           " -c lock_timeout=10000",
                "application_name": "wallet",
            },
        )
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Session]:
        """One unit of work: commits on success, rolls back on any exception."""
        with self._sessions() as session, session.begin():
            yield session

    def run(self, work: Callable[[Session], T], *, attempts: int = 5) -> T:
        """Run `work` in a transaction, again from scratch after a deadlock or serialization
        failure (work must therefore have no side effects outside the database)."""
        for attempt in range(1, attempts + 1):
            try:
                with self.transaction() as session:
                    return work(session)
            except DBAPIError as exc:
                if not is_retryable(exc) or attempt == attempts:
                    raise
                time.sleep(random.uniform(0, 0.01 * 2 ** attempt))
        raise AssertionError("unreachable")

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()
