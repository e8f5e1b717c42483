"""The account directory (common.ledger.directory): what it remembers is never read again, what
it did not find is, on a real PostgreSQL, each test in a transaction rolled back afterwards."""
from decimal import Decimal

import pytest
from sqlalchemy import text

from common import ledger
from common.ledger import AccountDirectory


@pytest.fixture
def currencies(session):
    return ledger.Currencies.load(session)


def open_(session, currencies, currency_id):
    row, _ = ledger.open_account(session, currencies.by_id[currency_id], "d", Decimal("1"))
    return row["id"]


def test_finds_customer_accounts_only_and_reads_known_ones_never_again(session, currencies):
    usd, eur = open_(session, currencies, 1), open_(session, currencies, 2)
    issuance = ledger.issuance_account_id(1)
    missing = session.execute(text("SELECT max(id) + 1000 FROM accounts")).scalar_one()
    directory = AccountDirectory()
    assert directory.currency_ids(session, [usd, eur, issuance, missing, usd]) == {usd: 1, eur: 2}
    # Remembered: no session is needed, so nothing is read.
    assert directory.currency_ids(None, [eur, usd]) == {usd: 1, eur: 2}
    # What was not found is not remembered: it is read again (here, with no session, it fails).
    with pytest.raises(AttributeError):
        directory.currency_ids(None, [usd, missing])
    with pytest.raises(AttributeError):
        directory.currency_ids(None, [issuance])


def test_past_its_bound_it_answers_but_remembers_nothing_more(session, currencies):
    a, b, c = (open_(session, currencies, 1) for _ in range(3))
    directory = AccountDirectory(max_accounts=2)
    assert directory.currency_ids(session, [a, b]) == {a: 1, b: 1}
    assert directory.currency_ids(session, [b, c]) == {b: 1, c: 1}
    assert directory.currency_ids(None, [a, b]) == {a: 1, b: 1}
    with pytest.raises(AttributeError):
        directory.currency_ids(None, [c])
