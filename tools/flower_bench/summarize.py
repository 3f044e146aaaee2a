#!/usr/bin/env python3
"""Medians over several runs of compare.sh: for each size, each figure's median over the
runs (each run's own figure is already the median of its rounds), its range, and the
figures run by run. Standard library only.

Usage: tools/flower_bench/summarize.py RUN.jsonl [RUN.jsonl ...]
"""
import json
import statistics
import sys


def main(paths):
    sizes = {}
    for run, path in enumerate(paths):
        for line in open(path):
            r = json.loads(line)
            figs = sizes.setdefault((r["sites"], r["params"]), {})

            def put(name, value):
                figs.setdefault(name, {})[run] = value

            if r["bench"] == "round":
                tag = "fedpriv dp " + ("on" if r["dp"] else "off")
                put(tag + " round_s", r["round_s"]["median"])
                put(tag + " interval_s", r["round_interval_s"]["median"])
                put(tag + " cpu_s", r["coordinator_cpu_s_per_round"] + r["sites_cpu_s_per_round"])
                if r.get("baseline_quinn_round_s"):
                    put("bare quinn round_s", r["baseline_quinn_round_s"]["median"])
                    put("interval / bare quinn", r["interval_ratio_to_baseline"])
                    put(tag + " coordinator cpu_s", r["coordinator_cpu_s_per_round"])
                    put(tag + " sites cpu_s", r["sites_cpu_s_per_round"])
                    put("bare quinn cpu_s", r["baseline_server_cpu_s_per_round"] + r["baseline_clients_cpu_s_per_round"])
                    put("bare quinn server cpu_s", r["baseline_server_cpu_s_per_round"])
                    put("bare quinn clients cpu_s", r["baseline_clients_cpu_s_per_round"])
            else:
                put("flower " + r["dp"] + " round_s", r["round_s"]["median"])
    for (n, d), figs in sorted(sizes.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"{n} x {d}")
        for name, by_run in figs.items():
            v = [by_run[k] for k in sorted(by_run)]
            print(f"  {name:36} median {statistics.median(v):.3f} [{min(v):.3f}-{max(v):.3f}]  runs: "
                  + ", ".join(f"{x:.3f}" for x in v))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
