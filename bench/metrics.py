"""What each scenario reports: client-side figures from the load result, the rest from the
database's own timestamps (created_at when accepted, completed_at when terminal)."""
from __future__ import annotations

import math
from collections import Counter

from sqlalchemy import text

from bench.load import LoadResult


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


def client_metrics(load: LoadResult, warmup_s: float, duration_s: float) -> dict:
    window = max(duration_s - warmup_s, 1e-9)
    steady = load.in_window(warmup_s, duration_s)
    ok = [r for r in steady if r[2] == 202]
    latencies = sorted(r[1] for r in ok)
    statuses = Counter(r[2] for r in load.requests)
    return {
        "requests": len(load.requests),
        "requests_in_window": len(steady),
        "accepted_per_s": round(sum(r[3] for r in ok) / window, 1),
        "requests_per_s": round(len(steady) / window, 1),
        "acceptance_latency_ms": {"p50": ms(percentile(latencies, 50)),
                                  "p90": ms(percentile(latencies, 90)),
                                  "p99": ms(percentile(latencies, 99)),
                                  "max": ms(latencies[-1] if latencies else None),
                                  "mean": ms(sum(latencies) / len(latencies) if latencies else None)},
        "http_statuses": {str(k): v for k, v in sorted(statuses.items())},
        "http_failures": sum(v for k, v in statuses.items() if k not in (202, 429)),
        "throttled": statuses.get(429, 0),  # admission control: "retry later", not a failure
        "client_errors": dict(load.errors),
    }


def database_metrics(session, first_id: int, window_start: float, window_end: float) -> dict:
    """Payments with id >= first_id are this scenario's. Window bounds are epoch seconds."""
    params = {"first": first_id, "lo": window_start, "hi": window_end}
    window = max(window_end - window_start, 1e-9)
    row = session.execute(text(
        "SELECT"
        " count(*) AS total,"
        " count(*) FILTER (WHERE created_at >= to_timestamp(:lo) AND created_at < to_timestamp(:hi)) AS created_in_window,"
        " count(*) FILTER (WHERE completed_at >= to_timestamp(:lo) AND completed_at < to_timestamp(:hi)) AS terminal_in_window,"
        " count(*) FILTER (WHERE status = 'completed') AS completed,"
        " count(*) FILTER (WHERE status = 'failed') AS failed,"
        " count(*) FILTER (WHERE status = 'pending') AS pending"
        " FROM payments WHERE id >= :first"
    ), params).one()
    lat = session.execute(text(
        "SELECT"
        " percentile_disc(0.5) WITHIN GROUP (ORDER BY d) AS p50,"
        " percentile_disc(0.9) WITHIN GROUP (ORDER BY d) AS p90,"
        " percentile_disc(0.99) WITHIN GROUP (ORDER BY d) AS p99,"
        " max(d) AS max, avg(d) AS mean, count(*) AS n"
        " FROM (SELECT extract(epoch FROM completed_at - created_at) AS d FROM payments"
        "       WHERE id >= :first AND completed_at IS NOT NULL"
        "         AND created_at >= to_timestamp(:lo) AND created_at < to_timestamp(:hi)) x"
    ), params).one()
    codes = dict(session.execute(text(
        "SELECT failure_code, count(*) FROM payments WHERE id >= :first AND status = 'failed'"
        " GROUP BY failure_code"
    ), params).all())
    return {
        "payments": row.total,
        "accepted_per_s_db": round(row.created_in_window / window, 1),
        "completed_per_s": round(row.terminal_in_window / window, 1),
        "completed": row.completed,
        "failed": row.failed,
        "failure_codes": codes,
        "pending_after_drain": row.pending,
        "completion_latency_ms": {k: ms(float(getattr(lat, k))) if getattr(lat, k) is not None else None
                                  for k in ("p50", "p90", "p99", "max", "mean")},
        "completion_latency_samples": lat.n,
    }
