"""common.db on a real PostgreSQL: prepared single statements and what happens when the connection dies."""
from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from common.db import Prepared, is_unavailable

pytestmark = pytest.mark.usefixtures("scratch_rows")

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


def test_unit_of_work_alone_returns_rows_and_keeps_nulls_typed(db):
    rows = db.unit_of_work(ECHO, {"a": 41, "b": [None, "y"]})
    assert rows == [{"n": 42, "b": [None, "y"], "again": 41, "pid": rows[0]["pid"]}]


def test_unit_of_work_alone_commits_by_itself_and_leaves_the_pool_transactional(db):
    insert = Prepared("wallet_test_insert",
                      "INSERT INTO scratch_rows (atomic, total) VALUES (false, CAST(:total AS integer))"
                      " RETURNING id")
    batch_id = db.unit_of_work(insert, {"total": 7})[0]["id"]
    with db.read() as s:  # another connection sees it: it was committed
        assert s.execute(text("SELECT total FROM scratch_rows WHERE id = :id"), {"id": batch_id}).scalar_one() == 7
    # Every pooled connection is back in transactional mode: a rolled-back transaction writes nothing.
    with pytest.raises(RuntimeError):
        def delete(s):
            s.execute(text("DELETE FROM scratch_rows WHERE id = :id"), {"id": batch_id})
            raise RuntimeError("roll back")
        db.unit_of_work(delete)
    with db.read() as s:
        assert s.execute(text("SELECT count(*) FROM scratch_rows WHERE id = :id"), {"id": batch_id}).scalar_one() == 1
    db.unit_of_work(lambda s: s.execute(text("DELETE FROM scratch_rows WHERE id = :id"), {"id": batch_id}))


def test_run_in_a_session_prepares_once_per_connection_and_rolls_back_with_it(db):
    insert = Prepared("wallet_test_run_insert",
                      "INSERT INTO scratch_rows (atomic, total) VALUES (false, CAST(:total AS integer))"
                      " RETURNING id, (SELECT count(*) FROM pg_prepared_statements"
                      "                WHERE name = 'wallet_test_run_insert') AS prepared")
    with db.engine.connect() as conn:
        with Session(bind=conn) as s:
            first = insert.run(s, {"total": 3}).one()
            s.rollback()  # the row goes; the prepared statement stays with the connection
            second = insert.run(s, {"total": 4}).one()
            s.rollback()
            assert first.prepared == 1 and second.prepared == 1
            again = s.execute(text("SELECT count(*) FROM scratch_rows WHERE id = ANY(:ids)"),
                              {"ids": [first.id, second.id]}).scalar_one()
            assert again == 0
            assert s.execute(text("SELECT count(*) FROM pg_prepared_statements"
                                  " WHERE name = 'wallet_test_run_insert'")).scalar_one() == 1


def test_a_refused_statement_raises_sqlalchemy_error_and_writes_nothing(db):
    bad = Prepared("wallet_test_negative",
                   "INSERT INTO scratch_rows (atomic, total) VALUES (false, CAST(:total AS integer))")
    with db.read() as s:
        before = s.execute(text("SELECT count(*) FROM scratch_rows")).scalar_one()
    with pytest.raises(DBAPIError) as caught:
        db.unit_of_work(bad, {"total": None})  # NOT NULL
    assert not is_unavailable(caught.value)
    with db.read() as s:
        assert s.execute(text("SELECT count(*) FROM scratch_rows")).scalar_one() == before
    assert db.unit_of_work(ECHO, {"a": 1, "b": []})[0]["n"] == 2  # the connection still works


def test_a_killed_connection_is_unavailable_once_then_reprepared(db, settings):
    from common.db import Database
    own = Database(settings, pool_size=1)  # one connection, so the next call must reconnect
    try:
        pid = own.unit_of_work(ECHO, {"a": 1, "b": []})[0]["pid"]
        with db.read() as s:
            s.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        with pytest.raises(DBAPIError) as caught:
            own.unit_of_work(ECHO, {"a": 1, "b": []})
        assert is_unavailable(caught.value)
        row = own.unit_of_work(ECHO, {"a": 2, "b": []})[0]  # a new connection, prepared again
        assert row["n"] == 3 and row["pid"] != pid
    finally:
        own.dispose()


def test_unit_of_work_retries_a_real_deadlock(db):
    """Two real transactions lock two rows in opposite orders: PostgreSQL aborts one with
    deadlock_detected (40P01), and the unit of work runs that one again; both commit."""
    import threading

    ids = [db.unit_of_work(Prepared("wallet_test_batch_row",
                                    "INSERT INTO scratch_rows (atomic, total) VALUES (false, CAST(:t AS integer))"
                                    " RETURNING id"), {"t": 0})[0]["id"] for _ in range(2)]
    both_hold_one = threading.Barrier(2, timeout=10)
    attempts = {0: 0, 1: 0}
    results, errors = {}, []

    def work(n: int, s):
        attempts[n] += 1
        first, second = (ids[0], ids[1]) if n == 0 else (ids[1], ids[0])
        s.execute(text("UPDATE scratch_rows SET total = total + 1 WHERE id = :id"), {"id": first})
        if attempts[n] == 1:
            both_hold_one.wait()  # each holds its first row: the second UPDATEs close the cycle
        s.execute(text("UPDATE scratch_rows SET total = total + 1 WHERE id = :id"), {"id": second})
        return n

    def run(n: int):
        try:
            results[n] = db.unit_of_work(lambda s: work(n, s))
        except Exception as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert results == {0: 0, 1: 1}
    assert sorted(attempts.values()) == [1, 2]  # the deadlock's victim ran twice, the other once
    with db.read() as s:
        totals = s.execute(text("SELECT total FROM scratch_rows WHERE id = ANY(:ids)"), {"ids": ids}).scalars().all()
    assert totals == [2, 2]  # each transaction's two updates, once each


def test_unit_of_work_does_not_retry_other_errors(db):
    attempts = []

    def work(s):
        attempts.append(1)
        s.execute(text("INSERT INTO scratch_rows (atomic, total) VALUES (false, NULL)"))
    with pytest.raises(DBAPIError):
        db.unit_of_work(work)
    assert len(attempts) == 1
