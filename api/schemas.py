"""Request and response shapes. The request models validate bodies; all of them feed the
OpenAPI document, so what is documented is what is checked."""
from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

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


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class AccountCreate(RequestModel):
    # No control characters: PostgreSQL text cannot hold NUL (it was a 500), and the rest have no
    # business in a display name.
    name: Annotated[StrictStr, Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")]
    currency_id: Optional[CurrencyId] = None
    currency: Optional[Annotated[StrictStr, Field(min_length=1, max_length=12, examples=["USD"])]] = None
    amount: AmountIn = Field(default="0", description="Opening balance (default 0)")


class PaymentCreate(RequestModel):
    buyer_account_id: Id
    seller_account_id: Id
    amount: AmountIn
    currency_id: Optional[CurrencyId] = Field(
        default=None, description="If given, must be the accounts' currency")


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
    status: Literal["active", "frozen"]
    created_at: datetime


class Payment(BaseModel):
    id: int
    status: Literal["pending", "completed", "failed"]
    buyer_account_id: int
    seller_account_id: int
    amount: AmountOut
    currency_id: int
    currency: str
    failure_code: Optional[Literal["insufficient_funds", "account_frozen", "batch_failed",
                                    "internal_error"]]
    batch_id: Optional[int]
    created_at: datetime
    completed_at: Optional[datetime]


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


class Batch(BaseModel):
    id: int
    atomic: bool
    total: int
    counts: BatchCounts
    finished: bool
    created_at: datetime


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    status: Literal["ready"]
    checks: dict[str, bool]
