#!/usr/bin/env python3
"""Medians over several runs of compare.sh: for each size, each figure's median over the
runs (each run's own figure is already the median of its rounds), its range, and the
figures run by run. Standard library only. Where a run has fedpriv with DP on and off, also
the sites' noise (their CPU with DP on less with DP off) and how many times cheaper it would
have to be for DP on's interval to come to 1.5x bare quinn's, everything else at DP off's
CPU and perfectly packed on the run's cores (below 1: there is room already).

With --checkpoint-ns-per-value X (the coordinator's sealed, hashed checkpoint per model
value, from `cargo bench --locked --bench codec -- checkpoint_4MB`: the
streamed_sealed_with_sha256 time over its 1M values), also a lower bound on each run's
interval / bare quinn with DP on: bare quinn's CPU per round, plus the sites' noise (their
CPU with DP on less with DP off, same run), plus the checkpoint, spread perfectly over the
run's cores, over bare quinn's interval. Nothing else fedpriv does is counted in it.

Usage: tools/flower_bench/summarize.py [--checkpoint-ns-per-value X] RUN.jsonl [RUN.jsonl ...]
"""
import json
import statistics
import sys


def main(paths, checkpoint_ns):
    sizes, cores = {}, {}
    for run, path in enumerate(paths):
        for line in open(path):
            r = json.loads(line)
            figs = sizes.setdefault((r["sites"], r["params"]), {})

            def put(name, value):
                figs.setdefault(name, {})[run] = value

            cores[run] = r["cores"]
            if r["bench"] == "round":
                tag = "fedpriv dp " + ("on" if r["dp"] else "off")
                put(tag + " round_s", r["round_s"]["median"])
                put(tag + " interval_s", r["round_interval_s"]["median"])
                put(tag + " cpu_s", r["coordinator_cpu_s_per_round"] + r["sites_cpu_s_per_round"])
                put(tag + " coordinator cpu_s", r["coordinator_cpu_s_per_round"])
                put(tag + " sites cpu_s", r["sites_cpu_s_per_round"])
                if r.get("baseline_quinn_round_s"):
                    put("bare quinn round_s", r["baseline_quinn_round_s"]["median"])
                    put("interval / bare quinn", r["interval_ratio_to_baseline"])
                    put("bare quinn cpu_s", r["baseline_server_cpu_s_per_round"] + r["baseline_clients_cpu_s_per_round"])
                    put("bare quinn server cpu_s", r["baseline_server_cpu_s_per_round"])
                    put("bare quinn clients cpu_s", r["baseline_clients_cpu_s_per_round"])
            else:
                put("flower " + r["dp"] + " round_s", r["round_s"]["median"])
    for figs in sizes.values():
        on, off = figs.get("fedpriv dp on sites cpu_s", {}), figs.get("fedpriv dp off sites cpu_s", {})
        for run in sorted(set(on) & set(off)):
            figs.setdefault("noise cpu_s (sites, dp on - off)", {})[run] = on[run] - off[run]
        # How many times cheaper the noise would have to be for DP on's interval to be 1.5x
        # bare quinn's, with everything else at DP off's measured CPU and packed perfectly.
        noise = figs.get("noise cpu_s (sites, dp on - off)", {})
        dp_off, bare_s = figs.get("fedpriv dp off cpu_s", {}), figs.get("bare quinn round_s", {})
        for run in sorted(set(noise) & set(dp_off) & set(bare_s)):
            # inf: DP off alone leaves no room.
            room = 1.5 * bare_s[run] * cores[run] - dp_off[run]
            figs.setdefault("noise must be this much cheaper for 1.5x", {})[run] = (
                noise[run] / room if room > 0 else float("inf"))
    if checkpoint_ns is not None:
        for (n, d), figs in sizes.items():
            noise, bare = figs.get("noise cpu_s (sites, dp on - off)", {}), figs.get("bare quinn cpu_s", {})
            bare_s = figs.get("bare quinn round_s", {})
            for run in sorted(set(noise) & set(bare) & set(bare_s)):
                work = bare[run] + noise[run] + checkpoint_ns * 1e-9 * d
                figs.setdefault("bound: interval / bare quinn", {})[run] = work / cores[run] / bare_s[run]
    for (n, d), figs in sorted(sizes.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"{n} x {d}")
        for name, by_run in figs.items():
            v = [by_run[k] for k in sorted(by_run)]
            print(f"  {name:42} median {statistics.median(v):.3f} [{min(v):.3f}-{max(v):.3f}]  runs: "
                  + ", ".join(f"{x:.3f}" for x in v))


if __name__ == "__main__":
    args = sys.argv[1:]
    checkpoint_ns = None
    if args[:1] == ["--checkpoint-ns-per-value"] and len(args) >= 2:
        checkpoint_ns, args = float(args[1]), args[2:]
    if not args or args[0].startswith("-"):
        sys.exit(__doc__)
    main(args, checkpoint_ns)
