"""--draft=tree: a static Medusa-style tree of candidates from the draft heads' top choices, verified in one
forward pass (mode=speculative, and speculative_sample by multi-draft rejection sampling).

The block is [last token, the tree's nodes] (`types.Tree`): the node at depth d drafts one of head d+1's top
`TREE_TOP` tokens at the accepted position, so sibling nodes are alternatives and a path is a chain. The
block is written to the cache in block order at slots start.., each node at RoPE position start + depth, and
attends to the history and its own ancestors only (`attention.tree_mask`). A node is accepted when its token
is head 0's argmax at its parent; the deepest path accepted throughout wins (the first such in block order),
head 0's argmax at its last node is the bonus token, and the path's keys and values move to slots
start..start+depth in every layer, so the cache holds exactly what a chain of those tokens would have
written. Output is greedy's tokens: every emitted token is head 0's argmax given the tokens before it.

speculative_sample walks the same tree with recursive rejection sampling over each node's children, whose
tokens are deterministic (the heads' top choices, distinct): at a node with target p (head 0 there, after
temperature / top-k / top-p) the children are tried in order, child i accepted with probability
p(x_i) / (1 - p(x_1) - ... - p(x_{i-1})) (p with the rejected siblings removed, renormalised); if every child is
rejected the token is drawn from that residual, and at an accepted leaf from p. Each step of the walk thus
emits x with probability exactly p(x), so the output follows `sample`'s distribution (SpecInfer's multi-draft
scheme with one-hot proposals; tests/test_draft_budget.py checks it by chi-square).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mtp_jax.decode.draft import adjusted_logprobs, draft_logits
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


def _parents(tree: Tree) -> np.ndarray:
  """[T] each slot's parent slot (the root's is itself)."""
  return tree.path[np.arange(len(tree.depth)), np.maximum(tree.depth - 1, 0)]


def tree_verify(p_logits, block, tree: Tree, key=None, sp=None, sampling: bool = False):
  """Head 0's logits p_logits [B, T, V] over the tree block [B, T]: (best slot [B], drafts accepted a [B], the
  token emitted after them [B], the accepted path's drafts as a chain [B, D], the path's slots [B, D+1]).
  Greedy: a node is accepted where it is head 0's argmax at its parent. sampling (key, sp): the recursive
  rejection walk of the module docstring."""
  parent, t = _parents(tree), len(tree.depth)
  if not sampling:
    target = jnp.argmax(p_logits, axis=-1)                                      # [B, T]
    ok = (block == target[:, parent]) | (np.arange(t) == 0)[None, :]
    best = _deepest_path(ok, tree)
    depth, chain, slots = _path(block, tree, best)
    return best, depth, take_at(target, best), chain, slots
  p = jnp.exp(adjusted_logprobs(p_logits, sp.temperature, sp.top_k, sp.top_p))   # [B, T, V]
  px = jnp.take_along_axis(p[:, parent], block[..., None], axis=-1)[..., 0]       # p at its parent of each node's token
  slot = np.arange(t)
  earlier = (parent[:, None] == parent[None, :]) & (slot[None, :] < slot[:, None]) & (slot[None, :] > 0)   # [T, T]
  rest = 1.0 - px @ earlier.T.astype(px.dtype)                     # mass left once the earlier siblings are removed
  k_accept, k_token = jax.random.split(key)
  accept = (jax.random.uniform(k_accept, px.shape) * rest < px) & (slot > 0)[None, :]
  chosen = accept & ~((accept.astype(jnp.int32) @ earlier.T.astype(jnp.int32)) > 0)   # the first accepted sibling
  best = _deepest_path(chosen | (slot == 0)[None, :], tree)
  # The residual at the last accepted node: its children (all rejected) removed; at a leaf, p itself.
  kids = jnp.asarray((parent[None, :] == slot[:, None]) & (slot[None, :] > 0))[best]   # [B, T]
  p_best = take_at(p, best)
  rows = jnp.arange(block.shape[0])[:, None]
  residual = p_best.at[rows, block].multiply(jnp.where(kids, 0.0, 1.0))
  residual = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, p_best)   # rounding only
  token = jax.random.categorical(k_token, jnp.log(residual), axis=-1)
  depth, chain, slots = _path(block, tree, best)
  return best, depth, token, chain, slots


def _deepest_path(ok, tree: Tree):
  """[B] the deepest slot whose whole path (it and its ancestors) is ok [B, T]; the first such in block order."""
  path_ok = jnp.all(jnp.where(tree.ancestors[None], ok[:, None, :], True), axis=-1)   # [B, T]
  return jnp.argmax(jnp.where(path_ok, tree.depth[None, :], -1), axis=-1)


def _path(block, tree: Tree, best):
  """(drafts accepted [B], the path to `best` as a chain of drafts [B, D], its slots [B, D+1])."""
  slots = jnp.asarray(tree.path)[best]                                          # [B, D+1]
  return jnp.asarray(tree.depth)[best], jnp.take_along_axis(block, slots[:, 1:], axis=1), slots


def keep_path(cache, start, slots):
  """The cache with each row's accepted path (block slots `slots` [B, D+1] from `start` [B]) moved to slots
  start..start+D in every layer (caches [B, KV, S, D] each: the per-head layout); slots past the path's depth
  are stale, past the row's position."""
  def move(x):
    got = jnp.take_along_axis(x, (start[:, None] + slots)[:, None, :, None], axis=2)
    return jax.vmap(lambda r, u, i: jax.lax.dynamic_update_slice_in_dim(r, u, i, 1))(x, got, start)
  return {**cache, "trunk": jax.tree.map(move, cache["trunk"]),
          "heads": None if cache["heads"] is None else jax.tree.map(move, cache["heads"])}
