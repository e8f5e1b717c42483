"""`make bench` in miniature: the harness starts the whole system, drives every scenario, runs
the pgbench reference, and writes a result JSON with every field (and its PNG chart)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import shutil

import pytest

from scripts.services import ROOT

pytestmark = pytest.mark.slow

SCENARIO_FIELDS = {
    "name", "accepted_per_s", "completed_per_s", "reference_tps", "ratio_to_reference",
    "acceptance_latency_ms", "completion_latency_ms", "failures", "http_failures", "failed",
    "pending_after_drain", "drain_s", "load_generator", "cpu_s", "requests", "payments",
    "cpu_share_outside_benchmark_pct", "machine_cpu_busy_pct", "backlog_at_load_end",
}
LATENCY_FIELDS = {"p50", "p99"}


@pytest.mark.parametrize("loadgen", [
    "python",
    pytest.param("wrk", marks=pytest.mark.skipif(not shutil.which("wrk"), reason="wrk not installed")),
])
def test_bench_smoke_writes_every_field(tmp_path, services, loadgen):
    output = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    # The session's PostgreSQL and Redis: the bench makes its own databases on that server.
    # Its own Redis database number, so no other test's worker can take the bench's messages.
    env.update(DATABASE_URL=services.database_url, REDIS_URL=services.redis_url.rsplit("/", 1)[0] + "/15")
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--smoke", "--output", str(output),
                           "--var-dir", str(tmp_path / "var"), "--loadgen", loadgen],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    result = json.loads(output.read_text())
    assert output.with_suffix(".png").stat().st_size > 10_000
    assert result["reconcile"] == {"ok": True, "problems": []}
    assert result["reference_reconcile"]["ok"] is True
    machine = result["machine"]
    for field in ("nproc", "cpu_model", "ram_bytes", "python", "postgresql", "redis", "pgbench"):
        assert machine[field], field

    for variant in ("uniform", "hot"):
        ref = result["reference"][variant]
        assert ref["tps"] > 0 and ref["failed"] == 0
        # Every pgbench transaction completed one pending payment of its own.
        assert ref["payments_completed"] == ref["transactions"]

    scenarios = {s["name"]: s for s in result["scenarios"]}
    assert set(scenarios) == {"uniform", "hot", "batch", "paced"}
    assert result["idle"]["payments"] == 5 and result["idle"]["completion_seen_ms"]["p50"] > 0
    for name, s in scenarios.items():
        assert SCENARIO_FIELDS <= set(s), (name, SCENARIO_FIELDS - set(s))
        assert s["accepted_per_s"] > 0 and s["completed_per_s"] > 0, name
        assert s["failures"] == 0, (name, s["http_statuses"], s["failure_codes"])
        assert s["pending_after_drain"] == 0, name
        for key in ("acceptance_latency_ms", "completion_latency_ms"):
            assert LATENCY_FIELDS <= set(s[key]) and s[key]["p50"] <= s[key]["p99"], (name, key)
        assert s["ratio_to_reference"] == pytest.approx(  # rounded to 3 places
            s["completed_per_s"] / s["reference_tps"], rel=0.01, abs=0.0005)
        kind = "python" if loadgen == "python" or name == "paced" else "wrk"  # wrk cannot pace
        assert s["load_generator"]["cpu_s"] > 0 and s["load_generator"]["kind"] == kind
        if kind == "python":
            # Every payment accepted by HTTP is in the database (wrk abandons the requests in
            # flight when it stops, so its count can be short of the database's).
            assert s["payments"] == s["http_statuses"].get("202", 0) * s["payments_per_request"], name
        assert s["completed"] + s["failed"] == s["payments"], name
    assert scenarios["batch"]["payments_per_request"] == 100
    # Paced (--smoke: 50/s offered), not as fast as answered (8 clients would send hundreds/s).
    assert scenarios["paced"]["offered_per_s"] == 50
    assert scenarios["paced"]["requests_per_s"] == pytest.approx(50, rel=0.25)
