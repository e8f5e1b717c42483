"""A server that stops taking writes (a primary demoted to a replica) is treated like a lost
connection: the error counts as unavailable (503, workers retry) and the pool reconnects, so a
multi-host URL with target_session_attrs=read-write finds the new primary (issue #13)."""
from __future__ import annotations

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from common.db import Database, Prepared, is_unavailable
from common.settings import sqlalchemy_url

pytestmark = pytest.mark.usefixtures("scratch_rows")

INSERT = Prepared("wallet_test_ro_insert",
                  "INSERT INTO scratch_rows (atomic, total) VALUES (false, CAST(:total AS integer))"
                  " RETURNING id, pg_backend_pid() AS pid")


def test_multi_host_url_reaches_psycopg2_as_libpq_lists():
    url = sqlalchemy_url("postgresql://u:pw@h1:5001,h2:5002,h3/wallet?target_session_attrs=read-write")
    assert url.startswith("postgresql+psycopg2://u:pw@/wallet?host=h1:5001&host=h2:5002&host=h3&")
    _, kwargs = create_engine(url).dialect.create_connect_args(make_url(url))
    assert kwargs == {"dbname": "wallet", "user": "u", "password": "pw", "host": "h1,h2,h3",
                      "port": "5001,5002,", "target_session_attrs": "read-write"}
    assert sqlalchemy_url("postgresql://u@h:5/db") == "postgresql+psycopg2://u@h:5/db"


def _read_only_pool(settings) -> Database:
    own = Database(settings, pool_size=1)
    with own.engine.connect() as conn:  # the pool's one connection now refuses writes
        conn.exec_driver_sql("SET SESSION default_transaction_read_only = on")
        conn.commit()
    return own


def test_read_only_error_in_a_transaction_is_unavailable_and_reconnects(settings):
    own = _read_only_pool(settings)
    try:
        with own.engine.connect() as conn:
            before = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        with pytest.raises(DBAPIError) as caught:
            own.unit_of_work(lambda s: s.execute(text("INSERT INTO scratch_rows (atomic, total) VALUES (false, 1)")))
        assert caught.value.orig.pgcode == "25006"
        assert caught.value.connection_invalidated and is_unavailable(caught.value)
        def write_again(s):  # a new connection: writable again
            assert s.execute(text("SELECT pg_backend_pid()")).scalar_one() != before
            batch = s.execute(text("INSERT INTO scratch_rows (atomic, total) VALUES (false, 1)"
                                   " RETURNING id")).scalar_one()
            s.execute(text("DELETE FROM scratch_rows WHERE id = :id"), {"id": batch})
        own.unit_of_work(write_again)
    finally:
        own.dispose()


def test_read_only_error_in_a_single_statement_is_unavailable_and_reconnects(settings):
    own = _read_only_pool(settings)
    try:
        with pytest.raises(DBAPIError) as caught:
            own.unit_of_work(INSERT, {"total": 3})
        assert caught.value.orig.pgcode == "25006" and is_unavailable(caught.value)
        row = own.unit_of_work(INSERT, {"total": 3})[0]
        own.unit_of_work(lambda s: s.execute(text("DELETE FROM scratch_rows WHERE id = :id"), {"id": row["id"]}))
    finally:
        own.dispose()


def test_server_reports_address_port_and_role(db):
    info = db.server()
    assert set(info) == {"address", "port", "primary"} and info["primary"] is True
