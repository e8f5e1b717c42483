"""The scaling table (issue 6 item 6): `python -m bench.scaling [--workers 1,2,4] [--api-procs 1,2]
[-- any bench.run options]` runs `bench.run` once per combination (each a full run: fresh
database, its own pgbench reference) and prints a Markdown table; the JSONs go to
bench/results/scaling-<UTC timestamp>/."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys


from bench.run import RESULTS


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = []
    if "--" in argv:
        i = argv.index("--")
        argv, passthrough = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__)
    p.add_argument("--workers", default="1,2,4")
    p.add_argument("--api-procs", default="1,2")
    args = p.parse_args(argv)
    folder = RESULTS / f"scaling-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%SZ')}"
    rows = []
    for api in [int(x) for x in args.api_procs.split(",")]:
        for workers in [int(x) for x in args.workers.split(",")]:
            out = folder / f"api{api}-workers{workers}.json"
            cmd = [sys.executable, "-m", "bench.run", "--api-procs", str(api), "--workers", str(workers),
                   "--output", str(out), *passthrough]
            print(f"$ {' '.join(cmd)}", flush=True)
            subprocess.run(cmd, check=False)
            if out.exists():
                rows.append((api, workers, json.loads(out.read_text())))
    table = render(rows)
    print("\n" + table)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "table.md").write_text(table + "\n")
    return 0


def render(rows) -> str:
    lines = ["| API procs | workers | scenario | accepted/s | completed/s | ratio to pgbench |"
             " accept p99 ms | complete p99 ms | failures |",
             "|---|---|---|---|---|---|---|---|---|"]
    for api, workers, result in rows:
        for s in result["scenarios"]:
            lines.append(f"| {api} | {workers} | {s['name']} | {s['accepted_per_s']:,.0f} |"
                         f" {s['completed_per_s']:,.0f} | {s['ratio_to_reference'] or '-'} |"
                         f" {s['acceptance_latency_ms']['p99']} | {s['completion_latency_ms']['p99']} |"
                         f" {s['failures']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
