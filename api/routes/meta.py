"""Liveness, readiness and the currency list."""
from __future__ import annotations

from flask import Blueprint

from api.errors import error_response
from api.wallet import wallet

bp = Blueprint("meta", __name__)


@bp.get("/health")
def health():
    return {"status": "ok"}


@bp.get("/ready")
def ready():
    w = wallet()
    node = {}  # the PostgreSQL server this process reaches: with a cluster, which node, primary?
    checks = {"database": _check(lambda: node.update(w.db.server())),
              "broker": _check(lambda: _ping_broker(w))}
    down = [name for name, ok in checks.items() if not ok]
    if down:
        return error_response(503, "not_ready", f"unreachable: {', '.join(down)}", {"checks": checks})
    return {"status": "ready", "checks": checks, "database": node}


def _check(probe) -> bool:
    try:
        probe()
        return True
    except Exception:
        return False


def _ping_broker(w) -> None:
    with w.celery.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, timeout=2)


@bp.get("/currencies")
def currencies():
    return {"currencies": [
        {"id": c.id, "code": c.code, "name": c.name, "scale": c.scale}
        for c in wallet().currencies.by_id.values()
    ]}
