"""Webhook endpoints: register (the secret is answered once), list, read, delete; deliveries."""
from __future__ import annotations

from flask import Blueprint, request

from api.event_schemas import WebhookEndpointCreate
from api.parsing import encode_cursor, page_args, parse_body
from api.wallet import wallet
from common import webhooks
from common.errors import MalformedRequest, ValidationFailed

bp = Blueprint("webhooks", __name__)

DELIVERY_STATUSES = ("pending", "delivered", "failed", "canceled")


def _time(value):
    return value.isoformat() if value is not None else None


def render_endpoint(row) -> dict:
    return {"id": row["id"], "url": row["url"], "events": list(row["events"]), "metadata": row["metadata"],
            "created_at": _time(row["created_at"])}


def render_delivery(row) -> dict:
    return {"id": row["id"], "event_id": row["event_id"], "event_type": row["event_type"],
            "status": row["status"], "attempts": row["attempts"],
            "last_http_status": row["last_http_status"], "last_error": row["last_error"],
            "delivered_at": _time(row["delivered_at"]), "next_attempt_at": _time(row["next_attempt_at"]),
            "created_at": _time(row["created_at"])}


def _page(rows, limit):
    if len(rows) > limit:
        return rows[:limit], encode_cursor(rows[limit - 1]["id"])
    return rows, None


@bp.post("/webhook_endpoints")
def create_endpoint():
    body = parse_body(WebhookEndpointCreate)
    w = wallet()
    try:
        row, secret = w.db.unit_of_work(lambda session: webhooks.create_endpoint(
            session, body.url, body.events, body.metadata, w.settings.webhook_allow_private))
    except webhooks.UnsafeUrl as exc:  # 422 validation_error, like any invalid field
        raise ValidationFailed(exc.message, exc.details) from None
    return ({**render_endpoint(row), "secret": secret}, 201,
            {"Location": f"/webhook_endpoints/{row['id']}"})


@bp.get("/webhook_endpoints")
def list_endpoints():
    after, limit = page_args()
    with wallet().db.read() as session:
        rows, cursor = _page(webhooks.list_endpoints(session, after, limit), limit)
    return {"webhook_endpoints": [render_endpoint(r) for r in rows], "next_cursor": cursor}


@bp.get("/webhook_endpoints/<id:endpoint_id>")
def get_endpoint(endpoint_id: int):
    with wallet().db.read() as session:
        return render_endpoint(webhooks.get_endpoint(session, endpoint_id))


@bp.delete("/webhook_endpoints/<id:endpoint_id>")
def delete_endpoint(endpoint_id: int):
    wallet().db.unit_of_work(lambda session: webhooks.delete_endpoint(session, endpoint_id))
    return {"id": endpoint_id, "deleted": True}


@bp.get("/webhook_endpoints/<id:endpoint_id>/deliveries")
def list_deliveries(endpoint_id: int):
    after, limit = page_args()
    status = request.args.get("status")
    if status is not None and status not in DELIVERY_STATUSES:
        raise MalformedRequest(f"status must be one of {', '.join(DELIVERY_STATUSES)}", {"parameter": "status"})
    with wallet().db.read() as session:
        rows, cursor = _page(webhooks.list_deliveries(session, endpoint_id, after, limit, status), limit)
    return {"deliveries": [render_delivery(r) for r in rows], "next_cursor": cursor}
