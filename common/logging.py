"""Structured JSON logs, configured in one place for the API and the worker.

Every line is one JSON object on stderr: `{"timestamp", "level", "logger", "event", ...fields}`.
Any library's stdlib logging (Celery, SQLAlchemy, ...) goes through the same formatter, so an
operator's log pipeline sees only JSON. The request id of the request (API) or of the payment
(worker) is bound in a context variable and added to every line logged while it is bound.

API keys are never logged: nothing logs the Authorization header, and a last processor masks
anything shaped like `Bearer <token>` that might slip into a message anyway.
"""
from __future__ import annotations

import contextvars
import logging
import re
import sys
import uuid

import structlog

from common.settings import Settings

REQUEST_ID_HEADER = "X-Request-ID"
MAX_REQUEST_ID_LENGTH = 128
_REQUEST_ID_OK = re.compile(r"[A-Za-z0-9._:/+=@-]{1,%d}" % MAX_REQUEST_ID_LENGTH)
_BEARER = re.compile(r"(?i)(bearer\s+)\S+")

# The request id in scope: set by the API per request, by the worker per payment it logs.
request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

_configured_level: str | None = None


def new_request_id() -> str:
    return uuid.uuid4().hex


def accept_request_id(raw: str | None) -> str:
    """A client's X-Request-ID if it is a sane token (else a fresh one): it ends up in log lines
    and a response header, so nothing with spaces, quotes or control characters gets through."""
    if raw and _REQUEST_ID_OK.fullmatch(raw):
        return raw
    return new_request_id()


def current_request_id() -> str | None:
    return request_id_var.get()


def _add_request_id(_, __, event_dict):
    if "request_id" not in event_dict:
        rid = request_id_var.get()
        if rid is not None:
            event_dict["request_id"] = rid
    return event_dict


def _mask_secrets(_, __, event_dict):
    # `message` is the same text as `event`, set on the record when another handler formatted it.
    event_dict.pop("message", None)
    event = event_dict.get("event")
    if isinstance(event, str) and "earer" in event:
        event_dict["event"] = _BEARER.sub(r"\1[redacted]", event)
    return event_dict


def _processors():
    return [
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_request_id,
    ]


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (test runners swap it)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def configure_logging(settings: Settings) -> None:
    """Route all logging (stdlib and structlog) to one JSON handler on stderr. Idempotent."""
    global _configured_level
    level = settings.log_level.upper()
    if _configured_level == level:
        return
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *_processors()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            _mask_secrets,
            structlog.processors.JSONRenderer(),
        ],
    )
    handler = _StderrHandler()
    handler.setFormatter(formatter)
    handler.set_name("wallet-json")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "wallet-json"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Celery's own loggers otherwise carry handlers of their own (plain text).
    for name in ("celery", "celery.task", "celery.worker", "celery.app.trace"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
    structlog.configure(
        processors=[*_processors(), structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    _configured_level = level


def get_logger(name: str):
    return structlog.get_logger(name)
