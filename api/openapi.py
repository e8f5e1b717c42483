"""The OpenAPI 3.1 document (`GET /openapi.json`) and its interactive page (`GET /docs`).

Schemas come from the pydantic models in api/schemas.py, the very models that validate request
bodies (validation mode for requests, serialization mode for responses); the table ROUTES below
says which model each route takes and answers. A test checks that every Flask route is in the
table, and schemathesis checks the live API against the document.

Both endpoints need the API key like every other but /health (spec section 4). /docs therefore
embeds the document in the page (a browser cannot send a Bearer header when following a link);
Swagger UI's "Authorize" button takes the key for "Try it out".
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any

from flask import Blueprint, Response
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from api import event_schemas, parsing, schemas
from api.routes.idempotency import MAX_KEY_LENGTH
from api.schemas import MAX_ID
from common.ledger.events import EVENT_TYPES

bp = Blueprint("openapi", __name__)

REF = "#/components/schemas/{model}"

ERRORS = {
    400: "Malformed request: body is not JSON or not an object, or a query parameter is invalid",
    401: "Missing or unknown API key",
    404: "No such resource",
    409: "Idempotency-Key reused with a different body (idempotency_conflict), or the payment is not "
         "in a state that allows this (invalid_state; `details.status` is its status)",
    413: "Request body larger than the limit",
    422: "Body is well-formed but invalid (validation_error, invalid_amount, unknown_account, "
         "unknown_currency, same_account, currency_mismatch, refund_exceeds_payment); `details` "
         "says which fields",
    429: "Too many payments are waiting to be applied, and no room came within the admission wait "
         "(backlog_full; `details` has `pending` and `max_pending`); retry after the "
         "`Retry-After` seconds, with the same Idempotency-Key",
    503: "The database (or, for /ready, a dependency) is unreachable; retry later",
}


@dataclass(frozen=True)
class Param:
    name: str
    schema: dict[str, Any]
    description: str
    location: str = "query"
    required: bool = False


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    operation_id: str
    summary: str
    tag: str
    responses: dict[int, type[BaseModel] | None]  # success statuses and their models
    body: type[BaseModel] | None = None
    params: tuple[Param, ...] = ()
    errors: tuple[int, ...] = (401, 503)
    idempotent: bool = False  # takes Idempotency-Key
    public: bool = False
    media_type: str = "application/json"
    description: str = ""
    headers: dict[int, dict[str, str]] = field(default_factory=dict)
    body_required: bool = True


ID = {"type": "integer", "minimum": 1, "maximum": MAX_ID}
PAGE = (
    Param("limit", {"type": "integer", "minimum": 1, "maximum": parsing.MAX_LIMIT,
                    "default": parsing.DEFAULT_LIMIT}, "Page size"),
    Param("cursor", {"type": "string"},
          "Opaque cursor: the `next_cursor` of the previous page (null on the last page)"),
)
WRITE_ERRORS = (400, 401, 409, 413, 422, 503)
PAYMENT_WRITE_ERRORS = (400, 401, 409, 413, 422, 429, 503)
LOCATION = {"Location": "Where to read the created resource"}


def _id(name: str, what: str) -> Param:
    return Param(name, ID, f"The {what}'s id", location="path", required=True)


ROUTES: tuple[Route, ...] = (
    Route("get", "/health", "health", "Liveness (no API key needed)", "meta", {200: schemas.Health},
          errors=(), public=True),
    Route("get", "/ready", "ready", "Readiness: 200 when the database and the broker answer, "
          "else 503 naming the unreachable ones in `details.checks`", "meta", {200: schemas.Ready}),
    Route("get", "/currencies", "listCurrencies", "The currencies", "meta", {200: schemas.CurrencyList}),
    Route("get", "/metrics", "metrics", "Prometheus metrics (text exposition format)", "meta",
          {200: None}, errors=(401,), media_type="text/plain"),
    Route("get", "/openapi.json", "openapi", "This document", "meta", {200: None}, errors=(401,)),
    Route("get", "/docs", "docs", "Interactive documentation (Swagger UI)", "meta", {200: None},
          errors=(401,), media_type="text/html"),

    Route("post", "/accounts", "createAccount", "Open an account, with an opening balance", "accounts",
          {201: schemas.Account}, body=schemas.AccountCreate, errors=WRITE_ERRORS, idempotent=True,
          headers={201: LOCATION},
          description="Give `currency_id` or `currency` (a code such as USD)."),
    Route("get", "/accounts", "listAccounts", "Accounts, newest first", "accounts",
          {200: schemas.AccountList}, errors=(400, 401, 503),
          params=(*PAGE, Param("currency", {"type": "string"}, "Only accounts in this currency (code)"))),
    Route("get", "/accounts/{account_id}", "getAccount", "One account", "accounts",
          {200: schemas.Account}, params=(_id("account_id", "account"),), errors=(401, 404, 503)),
    Route("get", "/account/{account_id}", "getAccountAlias", "One account (alias of /accounts/{id})",
          "accounts", {200: schemas.Account}, params=(_id("account_id", "account"),),
          errors=(401, 404, 503)),
    Route("post", "/accounts/{account_id}/freeze", "freezeAccount",
          "Freeze: payments touching the account fail with account_frozen", "accounts",
          {200: schemas.Account}, params=(_id("account_id", "account"),), errors=(401, 404, 503)),
    Route("post", "/accounts/{account_id}/unfreeze", "unfreezeAccount", "Unfreeze", "accounts",
          {200: schemas.Account}, params=(_id("account_id", "account"),), errors=(401, 404, 503)),
    Route("get", "/accounts/{account_id}/entries", "listEntries",
          "The account's ledger entries, newest first", "accounts", {200: schemas.EntryList},
          params=(_id("account_id", "account"), *PAGE), errors=(400, 401, 404, 503)),

    Route("post", "/payments", "createPayment", "Accept a payment; it is applied asynchronously",
          "payments", {202: schemas.Payment}, body=schemas.PaymentCreate, errors=PAYMENT_WRITE_ERRORS,
          idempotent=True, headers={202: LOCATION},
          description="Answers 202 with status `pending`; poll GET /payments/{id} until it is "
                      "`completed` or `failed`."),
    Route("get", "/payments/{payment_id}", "getPayment", "One payment and its status", "payments",
          {200: schemas.Payment}, params=(_id("payment_id", "payment"),), errors=(401, 404, 503)),
    Route("get", "/payments", "listPayments", "Payments, newest first", "payments",
          {200: schemas.PaymentList}, errors=(400, 401, 503), params=(
              *PAGE,
              Param("status", {"type": "string", "enum": list(schemas.STATUSES)}, "Filter"),
              Param("account_id", ID, "Payments where this account is buyer or seller"),
              Param("batch_id", ID, "Payments of this batch"),
              Param("refund_of", ID, "The refunds of this payment"),
              Param("reference", {"type": "string", "minLength": 1, "maxLength": 128,
                                  "pattern": "^[ -~]+$"}, "Payments with this reference"))),
    Route("post", "/payments/{payment_id}/capture", "capturePayment",
          "Capture an authorized payment, whole or in part", "payments", {200: schemas.Payment},
          body=schemas.CaptureCreate, params=(_id("payment_id", "payment"),), idempotent=True,
          errors=(400, 401, 404, 409, 413, 422, 503), body_required=False,
          description="Moves the captured amount (default: all of it) from buyer to seller and "
                      "releases the rest of the hold; answers 200 with the payment `completed`. "
                      "409 invalid_state unless it is `authorized` and not past "
                      "`authorization_expires_at`; 422 invalid_amount above the authorized amount."),
    Route("post", "/payments/{payment_id}/cancel", "cancelPayment",
          "Cancel an authorized payment: release its hold", "payments", {200: schemas.Payment},
          body=schemas.CancelCreate, params=(_id("payment_id", "payment"),), idempotent=True,
          errors=(400, 401, 404, 409, 413, 422, 503), body_required=False,
          description="Answers 200 with the payment `canceled` (`cancellation_reason: requested`); "
                      "409 invalid_state unless it is `authorized` and not expired."),
    Route("post", "/payments/{payment_id}/refunds", "refundPayment",
          "Refund a completed payment, whole or in part", "payments", {202: schemas.Payment},
          body=schemas.RefundCreate, params=(_id("payment_id", "payment"),), idempotent=True,
          errors=PAYMENT_WRITE_ERRORS + (404,), body_required=False, headers={202: LOCATION},
          description="Accepts a new payment from the seller back to the buyer, `refund_of` the "
                      "original, applied like any payment (it fails with insufficient_funds when "
                      "the seller's available balance is short). The refunds that have not failed "
                      "never exceed the captured amount: 422 refund_exceeds_payment. 409 "
                      "invalid_state unless the original is `completed`; a refund of a refund is "
                      "422 validation_error."),
    Route("post", "/payments/batch", "createBatch", "Accept many payments in one request",
          "payments", {202: schemas.BatchAccepted}, body=schemas.BatchCreate,
          errors=PAYMENT_WRITE_ERRORS,
          idempotent=True, headers={202: LOCATION},
          description="Every item is validated first; if any is invalid none is recorded (422 "
                      "with the index of each bad item). `atomic: true`: all complete or all fail "
                      "(`batch_failed`)."),
    Route("get", "/batches/{batch_id}", "getBatch", "A batch's progress", "payments",
          {200: schemas.Batch}, params=(_id("batch_id", "batch"),), errors=(401, 404, 503)),

    Route("get", "/events", "listEvents", "Events, oldest first: follow next_cursor", "events",
          {200: event_schemas.EventList}, errors=(400, 401, 503), params=(
              Param("limit", PAGE[0].schema, "Page size"),
              Param("cursor", {"type": "string"}, "Where to resume: the `next_cursor` of the "
                    "previous page (never null here); none: from the first event"),
              Param("type", {"type": "string", "enum": list(EVENT_TYPES)}, "Only events of this type")),
          description="Every status change of a payment writes an event in the same transaction "
                      "(payment.authorized, payment.completed, payment.failed, payment.canceled), "
                      "and a batch with no pending payment left writes batch.finished. The order "
                      "is the order in which events became safe to read, not the id order: a "
                      "consumer that follows `next_cursor` sees every event exactly once."),
    Route("get", "/events/{event_id}", "getEvent", "One event", "events", {200: event_schemas.Event},
          params=(_id("event_id", "event"),), errors=(401, 404, 503)),
    Route("post", "/webhook_endpoints", "createWebhookEndpoint",
          "Register a URL to receive events, signed", "webhooks",
          {201: event_schemas.WebhookEndpointCreated}, body=event_schemas.WebhookEndpointCreate,
          errors=(400, 401, 413, 422, 503), headers={201: LOCATION},
          description="Answers the `secret` (whsec_...) once. Each event is POSTed with headers "
                      "`Wallet-Event-Id` and `Wallet-Signature: t=<unix seconds>,v1=<hex "
                      "HMAC-SHA256(secret, \"<t>.<raw body>\")>`; a 2xx within 10 s is delivered, "
                      "anything else (3xx included: redirects are not followed) is retried with "
                      "exponential backoff, then given up. At least once: de-duplicate on the event "
                      "id. 422 when the URL is not http(s) or its host does not resolve to public "
                      "addresses."),
    Route("get", "/webhook_endpoints", "listWebhookEndpoints", "Webhook endpoints, newest first",
          "webhooks", {200: event_schemas.WebhookEndpointList}, params=PAGE, errors=(400, 401, 503)),
    Route("get", "/webhook_endpoints/{endpoint_id}", "getWebhookEndpoint", "One webhook endpoint "
          "(without its secret)", "webhooks", {200: event_schemas.WebhookEndpoint},
          params=(_id("endpoint_id", "webhook endpoint"),), errors=(401, 404, 503)),
    Route("delete", "/webhook_endpoints/{endpoint_id}", "deleteWebhookEndpoint",
          "Delete a webhook endpoint: it receives nothing more", "webhooks",
          {200: event_schemas.WebhookEndpointDeleted}, params=(_id("endpoint_id", "webhook endpoint"),),
          errors=(401, 404, 503)),
    Route("get", "/webhook_endpoints/{endpoint_id}/deliveries", "listWebhookDeliveries",
          "An endpoint's deliveries, newest first: attempts, last status or error, next attempt",
          "webhooks", {200: event_schemas.WebhookDeliveryList}, errors=(400, 401, 404, 503), params=(
              _id("endpoint_id", "webhook endpoint"), *PAGE,
              Param("status", {"type": "string", "enum": ["pending", "delivered", "failed", "canceled"]},
                    "Filter"))),
)

DESCRIPTION = """\
Queue-backed payment processor. A payment is recorded as `pending` and answered with `202`; a
worker applies it moments later; poll `GET /payments/{id}` until it is no longer `pending`.

