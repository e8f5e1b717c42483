"""Request and response shapes of events and webhook endpoints (SPEC section 10); they feed the
OpenAPI document like api/schemas.py's."""
from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, Field, StrictStr

from api.schemas import Batch, Metadata, Payment, RequestModel
from common.ledger.events import EVENT_TYPES
from common.webhooks import ALL_EVENTS, MAX_URL_LENGTH

EventType = Literal[EVENT_TYPES]


class EventData(BaseModel):
    object: Union[Payment, Batch] = Field(description="The payment (payment.*) or the batch "
                                                      "(batch.finished) as GET returned it after the change")


class Event(BaseModel):
    id: int
    type: EventType
    created_at: datetime
    data: EventData


class EventList(BaseModel):
    events: list[Event]
    next_cursor: str = Field(description="Where to resume (never null): pass it as `cursor`")


class WebhookEndpointCreate(RequestModel):
    url: Annotated[StrictStr, Field(min_length=1, max_length=MAX_URL_LENGTH,
                                    description="http or https; its host must resolve to public "
                                                "addresses only (unless WALLET_WEBHOOK_ALLOW_PRIVATE=1)",
                                    examples=["https://example.com/wallet-hooks"])]
    events: Optional[Annotated[list[Literal[(*EVENT_TYPES, ALL_EVENTS)]], Field(min_length=1, max_length=10)]] = Field(
        default=None, description=f'The event types to send; default (or ["{ALL_EVENTS}"]) all of them')
    metadata: Optional[Metadata] = None


class WebhookEndpoint(BaseModel):
    id: int
    url: str
    events: list[Literal[(*EVENT_TYPES, ALL_EVENTS)]]
    metadata: dict[str, str]
    created_at: datetime


class WebhookEndpointCreated(WebhookEndpoint):
    secret: str = Field(description="whsec_...: the key of the Wallet-Signature HMAC. Shown only "
                                    "in this answer: keep it")


class WebhookEndpointList(BaseModel):
    webhook_endpoints: list[WebhookEndpoint]
    next_cursor: Optional[str]


class WebhookEndpointDeleted(BaseModel):
    id: int
    deleted: Literal[True]


class WebhookDelivery(BaseModel):
    id: int
    event_id: int
    event_type: EventType
    status: Literal["pending", "delivered", "failed", "canceled"] = Field(
        description="pending (to be attempted at next_attempt_at), delivered, failed (given up "
                    "after WALLET_WEBHOOK_MAX_ATTEMPTS), canceled (endpoint deleted)")
    attempts: int
    last_http_status: Optional[int]
    last_error: Optional[str]
    delivered_at: Optional[datetime]
    next_attempt_at: Optional[datetime]
    created_at: datetime


class WebhookDeliveryList(BaseModel):
    deliveries: list[WebhookDelivery]
    next_cursor: Optional[str]
