"""One payment that cannot be applied (a trigger in PostgreSQL raises for it, as a data bug or a
constraint would) holds up none of the others of its message or batch: they complete, and it ends
`failed` with `internal_error`, logged with its id. Real worker, real PostgreSQL, no mocks."""
from __future__ import annotations

import json
import uuid
from decimal import Decimal

import pytest
from sqlalchemy import text

from common import ledger
from common.messaging import Sender, make_celery
from tests.support.processes import wait_until


@pytest.fixture
def poison(db):
    """poison(payment_id): from now on, writing a ledger entry for that payment raises."""
    name = f"wallet_test_poison_{uuid.uuid4().hex[:8]}"
    made = []

    def make(payment_id: int) -> None:
        def create(s):
            s.execute(text(
                f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$"
                " BEGIN RAISE EXCEPTION 'poisoned payment %', NEW.payment_id"
                "  USING ERRCODE = 'check_violation'; END $$"))
            s.execute(text(
                f"CREATE TRIGGER {name} BEFORE INSERT ON ledger_entries FOR EACH ROW"
                f" WHEN (NEW.payment_id = {int(payment_id)}) EXECUTE FUNCTION {name}()"))
        db.unit_of_work(create)
        made.append(name)
    yield make
    for n in made:
        def drop(s):
            s.execute(text(f"DROP TRIGGER {n} ON ledger_entries"))
            s.execute(text(f"DROP FUNCTION {n}()"))
        db.unit_of_work(drop)


def accounts(db, count: int, opening: str = "100") -> list[int]:
    def create(s):
        usd = ledger.Currencies.load(s).by_id[1]
        return [ledger.create_account(s, usd, f"poison-{n}", Decimal(opening)) for n in range(count)]
    return db.unit_of_work(create)


def statuses(db, ids) -> dict[int, tuple[str, str | None]]:
    with db.read() as s:
        return {r.id: (r.status, r.failure_code) for r in s.execute(text(
            "SELECT id, status, failure_code FROM payments WHERE id = ANY(:ids)"), {"ids": list(ids)})}


def logged_internal_error(worker, payment_id: int) -> bool:
    for line in worker.log().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("payment_id") == payment_id and "internal_error" in record.get("event", ""):
                return True
    return False


def test_one_poisoned_payment_does_not_block_its_message(db, settings, worker, poison):
    buyer, *sellers = accounts(db, 21)
    rows = db.unit_of_work(lambda s: ledger.submit_payments(
        s, ledger.Currencies.load(s), [ledger.PaymentRequest(buyer, seller, "1") for seller in sellers]))
    ids = [r["id"] for r in rows]
    culprit = ids[7]
    poison(culprit)
    # One message with all twenty, sent to one queue, as the dispatcher would.
    sender = Sender(make_celery(settings), settings)
    sender._queues = 1
    assert sender.send_payments([(i, buyer, s) for i, s in zip(ids, sellers)]) == 1

    done = wait_until(lambda: (lambda st: st if all(v[0] != "pending" for v in st.values()) else None)(
        statuses(db, ids)), 30, "every payment of the message to be terminal")
    assert done[culprit] == ("failed", "internal_error")
    assert all(done[i] == ("completed", None) for i in ids if i != culprit), done
    wait_until(lambda: logged_internal_error(worker, culprit), 10, "the culprit's id in the worker's log")
    with db.read() as s:
        assert s.execute(text("SELECT balance FROM accounts WHERE id = :id"), {"id": buyer}).scalar_one() == 81
        assert s.execute(text("SELECT count(*) FROM ledger_entries WHERE payment_id = :p"),
                         {"p": culprit}).scalar_one() == 0


def test_a_poisoned_payment_fails_its_atomic_batch(db, settings, worker, poison):
    a, b, c = accounts(db, 3)
    batch_id, rows, _ = db.unit_of_work(lambda s: ledger.submit_batch(s, ledger.Currencies.load(s), [
        ledger.PaymentRequest(a, b, "5"), ledger.PaymentRequest(b, c, "5"),
        ledger.PaymentRequest(c, a, "5")], atomic=True))
    ids = [r["id"] for r in rows]
    poison(ids[1])
    Sender(make_celery(settings), settings).send_atomic_batch(batch_id)

    done = wait_until(lambda: (lambda st: st if all(v[0] != "pending" for v in st.values()) else None)(
        statuses(db, ids)), 30, "the atomic batch to be terminal")
    assert done == {ids[0]: ("failed", "batch_failed"), ids[1]: ("failed", "internal_error"),
                    ids[2]: ("failed", "batch_failed")}
    wait_until(lambda: logged_internal_error(worker, ids[1]), 10, "the culprit's id in the worker's log")
    with db.read() as s:
        balances = s.execute(text("SELECT balance FROM accounts WHERE id = ANY(:ids)"),
                             {"ids": [a, b, c]}).scalars().all()
    assert balances == [100, 100, 100]
