"""--draft=auto's cost table: C(j), what a step verifying j drafts costs over a greedy step (and, where auto has
a tree, C(cap + 1): what its tree step costs), timed on the host
once per compiled program (batch size, prompt bucket, model, settings) with that program itself, and kept
for the process.

A timing run forces the draft length to j (a cost table that only j can win, no probes) and stops after a given
number of steps (`Budget.limit`): the difference between a run of 1 + n steps and a run of 1 step is n steps of
length j, the prefill, refills and copies cancelling. Every draft counts as rejected there (`Budget.timing`), so
each length is timed over the same positions: a run that accepted drafts would reach longer contexts, whose
attention costs more, and overstate the cost of drafting (C(1) = 1.75 where a whole generation's steps gave
1.38 on the n=4 bytes model). EOS is off and n is small enough that no row finishes,
so every timed step runs at the full batch. Each round times every length back to back and divides by its own
greedy step, and the median round counts: on a shared machine a burst of load then spoils one ratio, not the
table (the fastest of each length, taken apart, gave C(1) = 1.04 at batch 8 where a run showed 1.45).
"""
from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np

from mtp_jax.decode.types import Settings

TIMED_STEPS = 32     # steps per timing run (fewer where max_new_tokens would let a row finish)
REPEATS = 5          # rounds over every draft length; each round's ratios to its own greedy step, the median counts
_COSTS: dict = {}


def step_costs(fn, params, tokens, lengths, key, sp, settings: Settings) -> tuple[np.ndarray, float]:
  """(C [settings.options] with C(0) = 1, seconds spent timing: 0 once cached) for the compiled program `fn`."""
  if fn in _COSTS:
    return _COSTS[fn], 0.0
  start = time.perf_counter()
  options = settings.options
  steps = min(TIMED_STEPS, settings.max_new_tokens - 2)   # one token a step (Budget.timing): no row finishes
  ratios = []
  no_eos = sp._replace(eos_id=jnp.int32(-1))

  def timed(j: int, limit: int):
    forced = np.full(options, 1e9, np.float32)
    forced[j] = 1.0
    t0 = time.perf_counter()
    out = fn(params, tokens, lengths, key, no_eos, settings.budget(forced, limit=limit, explore=0, timing=True))
    ran = int(out.steps)   # waits for the whole program
    return time.perf_counter() - t0, ran

  for _ in range(REPEATS if steps >= 1 else 0):
    per_step = np.full(options, np.nan)
    for j in range(options):
      (t1, s1), (t2, s2) = timed(j, 1), timed(j, 1 + steps)
      if s2 > s1 and t2 > t1:
        per_step[j] = (t2 - t1) / (s2 - s1)
    if np.all(np.isfinite(per_step)):
      ratios.append(per_step / per_step[0])
  costs = np.ones(options, np.float32)   # unmeasurable (no step to time): every length costs a greedy step
  if ratios:
    costs = np.median(np.stack(ratios), axis=0).astype(np.float32)
  _COSTS[fn] = costs
  return costs, time.perf_counter() - start


def clear_costs() -> None:
  _COSTS.clear()
