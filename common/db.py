"""Engine and the one write boundary.

`Database.unit_of_work(work)` is the only way a write commits, in the API as in the workers:
`work(session)` runs in a transaction that commits when it returns, and runs again from scratch
after a deadlock (40P01) or a serialization failure (40001). Callers pass domain functions
(common.ledger) and never commit themselves. Its one special case, `unit_of_work(statement,
params)` with a `Prepared` statement, is a unit of work that is a single statement: run alone
in autocommit (one round trip, no BEGIN/COMMIT), retried the same way.

`Database.read()` is a plain read transaction (never committed: what it would write is rolled
back) for reads, which need no retry.
"""
from __future__ import annotations

import contextlib
import logging
import random
import re
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import psycopg2
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine, Result
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from common.settings import Settings

T = TypeVar("T")

# SQLSTATEs that mean "the same transaction may well succeed if run again".
RETRYABLE_SQLSTATES = {"40001", "40P01"}  # serialization_failure, deadlock_detected
# The server we are connected to no longer takes writes: a primary demoted to a replica
# (read_only_sql_transaction). Like a disconnect: drop the connection and find the new primary
# (the URL's target_session_attrs=read-write is checked only when a connection opens).
DEMOTED_SQLSTATES = {"25006"}
RETRY_ATTEMPTS = 5

log = logging.getLogger("wallet.db")


def is_retryable(exc: BaseException) -> bool:
    orig = getattr(exc, "orig", None)
    return isinstance(exc, DBAPIError) and getattr(orig, "pgcode", None) in RETRYABLE_SQLSTATES


def is_unavailable(exc: BaseException) -> bool:
    """The database could not be reached (as opposed to refusing what we asked), or the server
    reached is no longer the primary."""
    if isinstance(exc, OperationalError) and not is_retryable(exc):
        return True
    if isinstance(exc, DBAPIError) and getattr(exc.orig, "pgcode", None) in DEMOTED_SQLSTATES:
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def _demoted(exc: BaseException) -> bool:
    return getattr(exc, "pgcode", None) in DEMOTED_SQLSTATES


class Prepared:
    """A statement PostgreSQL parses and plans once per connection (PREPARE), then runs by name
    (EXECUTE). Written with SQLAlchemy-style `:name` parameters, each inside a
    `CAST(:name AS type)`: the cast gives the parameter its type, so no value is ever guessed at.
    """

    _PARAM = re.compile(r"CAST\(:(\w+) AS ([\w\[\] ]+)\)")

    def __init__(self, name: str, sql: str):
        self.name = name
        self.params: list[str] = []
        self.types: list[str] = []

        def number(match: re.Match) -> str:
            param, type_ = match.group(1), match.group(2)
            if param not in self.params:
                self.params.append(param)
                self.types.append(type_)
            return f"${self.params.index(param) + 1}"

        body = self._PARAM.sub(number, sql)
        if re.search(r"(?<![:\w]):\w", body):
            raise ValueError(f"{name}: every parameter must be inside CAST(:name AS type)")
        self.prepare_sql = f"PREPARE {name} ({', '.join(self.types)}) AS {body}"
        # psycopg2 fills the %s client-side; the casts keep a NULL or an array of NULLs typed.
        self.execute_sql = f"EXECUTE {name} ({', '.join(f'CAST(%s AS {t})' for t in self.types)})"
        self._execute = text(f"EXECUTE {name} ("
                             + ", ".join(f"CAST(:{p} AS {t})" for p, t in zip(self.params, self.types)) + ")")

    def args(self, params: Mapping[str, Any]) -> list[Any]:
        return [params[p] for p in self.params]

    def run(self, session: Session, params: Mapping[str, Any]) -> Result:
        """EXECUTE it in the session's transaction, PREPAREd on the session's connection the
        first time. A prepared statement outlives a rollback and lives as long as the connection,
        whose `info` (emptied on reconnect) remembers it. Planned under the settings of the
        transaction that first runs it (generic plan: plan_cache_mode, in `Database`)."""
        connection = session.connection()
        prepared = connection.connection.info.setdefault(_PREPARED, set())
        if self.name not in prepared:
            connection.exec_driver_sql(self.prepare_sql)
            prepared.add(self.name)
        return session.execute(self._execute, params)