* **Statuses**: `pending` → `completed` | `failed` | `authorized`; `authorized` → `completed`
  (captured) | `canceled` (`cancellation_reason`: `requested` or `expired`).
* **Holds**: `capture_method: "manual"` makes the worker reserve the amount (the buyer's `held`
  grows, `available` shrinks) instead of moving it; capture (whole or part) or cancel it, or let it
  expire after `authorization_expires_in` seconds (default 7 days). Every payment needs the
  buyer's `available` balance (`balance - held`).
* **Refunds** are payments of their own, seller to buyer, with `refund_of`; the original shows
  `amount_refunded` (completed refunds). List them with `GET /payments?refund_of=<id>`.
* **Metadata and reference**: accounts and payments take `metadata` (up to 20 string values);
  payments take your own `reference` (not unique), filterable with `GET /payments?reference=`.

* **Events and webhooks**: every status change writes an event (`GET /events`, oldest first,
  resumable with `next_cursor`); registered webhook endpoints receive them signed
  (`Wallet-Signature: t=...,v1=<HMAC-SHA256>`), at least once: de-duplicate on the event id.

* **Authentication**: every endpoint but `/health` needs `Authorization: Bearer <API key>`.
* **Amounts** are exact decimals. Send them as JSON strings (`"500.1"`, recommended) or numbers
  (parsed exactly, never through a float); at most the currency's number of decimals, positive,
  below 10^18. Responses always carry amounts as strings without trailing zeros (`"499.9"`).
