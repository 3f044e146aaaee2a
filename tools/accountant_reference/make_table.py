"""Generate the known-answer table for fedpriv's privacy accountants.

This script is a developer tool only: the fedpriv project itself never needs
Python. The CSV it produces is committed at
``common/tests/data/accountant_reference.csv`` and read by the Rust tests.

Reference implementation: Google's ``dp_accounting`` library, version 0.6.0.

How to regenerate (virtual environment OUTSIDE the repository)::

    python3 -m venv /tmp/venv-dpacc
    /tmp/venv-dpacc/bin/pip install dp-accounting==0.6.0
    /tmp/venv-dpacc/bin/python tools/accountant_reference/make_table.py

(run from the repository root; ``--out PATH`` overrides the output file).
Runtime is about one minute on a single core.

What is computed, for each (q, sigma, steps) and delta in {1e-5, 1e-6}:

* ``rdp_epsilon``: ``dp_accounting.rdp.RdpAccountant()`` (default orders,
  add-or-remove neighbouring relation), composing
  ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps)``,
  then ``get_epsilon(delta)``.
* ``pld_epsilon``: ``dp_accounting.pld.PLDAccountant(
  value_discretization_interval=1e-4)`` (add-or-remove, pessimistic estimate,
  connect-the-dots discretisation -- all library defaults), same event,
  ``get_epsilon(delta)``.

Heterogeneous rows compose a ``ComposedDpEvent`` of several such
self-composed blocks in order; their q/sigma/steps columns are the per-block
values joined by ``+`` (e.g. ``0.01+0.02``, ``1.0+1.5``, ``300+200``).

Rows where either epsilon is infinite or larger than 100 are omitted.
Floats are written with ``repr`` (shortest round-trip representation).

Note: for q=0.1 and sigma <= 1.0 the library's ``_compute_log_a_frac`` fails to
converge for some small fractional orders (1.1 .. 1.6) and logs a warning; those
orders get RDP = inf and are thereby excluded (this does not change the
optimum for the deltas used here). The warnings are silenced below.
"""

import argparse
import csv
import itertools
import math
import os
import sys
import time

from absl import logging as absl_logging
import dp_accounting
from dp_accounting import pld
from dp_accounting import rdp

try:
  from importlib import metadata as _metadata
  DP_ACCOUNTING_VERSION = _metadata.version('dp-accounting')
except Exception:  # pylint: disable=broad-except
  DP_ACCOUNTING_VERSION = 'unknown'

EXPECTED_VERSION = '0.6.0'
VALUE_DISCRETIZATION_INTERVAL = 1e-4
DELTAS = (1e-5, 1e-6)
MAX_EPSILON = 100.0
SLOW_PLD_SECONDS = 30.0

# Published reference rows (q, sigma, steps, delta), always included first.
PUBLISHED = [
    (1.0, 1.0, 1, 1e-5),
    (0.01, 1.0, 1000, 1e-5),
    (0.01, 4.0, 10000, 1e-5),
    (0.001, 0.5, 1000, 1e-5),
]

GRID_Q = (1.0, 0.1, 0.01, 0.001)
GRID_SIGMA = (0.6, 0.8, 1.0, 2.0, 4.0)
GRID_STEPS = (1, 10, 100, 1000, 10000)
GRID_STEPS_Q1 = (1, 10)

# Heterogeneous compositions: lists of (q, sigma, steps) blocks, in order.
HETEROGENEOUS = [
    [(0.01, 1.0, 300), (0.02, 1.5, 200)],
    [(0.1, 2.0, 10), (0.01, 0.8, 100)],
    [(1.0, 4.0, 1), (0.01, 1.0, 1000)],
    [(0.001, 1.0, 1000), (0.01, 2.0, 500), (0.1, 4.0, 50)],
]

HEADER = ['case', 'q', 'sigma', 'steps', 'delta', 'rdp_epsilon', 'pld_epsilon']


def block_event(q, sigma, steps):
  return dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(
          q, dp_accounting.GaussianDpEvent(sigma)), steps)


