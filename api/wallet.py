"""What one API process holds: settings, the database pool and its group commit of single
payments, the currencies, the account directory, admission control and the dispatcher."""
from __future__ import annotations


from flask import current_app

from common.admission import Admission
from common.db import Database
from common.ledger import AccountDirectory, Currencies, single_inserts
from common.messaging import Dispatcher, Sender, make_celery
from common.settings import Settings


class Wallet:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.db = Database(settings)
        self.single_inserts = single_inserts(self.db, settings.accept_group_max)
        self.celery = make_celery(settings, publisher=True)  # the API only sends
        self.sender = Sender(self.celery, settings)
        self.admission = Admission(self.db, settings.max_pending, wait_s=settings.admission_wait_ms / 1000,
                                   max_waiting=settings.admission_waiters)
        self.dispatcher = Dispatcher(self.sender, settings.dispatch_window_ms,
                                     max_held=settings.dispatch_max_held)
        self._currencies: Currencies | None = None
        self.accounts = AccountDirectory()  # explains refusals without reading known accounts

    @property
    def currencies(self) -> Currencies:
        # Seeded by a migration and never changed at run time: loaded once, on first use (not at
        # start-up, so an API process starts even while the database is down).
        if self._currencies is None:
            with self.db.read() as session:
                self._currencies = Currencies.load(session)
        return self._currencies


def wallet() -> Wallet:
    return current_app.extensions["wallet"]
