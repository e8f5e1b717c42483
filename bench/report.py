"""The outputs: bench/results/<UTC timestamp>.json, a PNG chart beside it, a table on stdout."""
from __future__ import annotations

import json
from pathlib import Path


def write_json(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    tmp.replace(path)


def chart(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = result["scenarios"]
    names = [s["name"] for s in scenarios]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))

    x = range(len(names))
    w = 0.27
    accepted = [s["accepted_per_s"] for s in scenarios]
    completed = [s["completed_per_s"] for s in scenarios]
    reference = [s.get("reference_tps") or 0 for s in scenarios]
    ax1.bar([i - w for i in x], accepted, w, label="accepted/s (HTTP 202)")
    ax1.bar(list(x), completed, w, label="completed/s (terminal)")
    ax1.bar([i + w for i in x], reference, w, label="pgbench reference tps", color="grey")
    target = result.get("targets", {}).get("single_completed_per_s")
    if target:
        ax1.axhline(target, color="red", linestyle="--", linewidth=1, label=f"target {target}/s")
    for i, s in enumerate(scenarios):
        if s.get("ratio_to_reference") is not None:
            ax1.annotate(f"{s['ratio_to_reference']:.2f}x ref", (i, completed[i]),
                         ha="center", va="bottom", fontsize=8)
    ax1.set_xticks(list(x), names)
    ax1.set_ylabel("payments per second")
    ax1.set_title("Throughput (steady window) vs one-transaction-per-payment reference")
    ax1.legend(fontsize=8)

    labels, p50, p99 = [], [], []
    for s in scenarios:
        for kind, key in (("accept", "acceptance_latency_ms"), ("complete", "completion_latency_ms")):
            labels.append(f"{s['name']}\n{kind}")
            p50.append(s[key]["p50"] or 0)
            p99.append(s[key]["p99"] or 0)
    xi = range(len(labels))
    ax2.bar([i - 0.2 for i in xi], p50, 0.4, label="p50")
    ax2.bar([i + 0.2 for i in xi], p99, 0.4, label="p99")
    ax2.set_yscale("log")
    ax2.set_xticks(list(xi), labels, fontsize=7)
    ax2.set_ylabel("milliseconds (log)")
    ax2.axhline(50, color="orange", linestyle="--", linewidth=1, label="accept p99 target 50 ms")
    ax2.axhline(1000, color="red", linestyle="--", linewidth=1, label="complete p99 target 1 s")
    ax2.set_title("Latency: acceptance (HTTP) and completion (DB timestamps)")
    ax2.legend(fontsize=8)

    m = result["machine"]
    fig.suptitle(f"make bench {result['started_at']}  ·  {m['nproc']} CPUs {m['cpu_model']}  ·  "
                 f"api {result['config']['api_procs']} procs, workers {result['config']['workers']}"
                 f"x{result['config']['worker_concurrency']} {result['config']['worker_pool']}"
                 + (f"  ·  idle: POST -> terminal p50 {result['idle']['completion_seen_ms']['p50']} ms"
                    if result.get("idle") else ""),
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(result: dict) -> str:
    def f(v, nd=0):
        return "-" if v is None else f"{v:,.{nd}f}"

    head = (f"{'scenario':<10} {'accepted/s':>10} {'completed/s':>11} {'ref tps':>8} {'ratio':>6}"
            f" {'acc p50':>8} {'acc p99':>8} {'cmp p50':>8} {'cmp p99':>8} {'fail':>5} {'429s':>6}"
            f" {'client CPU':>10}")
    lines = [head, "-" * len(head)]
    for s in result["scenarios"]:
        lines.append(
            f"{s['name']:<10} {f(s['accepted_per_s']):>10} {f(s['completed_per_s']):>11}"
            f" {f(s.get('reference_tps')):>8} {f(s.get('ratio_to_reference'), 2):>6}"
            f" {f(s['acceptance_latency_ms']['p50'], 1):>8} {f(s['acceptance_latency_ms']['p99'], 1):>8}"
            f" {f(s['completion_latency_ms']['p50'], 1):>8} {f(s['completion_latency_ms']['p99'], 1):>8}"
            f" {s['failures']:>5} {s.get('throttled', 0):>6}"
            f" {f(s['load_generator']['cpu_cores_used'], 2):>9}c")
    noisy = [f"{s['name']} {s['cpu_share_outside_benchmark_pct']}%" for s in result["scenarios"]
             if (s.get("cpu_share_outside_benchmark_pct") or 0) > 10]
    if noisy:
        lines.append("WARNING: other processes took this share of the machine's CPU during the load"
                     f" (noisy numbers): {', '.join(noisy)}")
    lines.append("latencies in ms; ratio = completed/s / pgbench tps; 429s = requests refused by"
                 " admission control (retried, not failures); client CPU in cores"
                 " (loadgen CPU seconds / wall seconds)")
    ref = result.get("reference") or {}
    if ref:
        lines.append("pgbench reference: " + ", ".join(
            f"{k} {v['tps']:,.0f} tps" for k, v in ref.items()))
    if result.get("idle"):
        i = result["idle"]
        lines.append(f"idle: {i['payments']} payments one at a time, POST -> a poll that sees it terminal:"
                     f" p50 {f(i['completion_seen_ms']['p50'], 1)} ms, p90 {f(i['completion_seen_ms']['p90'], 1)}"
                     f" ms, max {f(i['completion_seen_ms']['max'], 1)} ms (target p50 < 50 ms);"
                     f" acceptance p50 {f(i['acceptance_latency_ms']['p50'], 1)} ms")
    rec = result["reconcile"]
    lines.append(f"reconcile: {'OK' if rec['ok'] else 'FAILED: ' + '; '.join(rec['problems'][:5])}")
    return "\n".join(lines)
