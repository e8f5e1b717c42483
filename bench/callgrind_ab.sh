#!/bin/bash
# Instructions per request of each path of bench/profile_paths.py, under callgrind (independent
# of the machine's load). Usage: bench/callgrind_ab.sh OUT_DIR [profile_paths args...]
# Run from a checkout; prints "scenario instructions-per-request" lines.
set -e
out=$(realpath -m "$1"); shift
mkdir -p "$out"; rm -f "$out"/callgrind.out.*
args=(--database "wallet_profile_$(basename "$out" | tr -c "a-z0-9\n" _)" --batches 20 --singles 200 --refused 50 --apply-set 500 "$@")
valgrind --tool=callgrind --collect-atstart=no --toggle-collect=sys_call_tracing \
  --dump-after=sys_call_tracing --callgrind-out-file="$out/callgrind.out.%p" \
  .venv/bin/python -m bench.profile_paths --callgrind "${args[@]}" > "$out/stdout.txt" 2> "$out/stderr.txt"
python3 - "$out" <<'PY'
import glob, json, re, sys
out = sys.argv[1]
rows = json.loads(open(f"{out}/stdout.txt").read().split("SUMMARY ", 1)[1].splitlines()[0])
dumps = sorted((int(re.search(r"\.(\d+)$", f).group(1)), f) for f in glob.glob(f"{out}/callgrind.out.*.*"))
for row, (_, path) in zip(rows, dumps):
    total = next(int(l.split()[1]) for l in open(path) if l.startswith("summary:") or l.startswith("totals:"))
    per = total / row["requests"]
    pay = f"{total / row['payments']:,.0f}" if row["payments"] else "-"
    print(f"{row['scenario']:8} requests={row['requests']:5} Ir/request={per:,.0f} Ir/payment={pay}")
PY
