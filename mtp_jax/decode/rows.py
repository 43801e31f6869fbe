"""The decode loop's rows: each prompt's results as its row ends, and a batch's rows moved between batches
(compaction into a smaller batch, a finished row refilled with the next prompt's one-row state)."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtp_jax.decode.types import Array, DecodeState


class Results(NamedTuple):
  """Every caller row's output fields, written as the stage holding the row ends."""
  tokens: Array
  count: Array
  forwards: Array
  accepted: Array
  proposed: Array

  def record(self, slots, state: DecodeState) -> "Results":
    return Results(*(full.at[slots].set(getattr(state, f)) for full, f in zip(self, self._fields)))


# The batch axis of each cache (stacked head and drafter caches have their stack first) and the
# per-row state fields; the step count and the key belong to the whole batch.
CACHE_BATCH_AXIS = {"trunk": 0, "heads": 1, "drafter": 1}
ROW_FIELDS = ("tokens", "count", "position", "drafts", "draft_logq", "done", "forwards", "accepted", "proposed",
               "recent", "stale", "src", "tree_sel", "tree_tokens")


def map_rows(fn, state: DecodeState, *others: DecodeState) -> DecodeState:
  """state with fn(x, *ys, axis=batch axis) applied to every per-row leaf (ys: the same leaf of `others`)."""
  each = lambda axis, x, *ys: jax.tree.map(lambda a, *bs: fn(a, *bs, axis=axis), x, *ys)
  per_head = isinstance(state.cache["heads"], tuple) and isinstance(state.cache["heads"][0], tuple)   # --draft=auto
  axes = {**CACHE_BATCH_AXIS, "heads": 0} if per_head else CACHE_BATCH_AXIS
  cache = {k: each(axis, state.cache[k], *(o.cache[k] for o in others)) for k, axis in axes.items()}
  return state.replace(cache=cache, **{f: each(0, getattr(state, f), *(getattr(o, f) for o in others))
                                       for f in ROW_FIELDS})


def select_rows(state: DecodeState, keep) -> DecodeState:
  """The decode state of rows `keep` only: a smaller batch (caches keep their slots)."""
  return map_rows(lambda x, axis: jnp.take(x, keep, axis=axis), state)


def put_row(state: DecodeState, r, fresh: DecodeState) -> DecodeState:
  """state with row r replaced by the one-row state `fresh` (its cache included)."""
  return map_rows(lambda x, y, axis: jax.lax.dynamic_update_slice_in_dim(x, y.astype(x.dtype), r, axis),
                   state, fresh)
