"""--draft=tree and bestfirst: a tree of candidates from the draft heads' top choices, verified in one forward
pass (mode=speculative, and speculative_sample by multi-draft rejection sampling).

--draft=tree uses a static Medusa-style tree (`types.Tree`). --draft=bestfirst builds each row's tree at every
step, as DDTree does from per-position marginals: of every path of 1..D choices among each head's top K
tokens (`types.Candidates`; K = --tree_top, default BEST_FIRST_TOP), the N most probable under the heads' own
probabilities (a path's probability: the product of its choices'), N = --tree_nodes (default: the static tree's
node count; --draft=tree takes the first --tree_nodes of its paths). A parent is at least as probable as
its child, so the N form a tree; in block order (breadth first) parents come first. The verify step reads each
row's tree from the candidates it drafted (`DecodeState.tree_sel`), so the masks and positions are per row.

The block is [last token, the tree's nodes]: the node at depth d drafts one of head d+1's top tokens at the
accepted position, so sibling nodes are alternatives and a path is a chain. The
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

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtp_jax.decode.draft import adjusted_logprobs, draft_logits
from mtp_jax.decode.forward import Weights, take_at
from mtp_jax.decode.types import TREE_TOP, Candidates, Tree
from mtp_jax.model import MTPTransformer


class RowTrees(NamedTuple):
  """Each row's tree, T = 1 + nodes block slots (slot 0 the root): arrays with a leading batch axis."""
  depth: jax.Array       # [B, T]
  ancestors: jax.Array   # [B, T, T] bool: slot j is slot i or one of its ancestors
  path: jax.Array        # [B, T, D+1] the slots on the path to slot i by depth (past its depth: i again)

  @classmethod
  def static(cls, tree: Tree, b: int) -> "RowTrees":
    """The static tree in every row."""
    every = lambda x: jnp.broadcast_to(jnp.asarray(x), (b,) + x.shape)
    return cls(every(tree.depth), every(tree.ancestors), every(tree.path))

  @classmethod
  def best_first(cls, sel, cands: Candidates) -> "RowTrees":
    """The trees of candidates sel [B, N] (ascending, so parents first)."""
    b, n = sel.shape
    depth = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), jnp.asarray(cands.depth)[sel]], axis=1)   # [B, T]
    slot_of = jnp.zeros((b, len(cands.depth)), jnp.int32).at[jnp.arange(b)[:, None], sel].set(
        jnp.arange(1, n + 1, dtype=jnp.int32)[None, :])                         # candidate -> its slot in the row
    by_depth = jnp.take_along_axis(slot_of, jnp.asarray(cands.path)[sel].reshape(b, -1), axis=1).reshape(
        b, n, -1)                                                               # [B, N, D] slots of the path
    path = jnp.concatenate([jnp.zeros((b, n, 1), jnp.int32), by_depth], axis=2)   # the root first
    path = jnp.concatenate([jnp.zeros((b, 1, path.shape[2]), jnp.int32), path], axis=1)   # the root's own: 0s
    t = n + 1
    on_path = (path[:, :, :, None] == jnp.arange(t)[None, None, None, :]) & (
        jnp.arange(path.shape[2])[None, None, :, None] <= depth[:, :, None, None])
    return cls(depth, jnp.any(on_path, axis=2), path)

  def parents(self):
    """[B, T] each slot's parent slot (the root's is itself)."""
    return jnp.take_along_axis(self.path, jnp.maximum(self.depth - 1, 0)[..., None], axis=2)[..., 0]


def _head_logits(model, w: Weights, hidden, idx):
  """The draft heads' logits [D, B, V or N] at block index idx [B] (hidden [D, B, k, d])."""
  h = jax.vmap(lambda hh: take_at(hh, idx))(hidden)                            # [D, B, d]
  normed = model.apply({"params": w.params}, 0, h, method=MTPTransformer.output_norm)
  return draft_logits(model, w.params, w.draft_vocab, normed)


def _ids(w: Weights, top):
  return top if w.draft_vocab is None else w.draft_vocab[0][top]


def tree_drafts(model, w: Weights, hidden, idx, tree: Tree):
  """The static tree's node tokens [B, T-1] from the draft heads' states hidden [D, B, k, d] at block index idx."""
  return chain_and_tree(model, w, hidden, idx, tree)[1]


def chain_and_tree(model, w: Weights, hidden, idx, tree: Tree):
  """(the chain's drafts [B, D], each head's argmax; the static tree's node tokens [B, T-1]) from one top-k of
  the draft heads' logits at block index idx (hidden [D, B, k, d]): --draft=auto with a tree drafts both, so
  that the next step may verify either."""
  top = _ids(w, jax.lax.top_k(_head_logits(model, w, hidden, idx), TREE_TOP)[1].astype(jnp.int32))   # [D, B, K]
  return top[:, :, 0].T, top[tree.depth[1:] - 1, :, tree.choice[1:]].T


def path_counts(trees: RowTrees, best, tree: Tree, depths: int):
  """What a greedy tree step saw, for --draft=auto's running counts: (per node [2, B, T-1]: its parent was on the
  accepted path (reached), it is on it (accepted); per chain depth [2, B, depths]: the same for the argmax path's
  node at that depth, the chain's draft there (0 where the tree has none))."""
  on_path = take_at(trees.ancestors, best)                                     # [B, T]: ancestors of best, itself
  nodes = jnp.stack([jnp.take_along_axis(on_path, trees.parents(), axis=1), on_path])[:, :, 1:].astype(jnp.float32)
  chain = (tree.argmax[1:, None] & (tree.depth[1:, None] == jnp.arange(1, depths + 1)[None, :])).astype(jnp.float32)
  return nodes, nodes @ chain                                                  # [2, B, T-1], [2, B, depths]


