"""Request and response shapes. The request models validate bodies; all of them feed the
OpenAPI document, so what is documented is what is checked."""
from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_validator

MAX_ID = 2**63 - 1

Id = Annotated[StrictInt, Field(ge=1, le=MAX_ID)]
CurrencyId = Annotated[StrictInt, Field(ge=1, le=32767)]
AmountIn = Annotated[
    Union[StrictStr, StrictInt, Decimal],
    Field(description='A positive amount, as a JSON string ("500.1") or number (500.1), parsed '
                      "exactly; at most the currency's scale of decimals; below 10^18.",
          examples=["500.1"]),
]
AmountOut = Annotated[str, Field(description="Exact decimal as a string, without trailing zeros",
                                 examples=["499.9"])]
MetadataKey = Annotated[StrictStr, Field(min_length=1, max_length=40, pattern=r"^[A-Za-z0-9_.\-]+$")]
Metadata = Annotated[
    # No NUL: PostgreSQL's jsonb cannot hold \u0000 (it was a 500).
    dict[MetadataKey, Annotated[StrictStr, Field(max_length=500, pattern=r"^[^\x00]*$")]],
    Field(max_length=20, description="Your own key-value pairs: at most 20 keys of 1-40 characters "
                                     "of A-Za-z0-9_.-, each value a string of at most 500 characters; "
                                     "returned exactly as given", examples=[{"order_id": "A-1001"}]),
]
Reference = Annotated[StrictStr, Field(min_length=1, max_length=128, pattern=r"^[\x20-\x7e]+$",
                                       description="Your own identifier for the payment (1-128 "
                                                   "printable ASCII characters); not unique",
                                       examples=["order-1001"])]
MAX_AUTHORIZATION_SECONDS = 30 * 24 * 3600


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class AccountCreate(RequestModel):
    # No control characters: PostgreSQL text cannot hold NUL (it was a 500), and the rest have no
    # business in a display name.
    name: Annotated[StrictStr, Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")]
    currency_id: Optional[CurrencyId] = None
    currency: Optional[Annotated[StrictStr, Field(min_length=1, max_length=12, examples=["USD"])]] = None
    amount: AmountIn = Field(default="0", description="Opening balance (default 0)")
    metadata: Optional[Metadata] = None


class PaymentCreate(RequestModel):
    buyer_account_id: Id
    seller_account_id: Id
    amount: AmountIn
    currency_id: Optional[CurrencyId] = Field(
        default=None, description="If given, must be the accounts' currency")
    capture_method: Literal["automatic", "manual"] = Field(
        default="automatic", description="manual: the worker only reserves the amount (status "
                                         "`authorized`); capture or cancel it later")
    authorization_expires_in: Optional[Annotated[StrictInt, Field(ge=1, le=MAX_AUTHORIZATION_SECONDS)]] = Field(
        default=None, description="manual only: seconds from acceptance until an uncaptured hold is "
                                  "canceled (`cancellation_reason: expired`); default 604800 (7 days)")
    reference: Optional[Reference] = None
    metadata: Optional[Metadata] = None

    @model_validator(mode="after")
    def _expiry_needs_manual(self):
        if self.authorization_expires_in is not None and self.capture_method != "manual":
            raise ValueError("authorization_expires_in is for capture_method manual only")
        return self


class CaptureCreate(RequestModel):
    amount: Optional[AmountIn] = Field(default=None, description="At most the authorized amount; "
                                       "default all of it. The rest is released.")


class CancelCreate(RequestModel):
    pass


class RefundCreate(RequestModel):
    amount: Optional[AmountIn] = Field(default=None, description="Default: what is left to refund")
    reference: Optional[Reference] = None
    metadata: Optional[Metadata] = None


class BatchCreate(RequestModel):
    payments: Annotated[list[dict], Field(min_length=1, max_length=1000,
                                          description="Items shaped like POST /payments bodies")]
    atomic: bool = False


class Account(BaseModel):
    id: int
    name: str
    currency_id: int
    currency: str
    balance: AmountOut
    held: AmountOut = Field(description="Reserved by authorized payments of which it is the buyer")
    available: AmountOut = Field(description="balance - held: what new payments may spend")
    status: Literal["active", "frozen"]
    metadata: dict[str, str]
    created_at: datetime


STATUSES = ("pending", "completed", "failed", "authorized", "canceled")
FAILURE_CODES = ("insufficient_funds", "account_frozen", "batch_failed", "internal_error")


class Payment(BaseModel):
    id: int
    status: Literal[STATUSES]
    buyer_account_id: int
    seller_account_id: int
    amount: AmountOut
    currency_id: int
    currency: str
    failure_code: Optional[Literal[FAILURE_CODES]]
    batch_id: Optional[int]
    created_at: datetime
    completed_at: Optional[datetime] = Field(description="When it became completed, failed or canceled")
    capture_method: Literal["automatic", "manual"]
    amount_captured: Optional[AmountOut] = Field(description="What moved buyer to seller; set once completed")
    amount_refunded: AmountOut = Field(description="Sum of its completed refunds")
    refund_of: Optional[int] = Field(description="For a refund: the payment it refunds")
    authorization_expires_at: Optional[datetime] = Field(description="manual only: when an uncaptured hold is canceled")
    cancellation_reason: Optional[Literal["requested", "expired"]]
    reference: Optional[str]
    metadata: dict[str, str]


class Entry(BaseModel):
    id: int
    payment_id: Optional[int] = Field(description="null for the opening entry")
    account_id: int
    amount: Annotated[str, Field(description="Signed: negative for a debit")]
    balance_after: AmountOut
    created_at: datetime


class Currency(BaseModel):
    id: int
    code: str
    name: str
    scale: int


class AccountList(BaseModel):
    accounts: list[Account]
    next_cursor: Optional[str]


class PaymentList(BaseModel):
    payments: list[Payment]
    next_cursor: Optional[str]


class EntryList(BaseModel):
    entries: list[Entry]
    next_cursor: Optional[str]


class CurrencyList(BaseModel):
    currencies: list[Currency]


class ErrorBody(BaseModel):
    code: str
    message: str
    details: object = None


class Error(BaseModel):
    error: ErrorBody


# Response-only shapes of the remaining endpoints (documented in the OpenAPI document).

class BatchAccepted(BaseModel):
    batch_id: int
    atomic: bool
    payments: list[Payment]


class BatchCounts(BaseModel):
    pending: int
    completed: int
    failed: int
    authorized: int
    canceled: int


class Batch(BaseModel):
    id: int
    atomic: bool
    total: int
    counts: BatchCounts
    finished: bool
    created_at: datetime


class Health(BaseModel):
    status: Literal["ok"]


class ReadyDatabase(BaseModel):
    address: str | None = Field(description="inet_server_addr() of the server reached (null over a unix socket)")
    port: int | None
    primary: bool = Field(description="not pg_is_in_recovery(): the server takes writes")


class Ready(BaseModel):
    status: Literal["ready"]
    checks: dict[str, bool]
    database: ReadyDatabase