def make_event(blocks):
  if len(blocks) == 1:
    return block_event(*blocks[0])
  return dp_accounting.ComposedDpEvent([block_event(*b) for b in blocks])


def epsilons(blocks, deltas):
  """Returns ({delta: rdp_eps}, {delta: pld_eps}, pld_seconds)."""
  event = make_event(blocks)

  rdp_acc = rdp.RdpAccountant()
  rdp_acc.compose(event)
  rdp_eps = {d: float(rdp_acc.get_epsilon(d)) for d in deltas}

  t0 = time.time()
  pld_acc = pld.PLDAccountant(
      value_discretization_interval=VALUE_DISCRETIZATION_INTERVAL)
  pld_acc.compose(event)
  pld_eps = {d: float(pld_acc.get_epsilon(d)) for d in deltas}
  return rdp_eps, pld_eps, time.time() - t0


def usable(eps):
  return math.isfinite(eps) and eps <= MAX_EPSILON


def main():
  default_out = os.path.join(
      os.path.dirname(os.path.abspath(__file__)), '..', '..', 'common', 'tests',
      'data', 'accountant_reference.csv')
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default=os.path.normpath(default_out))
  args = parser.parse_args()

  absl_logging.set_verbosity(absl_logging.ERROR)
  print(f'dp_accounting version: {DP_ACCOUNTING_VERSION}')
  if DP_ACCOUNTING_VERSION != EXPECTED_VERSION:
    print(f'WARNING: table was specified against dp_accounting '
          f'{EXPECTED_VERSION}', file=sys.stderr)

  # Ordered list of (blocks, deltas) jobs; homogeneous entries de-duplicated.
  jobs = []
  seen = set()

  def add(blocks, deltas):
    key = tuple(blocks)
    todo = [d for d in deltas if (key, d) not in seen]
    for d in todo:
      seen.add((key, d))
    if todo:
      jobs.append((blocks, todo))

  for q, sigma, steps, delta in PUBLISHED:
    add([(q, sigma, steps)], [delta])
  for q, sigma in itertools.product(GRID_Q, GRID_SIGMA):
    for steps in (GRID_STEPS_Q1 if q == 1.0 else GRID_STEPS):
      add([(q, sigma, steps)], list(DELTAS))
  for blocks in HETEROGENEOUS:
    add(blocks, list(DELTAS))

  rows = []
  skipped = []
  t_start = time.time()
  for blocks, deltas in jobs:
    rdp_eps, pld_eps, pld_seconds = epsilons(blocks, deltas)
    if pld_seconds > SLOW_PLD_SECONDS:
      print(f'NOTE: PLD took {pld_seconds:.1f}s for {blocks}', file=sys.stderr)
    q_s = '+'.join(repr(float(b[0])) for b in blocks)
    s_s = '+'.join(repr(float(b[1])) for b in blocks)
    t_s = '+'.join(str(int(b[2])) for b in blocks)
    for d in deltas:
      if not (usable(rdp_eps[d]) and usable(pld_eps[d])):
        skipped.append((q_s, s_s, t_s, d, rdp_eps[d], pld_eps[d]))
        continue
      rows.append([q_s, s_s, t_s, repr(float(d)), repr(rdp_eps[d]),
                   repr(pld_eps[d])])

  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w', newline='') as f:
    writer = csv.writer(f, lineterminator='\n')
    writer.writerow(HEADER)
    for i, row in enumerate(rows, start=1):
      writer.writerow([i] + row)

  for q_s, s_s, t_s, d, re, pe in skipped:
    print(f'skipped (eps inf or > {MAX_EPSILON}): q={q_s} sigma={s_s} '
          f'steps={t_s} delta={d!r} rdp={re!r} pld={pe!r}')
  print(f'wrote {len(rows)} rows to {args.out} '
        f'({len(skipped)} skipped, {time.time() - t_start:.1f}s)')


if __name__ == '__main__':
  main()
