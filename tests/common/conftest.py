"""Fixtures of the tests of common/."""
from __future__ import annotations

import pytest
from sqlalchemy import create_engine


@pytest.fixture(scope="module")
def scratch_rows(settings):
    """A table of its own for the tests of common.db, which insert, update and delete rows to see
    what commits (the ledger's tables refuse deletes: migrations 0005 and 0007)."""
    engine = create_engine(settings.database_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE scratch_rows (id bigserial PRIMARY KEY,"
                             " atomic boolean NOT NULL, total integer NOT NULL)")
    yield "scratch_rows"
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE scratch_rows")
    engine.dispose()
