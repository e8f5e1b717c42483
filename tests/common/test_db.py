"""common.db on a real PostgreSQL: prepared single statements and what happens when the connection dies."""
from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from common.db import Prepared, is_unavailable

ECHO = Prepared("wallet_test_echo", "SELECT CAST(:a AS bigint) + 1 AS n, CAST(:b AS text[]) AS b,"
                                    " CAST(:a AS bigint) AS again, pg_backend_pid() AS pid")


def test_prepared_numbers_named_parameters_once_each():
    assert ECHO.params == ["a", "b"]
    assert ECHO.types == ["bigint", "text[]"]
    assert "$1 + 1" in ECHO.prepare_sql and "$1 AS again" in ECHO.prepare_sql
    assert ECHO.args({"b": ["x"], "a": 5}) == [5, ["x"]]


def test_prepared_refuses_an_untyped_parameter():
    with pytest.raises(ValueError, match="CAST"):
        Prepared("wallet_test_bad", "SELECT :a + 1")


def test_execute_alone_returns_rows_and_keeps_nulls_typed(db):
    rows = db.execute_alone(ECHO, {"a": 41, "b": [None, "y"]})
    assert rows == [{"n": 42, "b": [None, "y"], "again": 41, "pid": rows[0]["pid"]}]


def test_execute_alone_commits_by_itself_and_leaves_the_pool_transactional(db):
    insert = Prepared("wallet_test_insert",
                      "INSERT INTO batches (atomic, total) VALUES (false, CAST(:total AS integer))"
                      " RETURNING id")
    batch_id = db.execute_alone(insert, {"total": 7})[0]["id"]
    with db.transaction() as s:  # another connection sees it: it was committed
        assert s.execute(text("SELECT total FROM batches WHERE id = :id"), {"id": batch_id}).scalar_one() == 7
    # Every pooled connection is back in transactional mode: a rolled-back transaction writes nothing.
    with pytest.raises(RuntimeError):
        with db.transaction() as s:
            s.execute(text("DELETE FROM batches WHERE id = :id"), {"id": batch_id})
            raise RuntimeError("roll back")
    with db.transaction() as s:
        assert s.execute(text("SELECT count(*) FROM batches WHERE id = :id"), {"id": batch_id}).scalar_one() == 1
        s.execute(text("DELETE FROM batches WHERE id = :id"), {"id": batch_id})


def test_a_refused_statement_raises_sqlalchemy_error_and_writes_nothing(db):
    bad = Prepared("wallet_test_negative",
                   "INSERT INTO batches (atomic, total) VALUES (false, CAST(:total AS integer))")
    with db.transaction() as s:
        before = s.execute(text("SELECT count(*) FROM batches")).scalar_one()
    with pytest.raises(DBAPIError) as caught:
        db.execute_alone(bad, {"total": None})  # NOT NULL
    assert not is_unavailable(caught.value)
    with db.transaction() as s:
        assert s.execute(text("SELECT count(*) FROM batches")).scalar_one() == before
    assert db.execute_alone(ECHO, {"a": 1, "b": []})[0]["n"] == 2  # the connection still works


def test_a_killed_connection_is_unavailable_once_then_reprepared(db, settings):
    from common.db import Database
    own = Database(settings, pool_size=1)  # one connection, so the next call must reconnect
    try:
        pid = own.execute_alone(ECHO, {"a": 1, "b": []})[0]["pid"]
        with db.transaction() as s:
            s.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        with pytest.raises(DBAPIError) as caught:
            own.execute_alone(ECHO, {"a": 1, "b": []})
        assert is_unavailable(caught.value)
        row = own.execute_alone(ECHO, {"a": 2, "b": []})[0]  # a new connection, prepared again
        assert row["n"] == 3 and row["pid"] != pid
    finally:
        own.dispose()
