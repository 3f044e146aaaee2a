"""Time Google's dp_accounting on the questions fedpriv's accountant bench asks.

Developer tool only (fedpriv never needs Python). It prints one JSON object per
line, so that its figures can be put beside `cargo bench -p fedpriv-common
--bench dp -- accountant` and `cargo run --release -p fedpriv-common --example
accountant_speed`, run in the same session and at the same load.

How to run (virtual environment OUTSIDE the repository)::

    python3 -m venv /tmp/venv-dpacc
    /tmp/venv-dpacc/bin/pip install dp-accounting==0.6.0
    /tmp/venv-dpacc/bin/python tools/accountant_reference/time_reference.py [--repeat N]

What is timed (wall clock, median of N runs after one warm-up, one core):

* ``forward``: a fresh accountant composing
  ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps)``
  and ``get_epsilon(delta)``: ``RdpAccountant()`` with its default orders, and
  ``PLDAccountant(value_discretization_interval=1e-4)`` (the library defaults
  otherwise, and the settings of the known-answer table).
* ``steps``: the largest step count within an epsilon, by the library's own
  search (``dp_accounting.calibrate_dp_mechanism`` over the step count, which
  brackets and bisects with a fresh accountant per trial).
* ``noise``: the smallest noise multiplier for an epsilon, by
  ``calibrate_dp_mechanism`` over sigma with ``tol=1e-3`` (fedpriv answers to
  0.1% relative as well).
"""

import argparse
import json
import os
import statistics
import time

from absl import logging as absl_logging
import dp_accounting
from dp_accounting import pld
from dp_accounting import rdp

DELTA = 1e-5
INTERVAL = 1e-4

FORWARD = [
    # (q, sigma, steps): the bench's case first.
    (0.01, 1.0, 10_000),
    (0.001, 1.0, 1_600_000),
]
STEPS = [
    # (q, sigma, epsilon): the case (answer about 1.6M steps) and a
    # smaller one.
    (0.001, 1.0, 8.0),
    (0.01, 1.0, 2.0),
]
NOISE = [
    # (q, steps, epsilon)
    (0.01, 1000, 1.0),
    (0.01, 10_000, 2.0),
]


def event(q, sigma, steps):
  return dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
      steps)


def make_accountant(kind):
  if kind == 'rdp':
    return rdp.RdpAccountant()
  return pld.PLDAccountant(value_discretization_interval=INTERVAL)


def forward(kind, q, sigma, steps):
  acc = make_accountant(kind)
  acc.compose(event(q, sigma, steps))
  return float(acc.get_epsilon(DELTA))


def steps_for(kind, q, sigma, eps):
  return int(
      dp_accounting.calibrate_dp_mechanism(
          lambda: make_accountant(kind),
          lambda t: event(q, sigma, int(t)),
          eps,
          DELTA,
          bracket_interval=dp_accounting.ExplicitBracketInterval(1, 2),
          discrete=True))


def noise_for(kind, q, steps, eps):
  return float(
      dp_accounting.calibrate_dp_mechanism(
          lambda: make_accountant(kind),
          lambda s: event(q, s, steps),
          eps,
          DELTA,
          bracket_interval=dp_accounting.LowerEndpointAndGuess(0.05, 1.0),
          tol=1e-3))


def timed(fn, repeat):
  fn()  # warm-up (imports, caches)
  times = []
  answer = None
  for _ in range(repeat):
    t0 = time.perf_counter()
    answer = fn()
    times.append(time.perf_counter() - t0)
  return answer, statistics.median(times), min(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--repeat', type=int, default=5)
  parser.add_argument('--skip-slow', action='store_true',
                      help='only the forward questions at 10,000 steps')
  args = parser.parse_args()
  absl_logging.set_verbosity(absl_logging.ERROR)
  load = os.getloadavg()[0]
  for kind in ('rdp', 'pld'):
    for q, sigma, steps in FORWARD:
      if args.skip_slow and steps > 10_000:
        continue
      eps, med, best = timed(lambda: forward(kind, q, sigma, steps), args.repeat)
      print(json.dumps({'question': 'epsilon', 'accountant': kind, 'q': q,
                        'sigma': sigma, 'steps': steps, 'delta': DELTA,
                        'answer': eps, 'median_s': med, 'min_s': best,
                        'runs': args.repeat, 'load_1m': load}), flush=True)
  if args.skip_slow:
    return
  for kind in ('rdp', 'pld'):
    for q, sigma, eps in STEPS:
      t, med, best = timed(lambda: steps_for(kind, q, sigma, eps), 1)
      print(json.dumps({'question': 'steps', 'accountant': kind, 'q': q,
                        'sigma': sigma, 'epsilon': eps, 'delta': DELTA,
                        'answer': t, 'median_s': med, 'min_s': best,
                        'runs': 1, 'load_1m': load}), flush=True)
    for q, steps, eps in NOISE:
      s, med, best = timed(lambda: noise_for(kind, q, steps, eps), 1)
      print(json.dumps({'question': 'noise', 'accountant': kind, 'q': q,
                        'steps': steps, 'epsilon': eps, 'delta': DELTA,
                        'answer': s, 'median_s': med, 'min_s': best,
                        'runs': 1, 'load_1m': load}), flush=True)


if __name__ == '__main__':
  main()
