"""The compiled load generator: wrk with bench/wrk_payments.lua, when `wrk` is on PATH
(`apt-get install wrk`). A warm-up run, then the measured run: the steady window is exactly the
measured run. Its CPU comes from the kernel's accounting of the wrk processes (wait4)."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import time
from pathlib import Path

SCRIPT = Path(__file__).with_name("wrk_payments.lua")


def available() -> str | None:
    return shutil.which("wrk")


def _run(url: str, args: list[str], clients: int, threads: int, seconds: float,
         log_path: Path) -> tuple[dict, float, float, float, float]:
    """Returns (wrk's numbers, epoch start, epoch end, cpu seconds, wall seconds)."""
    # wrk takes whole seconds
    cmd = [available(), "-t", str(threads), "-c", str(clients), "-d", f"{max(1, math.ceil(seconds))}s",
           "--timeout", "30s", "-s", str(SCRIPT), url, "--", *args]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        start, t0 = time.time(), time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log)
        out = proc.stdout.read().decode()
        _, status, usage = os.wait4(proc.pid, 0)
        wall, end = time.perf_counter() - t0, time.time()
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.write(f"$ {' '.join(cmd[:-len(args) - 1])} -- <key> {' '.join(args[1:])}\n{out}\n".encode())
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}); see {log_path}")
    line = next((l for l in out.splitlines() if l.startswith("WRK_JSON ")), None)
    if line is None:
        raise RuntimeError(f"no result line from wrk; see {log_path}")
    return json.loads(line[len("WRK_JSON "):]), start, end, usage.ru_utime + usage.ru_stime, wall


def run(url: str, api_key: str, lo: int, n: int, hot: int, batch: int, seed: int, clients: int,
        duration_s: float, warmup_s: float, log_path: Path, threads: int = 1):
    """Returns (client metrics as bench.metrics.client_metrics gives them, window start epoch,
    window end epoch, cpu seconds, wall seconds)."""
    args = [api_key, str(lo), str(n), str(hot), str(batch), str(seed)]
    per_request = batch or 1
    _, _, _, cpu_w, wall_w = _run(url, args, clients, threads, warmup_s, log_path)
    numbers, start, end, cpu, wall = _run(url, args, clients, threads, duration_s - warmup_s, log_path)
    window = numbers["duration_us"] / 1e6
    socket_errors = {k: numbers[k] for k in ("connect_errors", "read_errors", "write_errors",
                                             "timeout_errors") if numbers[k]}
    ok = numbers["requests"] - numbers["status_errors"] - numbers["read_errors"] - numbers["timeout_errors"]

    def ms(us):
        return round(us / 1000, 2)
    metrics = {
        "requests": numbers["requests"],
        "requests_in_window": numbers["requests"],
        "accepted_per_s": round(max(ok, 0) * per_request / window, 1),
        "requests_per_s": round(numbers["requests"] / window, 1),
        "acceptance_latency_ms": {"p50": ms(numbers["p50_us"]), "p90": ms(numbers["p90_us"]),
                                  "p99": ms(numbers["p99_us"]), "max": ms(numbers["max_us"]),
                                  "mean": ms(numbers["mean_us"])},
        "http_statuses": {"2xx/3xx": numbers["requests"] - numbers["status_errors"],
                          "429": numbers["throttled"],
                          "other 4xx/5xx": numbers["status_errors"] - numbers["throttled"]},
        "http_failures": numbers["status_errors"] - numbers["throttled"],
        "throttled": numbers["throttled"],
        "client_errors": socket_errors,
    }
    return metrics, start, start + window, cpu + cpu_w, wall + wall_w
