"""Many client threads pay over a handful of accounts, one of them hot; afterwards every payment
is terminal and the books balance to the cent."""
import random
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import httpx

from tests.conftest import AUTH
from tests.support import invariants
from tests.support.api import open_account


def test_parallel_payments_keep_invariants(http, api_url, db):
    accounts = [open_account(http, amount, name=f"c{i}")
                for i, amount in enumerate(["100", "50", "50", "20", "20", "10"])]
    ids = [a["id"] for a in accounts]
    openings = {a["id"]: Decimal(a["balance"]) for a in accounts}
    hot = ids[0]
    rng = random.Random(7)
    plan = []
    for _ in range(400):
        other = rng.choice(ids[1:])
        buyer, seller = (hot, other) if rng.random() < 0.5 else (other, hot)
        if rng.random() < 0.2:  # some payments not touching the hot account
            buyer, seller = rng.sample(ids[1:], 2)
        plan.append((buyer, seller, Decimal(rng.choice(["0.01", "1", "2.5", "7", "15", "33.33"]))))

    def send(chunk):
        seen = {}
        with httpx.Client(base_url=api_url, headers=AUTH, timeout=30) as client:
            for buyer, seller, amount in chunk:
                r = client.post("/payments", json={"buyer_account_id": buyer, "seller_account_id": seller,
                                                   "amount": str(amount)})
                assert r.status_code == 202, r.text
                seen[r.json()["id"]] = (buyer, seller, amount)
        return seen

    accepted = {}
    with ThreadPoolExecutor(max_workers=12) as pool:
        for seen in pool.map(send, [plan[i::12] for i in range(12)]):
            accepted.update(seen)
    assert len(accepted) == len(plan)

    invariants.wait_all_terminal(db, list(accepted), timeout_s=60)
    counts = invariants.check(db, openings, accepted)
    # The test means something only if both outcomes happened.
    assert counts.get("completed", 0) > 50 and counts.get("failed", 0) > 10, counts