_PREPARED = "wallet_prepared"  # connection.info key: names PREPAREd on that connection


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
                # plan_cache_mode: a Prepared statement is planned once, not per EXECUTE. Left
                # to choose, PostgreSQL kept re-planning the payment INSERT (its generic plan,
                # with arrays for parameters, is estimated dearer than it is): 0.23 ms of
                # planning per payment, against 0.02 ms for the generic plan, which is the same
                # index lookups. Only PREPAREd statements are affected: the payment INSERT, alone
                # or in a batch's transaction (common.ledger.accepting); nothing else is prepared.
                "options": f"-c statement_timeout={settings.db_statement_timeout_ms}"
                           " -c lock_timeout=10000 -c plan_cache_mode=force_generic_plan",
                "application_name": "wallet",
            },
        )
        # A demoted server counts as a disconnect: SQLAlchemy then invalidates the connection and
        # the whole pool (every connection opened before it goes to the same, old, primary).
        event.listen(self.engine, "handle_error", _demoted_is_disconnect)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Session]:
        with self._sessions() as session, session.begin():
            yield session

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        """A read transaction. It is rolled back at the end, so nothing written in it persists:
        writes go through `unit_of_work`."""
        with self._sessions() as session:
            session.begin()
            try:
                yield session
            finally:
                session.rollback()

    def unit_of_work(self, work: Callable[[Session], T] | Prepared,
                     params: Mapping[str, Any] | None = None, *, attempts: int = RETRY_ATTEMPTS) -> T:
        """Run `work(session)` in one transaction and commit it; run it again from scratch after a
        deadlock or a serialization failure (so `work` must have no effect outside the database),
        up to `attempts` times, with a short random backoff. Any other error rolls back and is
        raised.

        The special case: `work` a `Prepared` statement and `params` its parameters. The unit of
        work is then that one statement, run in autocommit (PostgreSQL makes it its own
        transaction, all of it or nothing) as a server-side prepared statement: one round trip
        instead of three, on the path every single payment takes. It returns the rows as dicts,
        and is retried like any other unit of work."""
        if isinstance(work, Prepared):
            statement = work
            call = lambda: self._execute_alone(statement, params or {})  # noqa: E731
        else:
            def call():
                with self._transaction() as session:
                    return work(session)
        for attempt in range(1, attempts + 1):
            try:
                return call()
            except DBAPIError as exc:
                if not is_retryable(exc) or attempt == attempts:
                    raise
                log.info("unit of work retried after %s (attempt %d of %d)",
                         exc.orig.pgcode, attempt, attempts)
                time.sleep(random.uniform(0, 0.01 * 2 ** attempt))
        raise AssertionError("unreachable")

    def _execute_alone(self, statement: Prepared, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        """One statement in autocommit, prepared once per connection. Errors are raised as
        SQLAlchemy's, like everywhere else."""
        conn = self.engine.raw_connection()
        dbapi = conn.dbapi_connection
        cursor = None
        try:
            dbapi.autocommit = True
            cursor = dbapi.cursor()
            prepared = conn.info.setdefault(_PREPARED, set())  # cleared on reconnect
            if statement.name not in prepared:
                cursor.execute(statement.prepare_sql)
                prepared.add(statement.name)
            cursor.execute(statement.execute_sql, statement.args(params))
            names = [column.name for column in cursor.description]
            return [dict(zip(names, row)) for row in cursor.fetchall()]
        except psycopg2.Error as exc:
            disconnected = self.engine.dialect.is_disconnect(exc, dbapi, cursor) or _demoted(exc)
            if disconnected:
                # As SQLAlchemy does on a disconnect in its own paths: this connection is closed,
                # and the pool's older ones (opened to the same server) are replaced at checkout.
                self.engine.pool._invalidate(conn, exc)
            raise DBAPIError.instance(statement.execute_sql, params, exc, psycopg2.Error,
                                      connection_invalidated=disconnected) from exc
        finally:
            if not dbapi.closed:
                dbapi.autocommit = False
            conn.close()  # back to the pool

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def server(self) -> dict[str, Any]:
        """Which server this process's connections reach, and whether it is the primary."""
        with self.engine.connect() as conn:
            row = conn.execute(text("SELECT host(inet_server_addr()) AS address, inet_server_port() AS port,"
                                    " NOT pg_is_in_recovery() AS primary")).one()
        return dict(row._mapping)

    def dispose(self) -> None:
        self.engine.dispose()


def _demoted_is_disconnect(context) -> None:
    if _demoted(context.original_exception):
        context.is_disconnect = True
