#!/usr/bin/env python3
"""Opacus's DP-SGD step rate on CPU for the models `cargo bench --bench train` measures
(docs/performance.md): an MLP 30 -> 64 -> 1 (binary) and the digits CNN on 1x8x8 images
(conv 8x3x3 padding 1, relu, max pool 2, dense 10), batch 256, clip 1, per-example
gradients by Opacus's GradSampleModule, noise multiplier 0 (as the Rust bench, which leaves
the noise draw out). Prints one JSON object. Needs `pip install opacus` (outside the repo).

Usage: python3 tools/opacus_bench.py [--threads 1] [--seconds 0.5]
"""
import argparse
import json
import time

import torch
from opacus import PrivacyEngine

BATCH = 256
BATCHES = 8
REPEATS = 5


def rate(seconds, per_call, run):
    run()  # warm-up
    rates = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        calls = 0
        while time.perf_counter() - start < seconds:
            run()
            calls += 1
        rates.append(calls * per_call / (time.perf_counter() - start))
    rates.sort()
    return rates[REPEATS // 2]


def bench(label, model, x, y, loss_fn, seconds):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=BATCH
    )
    engine = PrivacyEngine(accountant="rdp")
    # Poisson sampling off: fixed batches, as the Rust bench steps fixed batches.
    model, opt, loader = engine.make_private(
        module=model,
        optimizer=opt,
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
    )
    batches = list(loader)
    state = {"b": 0}

    def step():
        xb, yb = batches[state["b"] % len(batches)]
        state["b"] += 1
        opt.zero_grad()
        loss_fn(model(xb), yb).backward()
        opt.step()

    return {"model": label, "batch": BATCH, "dp_sgd_step_examples_per_s": round(rate(seconds, BATCH, step))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=0.5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(1)
    n = BATCH * BATCHES
    x = torch.rand(n, 30) * 2 - 1
    y = (x[:, ::3].sum(dim=1) > 0).float().unsqueeze(1)
    mlp = torch.nn.Sequential(torch.nn.Linear(30, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    images = torch.rand(n, 1, 8, 8) * 2 - 1
    digits = torch.arange(n) % 10
    cnn = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 4 * 4, 10),
    )
    results = [
        bench("mlp 30->64->1", mlp, x, y, torch.nn.BCEWithLogitsLoss(), args.seconds),
        bench("cnn 1x8x8 conv8 pool dense10", cnn, images, digits, torch.nn.CrossEntropyLoss(), args.seconds),
    ]
    import opacus

    print(json.dumps({
        "bench": "opacus",
        "torch": torch.__version__,
        "opacus": opacus.__version__,
        "threads": args.threads,
        "seconds_per_measurement": args.seconds,
        "repeats": REPEATS,
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
