"""The HTTP API: `gunicorn "api:create_app()"`, `flask --app api ...`."""
from __future__ import annotations

from flask import Flask

from api import metrics, openapi
from api.auth import require_api_key
from api.cli import wallet_cli
from api.errors import register_error_handlers
from api.routes import register_routes
from api.wallet import Wallet
from common.logging import configure_logging
from common.settings import Settings, get_settings


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or get_settings()
    configure_logging(settings)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False
    app.extensions["wallet"] = Wallet(settings)
    metrics.install(app, settings)  # first: request id, access log and metrics see every request
    app.before_request(require_api_key)
    register_error_handlers(app)
    register_routes(app)
    app.register_blueprint(metrics.bp)
    app.register_blueprint(openapi.bp)
    app.cli.add_command(wallet_cli)
    return app
