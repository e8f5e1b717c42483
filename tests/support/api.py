"""Small client-side helpers shared by the HTTP tests."""
from __future__ import annotations

from tests.support.processes import wait_until


def open_account(client, amount="0", currency_id=1, name="acct") -> dict:
    response = client.post("/accounts", json={"name": name, "amount": amount, "currency_id": currency_id})
    assert response.status_code == 201, _text(response)
    return _json(response)


def pay(client, buyer: int, seller: int, amount, **extra) -> dict:
    response = client.post("/payments", json={"buyer_account_id": buyer, "seller_account_id": seller,
                                              "amount": amount, **extra})
    assert response.status_code == 202, _text(response)
    return _json(response)


def wait_terminal(client, payment_id: int, timeout_s: float = 30) -> dict:
    def terminal():
        body = _json(client.get(f"/payments/{payment_id}"))
        return body if body["status"] != "pending" else None
    return wait_until(terminal, timeout_s, f"payment {payment_id} to be terminal")


def _json(response):
    return response.json() if callable(getattr(response, "json", None)) else response.get_json()


def _text(response):
    return getattr(response, "text", None) or response.get_data(as_text=True)
