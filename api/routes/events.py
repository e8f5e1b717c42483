"""The event feed: GET /events (oldest first, resumable cursor, type filter), GET /events/<id>."""
from __future__ import annotations

import base64
import binascii

from flask import Blueprint, request

from api.parsing import DEFAULT_LIMIT, MAX_ID, MAX_LIMIT, int_arg
from api.wallet import wallet
from common.errors import MalformedRequest, NotFound
from common.ledger import events

bp = Blueprint("events", __name__)


def encode_position(p: events.Position) -> str:
    return base64.urlsafe_b64encode(f"e1:{p.txid}:{p.id}".encode()).decode().rstrip("=")


def decode_position(cursor: str) -> events.Position:
    try:
        version, txid, event_id = base64.urlsafe_b64decode(
            cursor + "=" * (-len(cursor) % 4)).decode().split(":")
        if version != "e1" or not all(v.isascii() and v.isdigit() and len(v) <= 19 for v in (txid, event_id)):
            raise ValueError
        if int(txid) > MAX_ID or int(event_id) > MAX_ID:
            raise ValueError
        return events.Position(int(txid), int(event_id))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise MalformedRequest("cursor is not one this API issued", {"parameter": "cursor"}) from None


@bp.get("/events")
def list_events():
    limit = int_arg("limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    cursor = request.args.get("cursor")
    after = decode_position(cursor) if cursor else events.START
    type_ = request.args.get("type")
    if type_ is not None and type_ not in events.EVENT_TYPES:
        raise MalformedRequest(f"type must be one of {', '.join(events.EVENT_TYPES)}", {"parameter": "type"})
    with wallet().db.read() as session:
        page = events.read_feed(session, after, limit, type_)
    return {"events": [events.event_document(r) for r in page.rows], "next_cursor": encode_position(page.next)}


@bp.get("/events/<id:event_id>")
def get_event(event_id: int):
    with wallet().db.read() as session:
        row = events.get_event(session, event_id)
    if row is None:
        raise NotFound(f"event {event_id} does not exist")
    return events.event_document(row)
