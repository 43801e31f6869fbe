"""The model's layers as the decode loop runs them: weights rearranged once, KV caches, and the cached
forward pass (trunk + the heads that run in the verify pass) over a block.

Before the loop the weights are rearranged once (`decode_weights`): trunk layers unstacked, so a step
reads each layer in place, and the heads that run stacked, so parallel and linear heads are one
batched layer. These are model.py's own layers (Block, the head classes) applied with a cache, not a
second copy of the network.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtp_jax.decode.types import DecodeError
from mtp_jax.model import Block, MTPTransformer, ModelArgs, default_positions, init_cache, unembedding_rows


class Weights(NamedTuple):
  """The parameters as the decode loop reads them, rearranged once per generation by a program of
  their own, so the loop's program receives them ready-made (no slicing left for XLA to sink into
  the loop body)."""
  params: Any        # the model's own tree, embedding, final norm and unembedding only
  layers: tuple      # trunk layers unstacked: the training scan would copy each layer's slice every step
  heads: Any         # the heads that run in the verify pass, stacked on a leading axis (one batched layer)
  drafter: Any = None  # sequential modules 1..n_heads-1, stacked (they draft after the verify pass)
  draft_vocab: Any = None  # (token ids [N], their unembedding rows [N, d]): what drafts choose among; None: all


DRAFT_VOCAB = "draft_vocab"   # the decode-only entry of params that `with_draft_vocab` adds


def with_draft_vocab(params, ids, vocab_size: int):
  """params whose draft heads choose among `ids` only (for example the most frequent tokens, as FR-Spec
  does): a draft's unembedding then reads N rows instead of the vocabulary's V, which on a small model
  with a large vocabulary is most of a drafting head's cost. Verification still uses head 0's full
  vocabulary, so greedy and sampled outputs stay exact; only drafts outside `ids` are lost."""
  ids = np.asarray(ids)
  if ids.ndim != 1 or not len(ids) or not np.issubdtype(ids.dtype, np.integer):
    raise DecodeError(f"draft vocabulary: need a non-empty list of token ids, got shape {ids.shape} {ids.dtype}")
  if ids.min() < 0 or ids.max() >= vocab_size or len(np.unique(ids)) != len(ids):
    raise DecodeError(f"draft vocabulary: token ids must be distinct and in [0, {vocab_size})")
  return dict(params, **{DRAFT_VOCAB: jnp.asarray(ids, jnp.int32)})


def take_at(x, idx):
  """x[b, idx[b]] for x [B, k, ...], idx [B]."""
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 1)), axis=1)[:, 0]


def _verify_heads(args: ModelArgs, n_heads: int) -> int:
  """How many of the n_heads heads that run do so in the verify pass (the rest draft afterwards)."""
  return 1 if args.heads.reads_ahead else n_heads


def decode_weights(params, args: ModelArgs, n_heads: int, per_head: bool = False) -> Weights:
  """per_head: the verify-pass heads as a tuple of layers, not stacked (--draft=auto runs the first j+1 of them;
  a slice of a stack would copy it every step)."""
  trunk = params["trunk"]["layer"] if args.n_trunk_layers else None
  layers = tuple(jax.tree.map(lambda x: x[i], trunk) for i in range(args.n_trunk_layers))
  stack = lambda ids: jax.tree.map(lambda *xs: jnp.stack(xs), *(params[f"heads_{i}"] for i in ids)) if ids else None
  n_verify = _verify_heads(args, n_heads)
  shared = {k: v for k, v in params.items() if k in ("embed", "final_norm", "unembed")}
  vocab = None
  if DRAFT_VOCAB in params:
    ids = params[DRAFT_VOCAB]
    vocab = (ids, unembedding_rows(args, params, ids))
  heads = tuple(params[f"heads_{i}"] for i in range(n_verify)) if per_head else stack(range(n_verify))
  return Weights(shared, layers, heads, stack(range(n_verify, n_heads)), vocab)


def init_decode_cache(args: ModelArgs, batch: int, max_len: int, n_heads: int, per_head: bool = False) -> dict:
  """Zeroed caches: a (keys, values) pair per trunk layer, and the heads' (and drafting modules') caches
  stacked like their weights (per_head: a pair per verify-pass head, as `decode_weights`)."""
  n_verify = _verify_heads(args, n_heads)
  cache = init_cache(args, batch, max_len, n_heads=n_verify)
  trunk = cache["trunk"]
  if per_head and cache["heads"] is not None:
    cache["heads"] = tuple((cache["heads"][0][i], cache["heads"][1][i]) for i in range(n_verify))
  drafter = init_cache(args, batch, max_len, n_heads=n_heads - n_verify)["heads"] if n_heads > n_verify else None
  return {"trunk": tuple((trunk[0][i], trunk[1][i]) for i in range(args.n_trunk_layers)), "heads": cache["heads"],
          "drafter": drafter}


def run_heads(args: ModelArgs, heads, z, positions, segment_ids, cache, cache_index, prefill=False, tree=None):
  """Stacked heads on trunk output z [B, k, d]: hidden [n_heads, B, k, d] and their updated stacked cache.

  Parallel and linear heads all read z, so they run as ONE batched layer (vmap over the stacked
  parameters) rather than n layers one after another. Chained (causal) heads read the previous
  head's output and run in turn.
  """
  layer = args.heads.first(args)   # heads that run in the verify pass are all of head 0's class
  extra = {} if tree is None else {"tree": tree}   # a head layer without tree decoding never sees the argument
  apply = lambda p, x, c: layer.apply({"params": p}, x, positions, segment_ids, c, cache_index, prefill, **extra)
  if isinstance(heads, tuple):      # one layer per head (`decode_weights(per_head=True)`), each with its cache
    outs, new, h = [], [], z
    for p, c in zip(heads, cache if cache is not None else (None,) * len(heads)):
      h, c = apply(p, h if args.heads.chained else z, c)
      outs.append(h)
      new.append(c)
    return jnp.stack(outs), (tuple(new) if cache is not None else None)
  if not args.heads.chained:
    return jax.vmap(apply, in_axes=(0, None, 0))(heads, z, cache)
  n = jax.tree.leaves(heads)[0].shape[0]
  outs, h = [], z
  for i in range(n):
    h, c = apply(jax.tree.map(lambda x: x[i], heads), h, jax.tree.map(lambda x: x[i], cache))
    cache = jax.tree.map(lambda full, new: full.at[i].set(new), cache, c)
    outs.append(h)
  return jnp.stack(outs), cache


def forward_hidden(model: MTPTransformer, w: Weights, tokens, positions, cache, cache_index, prefill=False,
                   tree=None, trunk_out=False):
  """Trunk + heads with the cache: hidden states [n_heads, B, k, d] and the new cache.

  The same layers as the model's forward (Block), unrolled over the trunk: static code, no per-step copies.
  prefill=True: the cache is empty and `tokens` start at position 0, so attention stays within the block.
  tree: (block start [B], ancestors [k, k]): the block is a tree of candidates (decode/tree.py).
  trunk_out: also return the trunk's output z [B, k, d] (for heads run apart).
  """
  _, segment_ids = default_positions(tokens, positions)
  z = model.apply({"params": w.params}, tokens, method=MTPTransformer.embed_tokens)
  block, trunk_cache = Block(model.args), []
  for layer, c in zip(w.layers, cache["trunk"]):
    z, c = block.apply({"params": layer}, z, positions, segment_ids, c, cache_index, prefill, tree=tree)
    trunk_cache.append(c)
  hidden, head_cache = run_heads(model.args, w.heads, z, positions, segment_ids, cache["heads"], cache_index, prefill,
                                 tree)
  cache = {**cache, "trunk": tuple(trunk_cache), "heads": head_cache}
  return (hidden, cache, z) if trunk_out else (hidden, cache)


def unembed(model, params, h):
  """Shared norm + unembedding, applied only where logits are needed (not at every prompt position)."""
  return model.apply({"params": params}, h, method=MTPTransformer.logits).astype(jnp.float32)