def best_first_drafts(model, w: Weights, hidden, idx, cands: Candidates, n: int):
  """(the node tokens [B, n], the candidates chosen [B, n], ascending): each row's n most probable candidate
  paths under the heads' log-probabilities at block index idx."""
  logp = jax.nn.log_softmax(_head_logits(model, w, hidden, idx), axis=-1)        # [D, B, V or N]
  vals, top = jax.lax.top_k(logp, cands.top)                                   # [D, B, K]
  d, b = top.shape[:2]
  flat = jnp.moveaxis(vals, 0, 1).reshape(b, d * cands.top)                    # [B, D*K]
  score = flat @ jnp.asarray(cands.picks).T                                    # [B, C] a path's log-probability
  sel = jnp.sort(jax.lax.top_k(score, n)[1].astype(jnp.int32), axis=1)
  tokens = _ids(w, top.astype(jnp.int32))[jnp.asarray(cands.depth)[sel] - 1, jnp.arange(b)[:, None],
                                          jnp.asarray(cands.choice)[sel]]
  return tokens, sel


def tree_verify(p_logits, block, trees: RowTrees, key=None, sp=None, sampling: bool = False):
  """Head 0's logits p_logits [B, T, V] over the tree block [B, T]: (best slot [B], drafts accepted a [B], the
  token emitted after them [B], the accepted path's drafts as a chain [B, D], the path's slots [B, D+1]).
  Greedy: a node is accepted where it is head 0's argmax at its parent. sampling (key, sp): the recursive
  rejection walk of the module docstring."""
  parent, t = trees.parents(), block.shape[1]
  slot = jnp.arange(t)
  if not sampling:
    target = jnp.argmax(p_logits, axis=-1)                                      # [B, T]
    ok = (block == jnp.take_along_axis(target, parent, axis=1)) | (slot == 0)[None, :]
    best = _deepest_path(ok, trees)
    depth, chain, slots = _path(block, trees, best)
    return best, depth, take_at(target, best), chain, slots
  p = jnp.exp(adjusted_logprobs(p_logits, sp.temperature, sp.top_k, sp.top_p))   # [B, T, V]
  p_parent = jnp.take_along_axis(p, parent[..., None], axis=1)                   # [B, T, V]
  px = jnp.take_along_axis(p_parent, block[..., None], axis=-1)[..., 0]          # p at its parent of each node's token
  earlier = ((parent[:, :, None] == parent[:, None, :]) & (slot[None, None, :] < slot[None, :, None])
             & (slot > 0)[None, None, :])                                      # [B, T, T] earlier siblings
  rest = 1.0 - jnp.einsum("bs,bts->bt", px, earlier.astype(px.dtype))   # mass left once they are removed
  k_accept, k_token = jax.random.split(key)
  accept = (jax.random.uniform(k_accept, px.shape) * rest < px) & (slot > 0)[None, :]
  chosen = accept & ~jnp.any(accept[:, None, :] & earlier, axis=2)             # the first accepted sibling
  best = _deepest_path(chosen | (slot == 0)[None, :], trees)
  # The residual at the last accepted node: its children (all rejected) removed; at a leaf, p itself.
  kids = (parent == best[:, None]) & (slot > 0)[None, :]                          # [B, T]
  p_best = take_at(p, best)
  rows = jnp.arange(block.shape[0])[:, None]
  residual = p_best.at[rows, block].multiply(jnp.where(kids, 0.0, 1.0))
  residual = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, p_best)   # rounding only
  token = jax.random.categorical(k_token, jnp.log(residual), axis=-1)
  depth, chain, slots = _path(block, trees, best)
  return best, depth, token, chain, slots


def _deepest_path(ok, trees: RowTrees):
  """[B] the deepest slot whose whole path (it and its ancestors) is ok [B, T]; the first such in block order."""
  path_ok = jnp.all(jnp.where(trees.ancestors, ok[:, None, :], True), axis=-1)   # [B, T]
  return jnp.argmax(jnp.where(path_ok, trees.depth, -1), axis=-1)


def _path(block, trees: RowTrees, best):
  """(drafts accepted [B], the path to `best` as a chain of drafts [B, D], its slots [B, D+1])."""
  slots = take_at(trees.path, best)                                             # [B, D+1]
  return take_at(trees.depth, best), jnp.take_along_axis(block, slots[:, 1:], axis=1), slots


def keep_path(cache, start, slots):
  """The cache with each row's accepted path (block slots `slots` [B, D+1] from `start` [B]) moved to slots
  start..start+D in every layer (caches [B, KV, S, D] each: the per-head layout); slots past the path's depth
  are stale, past the row's position."""
  def move(x):
    got = jnp.take_along_axis(x, (start[:, None] + slots)[:, None, :, None], axis=2)
    return jax.vmap(lambda r, u, i: jax.lax.dynamic_update_slice_in_dim(r, u, i, 1))(x, got, start)
  return {**cache, "trunk": jax.tree.map(move, cache["trunk"]),
          "heads": None if cache["heads"] is None else jax.tree.map(move, cache["heads"])}
