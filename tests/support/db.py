"""Direct database access for tests that set up or corrupt rows themselves."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from sqlalchemy.orm import Session


@contextlib.contextmanager
def committing(db) -> Iterator[Session]:
    """A transaction that commits at the end: for a test's own set-up and fault injection (the
    product's writes go through `Database.unit_of_work`)."""
    with Session(db.engine) as session, session.begin():
        yield session
