"""Operator commands: `flask --app api wallet reconcile`, `flask --app api wallet api-key create`."""
from __future__ import annotations

import secrets
import sys

import click
from flask import current_app
from flask.cli import AppGroup
from sqlalchemy import text

from common import ledger
from common.settings import hash_api_key

wallet_cli = AppGroup("wallet", help="Wallet operations.")


def _db():
    return current_app.extensions["wallet"].db


@wallet_cli.command("reconcile")
def reconcile() -> None:
    """Check invariants 1-3; exit 1 and list every violation if any is broken."""
    with _db().read() as session:
        problems = ledger.reconcile(session)
    if problems:
        click.echo(f"RECONCILE FAILED: {len(problems)} violation(s)", err=True)
        for problem in problems:
            click.echo(f"  - {problem}", err=True)
        sys.exit(1)
    click.echo("reconcile ok: per-currency totals balance, no negative balance, "
               "every balance equals the sum of its entries")


api_key_cli = AppGroup("api-key", help="API keys.")
wallet_cli.add_command(api_key_cli)


@api_key_cli.command("create")
@click.option("--name", default="default", help="A label for the key.")
def create_api_key(name: str) -> None:
    """Create a key; it is shown once and only its hash is stored."""
    key = "wk_" + secrets.token_urlsafe(32)
    _db().unit_of_work(lambda session: session.execute(
        text("INSERT INTO api_keys (name, key_hash) VALUES (:name, :hash)"),
        {"name": name, "hash": hash_api_key(key)}))
    click.echo(key)
