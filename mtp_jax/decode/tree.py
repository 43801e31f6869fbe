"""--draft=tree: a static Medusa-style tree of candidates from the draft heads' top choices, verified in one
forward pass (greedy, mode=speculative).

The block is [last token, the tree's nodes] (`types.Tree`): the node at depth d drafts one of head d+1's top
`TREE_TOP` tokens at the accepted position, so sibling nodes are alternatives and a path is a chain. The
block is written to the cache in block order at slots start.., each node at RoPE position start + depth, and
attends to the history and its own ancestors only (`attention.tree_mask`). A node is accepted when its token
is head 0's argmax at its parent; the deepest path accepted throughout wins (the first such in block order),
head 0's argmax at its last node is the bonus token, and the path's keys and values move to slots
start..start+depth in every layer, so the cache holds exactly what a chain of those tokens would have
written. Output is greedy's tokens: every emitted token is head 0's argmax given the tokens before it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mtp_jax.decode.draft import draft_logits
from mtp_jax.decode.forward import Weights, take_at
from mtp_jax.decode.types import TREE_TOP, Tree
from mtp_jax.model import MTPTransformer


def tree_drafts(model, w: Weights, hidden, idx, tree: Tree):
  """The tree's node tokens [B, T-1] from the draft heads' states hidden [D, B, k, d] at block index idx [B]."""
  h = jax.vmap(lambda hh: take_at(hh, idx))(hidden)                            # [D, B, d]
  normed = model.apply({"params": w.params}, 0, h, method=MTPTransformer.output_norm)
  logits = draft_logits(model, w.params, w.draft_vocab, normed)                 # [D, B, V or N]
  top = jax.lax.top_k(logits, TREE_TOP)[1].astype(jnp.int32)                   # [D, B, K]
  if w.draft_vocab is not None:
    top = w.draft_vocab[0][top]
  return top[tree.depth[1:] - 1, :, tree.choice[1:]].T                         # [B, T-1]


def tree_verify(p_logits, block, tree: Tree):
  """Head 0's logits p_logits [B, T, V] over the tree block [B, T]: (best slot [B], drafts accepted a [B], the
  bonus token [B], the accepted path's drafts as a chain [B, D], the path's slots [B, D+1])."""
  target = jnp.argmax(p_logits, axis=-1)                                        # [B, T]
  parent = tree.path[np.arange(len(tree.depth)), np.maximum(tree.depth - 1, 0)]     # static; the root's is itself
  ok = (block == target[:, parent]) | (np.arange(len(tree.depth)) == 0)[None, :]
  path_ok = jnp.all(jnp.where(tree.ancestors[None], ok[:, None, :], True), axis=-1)   # [B, T]
  best = jnp.argmax(jnp.where(path_ok, tree.depth[None, :], -1), axis=-1)
  slots = jnp.asarray(tree.path)[best]                                          # [B, D+1]
  chain = jnp.take_along_axis(block, slots[:, 1:], axis=1)
  return best, jnp.asarray(tree.depth)[best], take_at(target, best), chain, slots


def keep_path(cache, start, slots):
  """The cache with each row's accepted path (block slots `slots` [B, D+1] from `start` [B]) moved to slots
  start..start+D in every layer (caches [B, KV, S, D] each: the per-head layout); slots past the path's depth
  are stale, past the row's position."""
  def move(x):
    got = jnp.take_along_axis(x, (start[:, None] + slots)[:, None, :, None], axis=2)
    return jax.vmap(lambda r, u, i: jax.lax.dynamic_update_slice_in_dim(r, u, i, 1))(x, got, start)
  return {**cache, "trunk": jax.tree.map(move, cache["trunk"]),
          "heads": None if cache["heads"] is None else jax.tree.map(move, cache["heads"])}
