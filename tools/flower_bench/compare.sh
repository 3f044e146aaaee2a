#!/bin/bash
# fedpriv's round bench (DP on with its bare-quinn baseline, DP off) and Flower's
# (tools/flower_bench/flower_round.py: off, LocalDpMod, server-side DP; TLS on) in one run,
# size after size, one JSON line per run. Needs the release builds and the Flower venv:
#   cargo build --release --locked -p fedpriv-coordinator && cargo build --release --locked --example bench_round
#   python3 -m venv /work/venv-flwr && /work/venv-flwr/bin/pip install -r tools/flower_bench/requirements.txt
# Usage: tools/flower_bench/compare.sh [OUT.jsonl] [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-/dev/stdout}
PY=${2:-/work/venv-flwr/bin/python}
for size in "4 1000000" "8 1000000" "4 10000000"; do
  set -- $size
  ./target/release/examples/bench_round --sites "$1" --params "$2" --rounds 5 --dp on 2>/dev/null >> "$OUT"
  ./target/release/examples/bench_round --sites "$1" --params "$2" --rounds 5 --dp off --no-baseline 2>/dev/null >> "$OUT"
  for dp in off local central; do
    "$PY" tools/flower_bench/flower_round.py --sites "$1" --params "$2" --rounds 5 --dp "$dp" 2>/dev/null >> "$OUT"
  done
done