* **Errors** always have the shape `{"error": {"code", "message", "details"}}` (schema `Error`).
* **Idempotency**: the POST endpoints take an `Idempotency-Key` header (scoped to the API key):
  the same key and body answer the original resource and status again; the same key with another
  body answers 409.
* **Pagination**: lists are newest first; `limit` (1 to 1000, default 50) and `cursor` (the
  previous page's `next_cursor`, null on the last page).
* **Request ids**: send `X-Request-ID` (up to 128 characters of `A-Za-z0-9._:/+=@-`) or one is
  generated; it is returned in the `X-Request-ID` response header and appears in the API's and the
  worker's log lines.
* **Limits**: request bodies up to 1 MiB by default (413 above); batches up to 1000 payments.
* **Back-pressure**: while more than `WALLET_MAX_PENDING` (1500 by default) accepted payments
  wait to be applied, a payment POST waits for room (first come first admitted, up to 1 s by
  default), then answers 429 `backlog_full` with `Retry-After`; nothing is recorded. This bounds
  how long an accepted payment waits. A retry with the same Idempotency-Key is safe.
"""


def _parameter(p: Param) -> dict[str, Any]:
    return {"name": p.name, "in": p.location, "required": p.required, "schema": p.schema,
            "description": p.description}


IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key", "in": "header", "required": False,
    "description": "Makes the request safe to retry: the same key and body give the same answer",
    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_LENGTH, "pattern": "^[ -~]+$"},
}


@functools.cache
def document() -> dict[str, Any]:
    models: dict[tuple[type[BaseModel], str], None] = {(schemas.Error, "serialization"): None}
    for r in ROUTES:
        if r.body is not None:
            models[(r.body, "validation")] = None
        for model in r.responses.values():
            if model is not None:
                models[(model, "serialization")] = None
    refs, defs = models_json_schema(list(models), ref_template=REF)

    def ref(model, mode):
        return refs[(model, mode)]

    error_response = {"application/json": {"schema": ref(schemas.Error, "serialization")}}
    paths: dict[str, dict[str, Any]] = {}
    for r in ROUTES:
        responses: dict[str, Any] = {}
        for status, model in r.responses.items():
            if model is not None:
                content = {r.media_type: {"schema": ref(model, "serialization")}}
            elif r.media_type == "application/json":
                content = {r.media_type: {"schema": {"type": "object"}}}
            else:
                content = {r.media_type: {"schema": {"type": "string"}}}
            responses[str(status)] = {"description": "OK" if status == 200 else "Accepted" if status == 202
                                      else "Created", "content": content}
            if status in r.headers:
                responses[str(status)]["headers"] = {
                    name: {"description": text, "schema": {"type": "string"}}
                    for name, text in r.headers[status].items()}
        for status in r.errors:
            responses[str(status)] = {"description": ERRORS[status], "content": error_response}
        op: dict[str, Any] = {"operationId": r.operation_id, "summary": r.summary, "tags": [r.tag],
                              "responses": responses}
        if r.description:
            op["description"] = r.description
        params = [_parameter(p) for p in r.params]
        if r.idempotent:
            params.append(IDEMPOTENCY_KEY)
        if params:
            op["parameters"] = params
        if r.body is not None:
            op["requestBody"] = {"required": r.body_required, "content": {
                "application/json": {"schema": ref(r.body, "validation")}}}
        if r.public:
            op["security"] = []
        paths.setdefault(r.path, {})[r.method] = op

    return {
        "openapi": "3.1.0",
        "info": {"title": "Wallet service", "version": "1.0.0", "description": DESCRIPTION},
        "security": [{"bearerAuth": []}],
        "paths": paths,
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer",
                                               "description": "An API key from WALLET_API_KEYS or "
                                                              "`flask --app api wallet api-key create`"}},
        },
    }


@functools.cache
def _document_json() -> bytes:
    return json.dumps(document()).encode()


@bp.get("/openapi.json")
def openapi_json():
    return Response(_document_json(), content_type="application/json")


_DOCS = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Wallet service API</title>
  <link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5.17.14/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5.17.14/swagger-ui-bundle.js"></script>
  <script>
    // The document of /openapi.json, embedded: that URL needs the API key too, which a browser
    // does not send by itself. Use "Authorize" to enter the key for "Try it out".
    window.ui = SwaggerUIBundle({spec: %s, dom_id: "#swagger-ui", persistAuthorization: false});
  </script>
</body>
</html>
"""


@bp.get("/docs")
def docs():
    # "</" is escaped so no string in the document can close the script element.
    spec = _document_json().decode().replace("</", "<\\/")
    return Response(_DOCS % spec, content_type="text/html; charset=utf-8")
