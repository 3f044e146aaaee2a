#!/bin/bash
# fedpriv's DP-SGD step (`cargo bench --bench train`) and Opacus's (tools/opacus_bench.py) in
# one session, alternately: fedpriv 1 thread, Opacus 1 thread, fedpriv 2 threads, Opacus 2
# threads, REPEATS times; then one line per model and runner with the examples per second of
# each repeat. Needs Opacus outside the repo:
#   python3 -m venv /work/venv-opacus && /work/venv-opacus/bin/pip install opacus
# Usage: tools/opacus_compare.sh [REPEATS] [PYTHON] [RAW_OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
REPEATS=${1:-2}
PY=${2:-/work/venv-opacus/bin/python}
RAW=${3:-$(mktemp)}
BENCH=$(cargo bench --locked --bench train --no-run --message-format=json 2>/dev/null |
  "$PY" -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "train" and m.get("executable"):
        print(m["executable"])')
: > "$RAW"
for rep in $(seq "$REPEATS"); do
  for t in 1 2; do
    echo "== fedpriv $t $(cut -d' ' -f1 /proc/loadavg)" >> "$RAW"
    RAYON_NUM_THREADS=$t "$BENCH" --bench >> "$RAW"
    echo "== opacus $t $(cut -d' ' -f1 /proc/loadavg)" >> "$RAW"
    "$PY" tools/opacus_bench.py --threads "$t" 2>/dev/null >> "$RAW"
  done
done
"$PY" - "$RAW" <<'EOF'
import json, re, sys
text = open(sys.argv[1]).read()
parts = re.split(r"^== (\S+) (\d) (\S+)$", text, flags=re.M)
rows, loads = {}, []
for i in range(1, len(parts), 4):
    who, threads, load, body = parts[i], parts[i + 1], parts[i + 2], parts[i + 3]
    loads.append(float(load))
    for r in json.loads(body)["results"]:
        rate = r["examples_per_s"]["dp_sgd_step"] if "examples_per_s" in r else r["dp_sgd_step_examples_per_s"]
        rows.setdefault((r["model"], threads, who), []).append(round(rate))
print(json.dumps({"load_average_1min": [min(loads), max(loads)], "raw": sys.argv[1]}))
for (model, threads, who), rates in sorted(rows.items()):
    print(json.dumps({"model": model, "threads": int(threads), "runner": who, "dp_sgd_step_examples_per_s": rates}))
EOF
