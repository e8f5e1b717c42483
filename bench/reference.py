"""The pgbench reference: bench/pgbench_payment.sql (one payment, one transaction) on a database of
its own made by the same migrations, on the same PostgreSQL server as the system under test."""
from __future__ import annotations

import math
import re
import shutil
import subprocess
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from sqlalchemy.engine import make_url

SCRIPT = Path(__file__).with_name("pgbench_payment.sql")


def pgbench_binary() -> str:
    """pgserver's own pgbench (same version as its server), else one on PATH."""
    try:
        from pgserver._commands import POSTGRES_BIN_PATH
        candidate = Path(POSTGRES_BIN_PATH) / "pgbench"
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("pgbench")
    if not found:
        raise RuntimeError("no pgbench: install pgserver (requirements/dev.txt) or postgresql-client")
    return found


def libpq_url(database_url: str) -> str:
    """A URL libpq understands (no SQLAlchemy driver suffix)."""
    url = make_url(database_url)
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


@dataclass
class PgbenchResult:
    variant: str
    tps: float
    latency_avg_ms: float | None
    transactions: int
    failed: int
    clients: int
    duration_s: float
    mode: str
    command: str


VARIANTS = ("uniform", "hot")


def prepare(session, accounts: int, clients: int, duration_s: float, max_tps: float = 12_000
            ) -> dict[str, int]:
    """Seed the reference database (the caller commits): `accounts` funded accounts and, for each
    variant and each client, `stride` pending payments of its own to complete (enough at up to
    `max_tps`; if a client's share wraps around, payments are completed twice, which the harness
    detects: payments_completed < transactions and reconcile fails). Returns -D variables."""
    from bench.seed import seed_accounts, seed_pending_payments
    ids = seed_accounts(session, accounts, Decimal("1000000"), Decimal("1000000000"))
    if ids != list(range(ids[0], ids[0] + len(ids))):
        raise RuntimeError("reference accounts are not contiguous ids")
    stride = max(100, math.ceil(max_tps * duration_s / clients))
    first, _ = seed_pending_payments(session, stride * clients * len(VARIANTS), ids[0], ids[1])
    return {"lo": ids[0], "n": len(ids), "base": first, "stride": stride, "hot_id": ids[0]}


def run(database_url: str, variables: dict[str, int], variant: str, clients: int, threads: int,
        duration_s: float, mode: str, log_path: Path) -> PgbenchResult:
    hot = variables["hot_id"] if variant == "hot" else 0
    base = variables["base"] + VARIANTS.index(variant) * clients * variables["stride"]
    defs = {"lo": variables["lo"], "n": variables["n"], "base": base,
            "stride": variables["stride"], "hot": hot, "step": 0}
    args = [pgbench_binary(), "-n", "-c", str(clients), "-j", str(threads), "-T", str(int(math.ceil(duration_s))),
            "-M", mode, "-f", str(SCRIPT)]
    for k, v in defs.items():
        args += ["-D", f"{k}={v}"]
    args.append(libpq_url(database_url))
    proc = subprocess.run(args, capture_output=True, text=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text(f"$ {' '.join(args)}\n{proc.stdout}\n{proc.stderr}")
    if proc.returncode != 0:
        raise RuntimeError(f"pgbench failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out = proc.stdout
    tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out)
    lat = re.search(r"latency average = ([\d.]+) ms", out)
    done = re.search(r"number of transactions actually processed: (\d+)", out)
    failed = re.search(r"number of failed transactions: (\d+)", out)
    if not tps or not done:
        raise RuntimeError(f"cannot read pgbench's output:\n{out[-3000:]}")
    return PgbenchResult(variant=variant, tps=float(tps.group(1)),
                         latency_avg_ms=float(lat.group(1)) if lat else None,
                         transactions=int(done.group(1)), failed=int(failed.group(1)) if failed else 0,
                         clients=clients, duration_s=duration_s, mode=mode,
                         command=" ".join(args[:-1]) + " <url>")
