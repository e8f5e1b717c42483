from __future__ import annotations

from flask import Flask
from werkzeug.routing import BaseConverter, ValidationError

from api.routes import accounts, events, meta, payments, webhooks
from api.schemas import MAX_ID


class IdConverter(BaseConverter):
    """A database id in a URL: digits within bigint range; anything else is a 404, not a 500."""

    regex = r"[0-9]{1,19}"

    def to_python(self, value: str) -> int:
        number = int(value)
        if not 1 <= number <= MAX_ID:
            raise ValidationError()
        return number


def register_routes(app: Flask) -> None:
    app.url_map.converters["id"] = IdConverter
    app.url_map.strict_slashes = False
    for module in (meta, accounts, payments, events, webhooks):
        app.register_blueprint(module.bp)
