"""The SQLAlchemy models (common/models.py) and the Alembic migrations describe the same schema:
Alembic's autogenerate comparison of the migrated database against the models finds nothing to
change (tables, columns and their types and nullability, server defaults, indexes, unique and
foreign keys), and the CHECK constraints, which Alembic does not compare, are the same by name."""
from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from sqlalchemy import CheckConstraint, text

from common.models import metadata


def test_models_match_the_migrations(db):
    with db.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={
            "compare_type": True, "compare_server_default": True})
        diff = compare_metadata(context, metadata)
    assert diff == [], "\n".join(map(str, diff))


def test_check_constraints_match_the_migrations(db):
    in_models = {(table.name, c.name) for table in metadata.tables.values()
                 for c in table.constraints if isinstance(c, CheckConstraint)}
    with db.read() as s:
        in_database = set(s.execute(text(
            "SELECT c.conrelid::regclass::text, c.conname FROM pg_constraint c"
            " JOIN pg_namespace n ON n.oid = c.connamespace"
            " WHERE c.contype = 'c' AND n.nspname = 'public'")).all())
    assert in_models == in_database
