"""Drafting and verification: how a block's drafts are checked against head 0, and how the next drafts
are made.

A step's drafts are verified by head 0 at the block's positions. `speculative` accepts a draft when it
equals head 0's argmax, so it emits greedy's tokens exactly; `speculative_sample` accepts draft x with
probability min(1, p(x)/q(x)) and otherwise samples max(0, p - q) (Leviathan et al. 2023), so it draws
from `sample`'s distribution exactly. p is head 0's and q the drafting head's distribution, both after
the same temperature / top-k / top-p (`adjusted_logprobs`).

Every drafting scheme is a drafter behind one interface, `drafter(a, token, key) -> (drafts, log q,
state updates or None)`, which the compiled loop calls after verifying (`drafter_for` picks it): heads
that ran in the verify pass read their hidden states there (`draft_heads_at`); sequential modules run
afterwards (`_draft_modules`).

DeepSeek-V3's sequential modules (head_type="sequential") read the embedding of a later token
(module k at position p reads x_{p+k}), so they cannot draft inside the verify pass: the verify pass
runs head 0 only, then modules 1..n-1 draft in turn (module k embeds draft k-1), each with its own
KV cache, over the block and the D-1 positions before it, whose cache entries were computed from
drafts. Drafts are the modules' argmax (or samples, with q the module's distribution given the
drafts before it), so greedy and speculative sampling stay exact as for the other heads.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mtp_jax.decode.forward import Weights, take_at
from mtp_jax.decode.types import SamplingParams, Settings
from mtp_jax.model import MTPModule, MTPTransformer


def adjusted_logprobs(logits, temperature, top_k, top_p):
  """Log-probabilities after temperature, top-k and top-p; filtered-out tokens get -inf.

  Target (head 0) and drafts (heads 1..n-1) both go through this, so the speculative sampler's
  target is exactly the distribution that `sample` draws from.
  """
  x = logits.astype(jnp.float32) / temperature
  v = x.shape[-1]
  desc = -jnp.sort(-x, axis=-1)
  kth = jnp.take(desc, jnp.clip(top_k - 1, 0, v - 1), axis=-1)[..., None]
  drop_k = lambda y: jnp.where((top_k > 0) & (y < kth), -jnp.inf, y)
  x, desc = drop_k(x), drop_k(desc)
  probs = jax.nn.softmax(desc, axis=-1)
  # Smallest top set with mass >= top_p. top_p >= 1 keeps all (rounding could drop tiny tails).
  keep = (jnp.cumsum(probs, axis=-1) - probs < top_p) | (top_p >= 1.0)
  cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
  return jax.nn.log_softmax(jnp.where(x < cutoff, -jnp.inf, x), axis=-1)


def verify(p_logits, drafts, draft_logq, key, sp: SamplingParams, sampling: bool):
  """Check a block's drafts against head 0.

  p_logits [B, k, V]: head 0 at the block's k positions; drafts [B, k-1] for positions 1..k-1.
  Returns a [B] (drafts accepted, a prefix), the token head 0 emits after them [B], and ok [B, k-1].
  """
  k = p_logits.shape[1]
  if not sampling:
    target = jnp.argmax(p_logits, axis=-1)                        # [B, k]
    ok = drafts == target[:, :k - 1]
    a = jnp.sum(jnp.cumprod(ok, axis=1), axis=1)
    return a, take_at(target, a), ok
  k_accept, k_token = jax.random.split(key)
  p = jnp.exp(adjusted_logprobs(p_logits, sp.temperature, sp.top_k, sp.top_p))   # [B, k, V]
  q = jnp.exp(draft_logq)                                                          # [B, k-1, V]
  px = jnp.take_along_axis(p[:, :k - 1], drafts[..., None], axis=-1)[..., 0]
  qx = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
  ok = jax.random.uniform(k_accept, qx.shape) * qx < px          # accept with prob min(1, p/q)
  a = jnp.sum(jnp.cumprod(ok, axis=1), axis=1)
  # First rejection at j: resample from max(0, p - q) there; all accepted: a bonus token from p.
  residual = jnp.concatenate([jnp.maximum(p[:, :k - 1] - q, 0.0), p[:, k - 1:]], axis=1)
  r, p_a = take_at(residual, a), take_at(p, a)
  r = jnp.where(jnp.sum(r, axis=-1, keepdims=True) > 0, r, p_a)  # p == q up to rounding: never rejected anyway
  return a, jax.random.categorical(k_token, jnp.log(r), axis=-1), ok


def draft_logits(model, params, vocab, normed):
  """Logits of normed hidden states [..., d] over what drafts choose among: the vocabulary [..., V], or
  the draft vocabulary's N tokens [..., N] (`with_draft_vocab`)."""
  if vocab is None:
    return model.apply({"params": params}, normed, method=MTPTransformer.unembed_normed).astype(jnp.float32)
  return jnp.einsum("...d,nd->...n", normed, vocab[1].astype(normed.dtype)).astype(jnp.float32)


def _pick(logits, key, sp: SamplingParams, sampling: bool, vocab=None, vocab_size: int = 0):
  """Draft tokens from draft_logits: the argmax, or a sample and its log q [..., V] (-inf outside a draft
  vocabulary: q is the law the draft was drawn from, which is all that exact rejection sampling needs)."""
  if not sampling:
    x = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return (x if vocab is None else vocab[0][x]), None
  logq = adjusted_logprobs(logits, sp.temperature, sp.top_k, sp.top_p)
  x = jax.random.categorical(key, logq, axis=-1).astype(jnp.int32)
  if vocab is None:
    return x, logq
  full = jnp.full(logq.shape[:-1] + (vocab_size,), -jnp.inf, logq.dtype).at[..., vocab[0]].set(logq)
  return vocab[0][x], full


def draft_heads_at(model, params, vocab, hidden, a, key, sp: SamplingParams, sampling: bool):
  """Heads 1..n-1 (hidden [n-1, B, k, d]) at block index a [B]: draft tokens [B, n-1], when sampling their
  log q [B, n-1, V], and no cache to update (these heads ran in the verify pass)."""
  b, v = a.shape[0], model.args.vocab_size
  if hidden.shape[0] == 0:   # no draft heads run (greedy, sample, n_future=1)
    return jnp.zeros((b, 0), jnp.int32), (jnp.zeros((b, 0, v), jnp.float32) if sampling else None), None
  h = jax.vmap(lambda hh: take_at(hh, a))(hidden)                   # [n-1, B, d]
  normed = model.apply({"params": params}, 0, h, method=MTPTransformer.output_norm)
  logits = jnp.swapaxes(draft_logits(model, params, vocab, normed), 0, 1)   # [B, n-1, V or N]
  return (*_pick(logits, key, sp, sampling, vocab, v), None)


def _draft_modules(model, w: Weights, sp: SamplingParams, sampling: bool, h0, block, pos0, recent, cache, prefill,
                   offset, a, token, key):
  """Sequential modules 1..D draft in turn after the verify pass; returns (drafts [B, D], log q [B, D, V]
  when sampling, {'cache': the modules' stacked cache, 'recent': the new `recent`}).

  Module k at position p reads h^(k-1)_p and x_{p+k}, so its cache entry at p is final only once
  x_{p+k} is verified: entries at the k-1 positions before the block were computed from drafts. So
  every module reruns a window of the D-1 positions before the block (from `recent`: head 0's hidden
  states and the tokens there) and the block [B, k] (h0: head 0 over it), from the window's start
  S0 = max(pos0 - (D-1), 0); the verified position is block index offset + a, E-1 (E: the token
  just emitted). Module k drafts x_{E+k} at E-1 from the drafts before it.
  """
  args, kk = model.args, block.shape[1]
  n_mod = jax.tree.leaves(w.drafter)[0].shape[0]
  back, width = n_mod - 1, n_mod - 1 + kk
  s0 = jnp.maximum(pos0 - back, 0)
  lead = pos0 - s0                                     # block index 0 in the window (< back near the start)
  window = lambda buf, x, pad: jax.vmap(lambda r, i: jax.lax.dynamic_slice_in_dim(r, i, width, 0))(
      jnp.concatenate([buf, x, pad], axis=1), back - lead)
  h = window(recent[0], h0.astype(recent[0].dtype), jnp.zeros_like(recent[0]))
  seqs = window(recent[1], block.astype(jnp.int32), jnp.zeros_like(recent[1]))       # x at the window's positions
  idx = lead + offset + a                              # E-1 in the window
  seqs = jnp.pad(seqs, ((0, 0), (0, n_mod + 1)))
  col = jnp.arange(seqs.shape[1])[None, :]
  seqs = jnp.where(col == idx[:, None] + 1, token[:, None].astype(jnp.int32), seqs)   # x_E
  # The D-1 positions before the next block (E-D+1 .. E-1) are verified now: the next window's start.
  shifted = lambda x: jax.vmap(lambda r, i: jax.lax.dynamic_slice_in_dim(r, i, back, 0))(
      jnp.concatenate([jnp.zeros_like(x[:, :back]), x], axis=1), idx + 1)
  new_recent = (shifted(h), shifted(seqs))
  positions = s0[:, None] + jnp.arange(width)[None, :]
  segment_ids = jnp.ones_like(positions)
  module = MTPModule(args)
  keys = jax.random.split(key, n_mod) if sampling else [key] * n_mod
  drafts, logqs = [], []
  for k in range(n_mod):   # D is small and static; each module needs the previous one's draft
    p, c = jax.tree.map(lambda x: x[k], w.drafter), jax.tree.map(lambda x: x[k], cache)
    emb = model.apply({"params": w.params}, seqs[:, k + 1:k + 1 + width], method=MTPTransformer.embed_tokens)
    h, c = module.apply({"params": p}, h, emb, positions, segment_ids, c, s0, prefill)
    cache = jax.tree.map(lambda full, new: full.at[k].set(new), cache, c)
    normed = module.apply({"params": p}, take_at(h, idx)[:, None], method=MTPModule.output_norm)   # [B, 1, d]
    logits = draft_logits(model, w.params, w.draft_vocab, normed)[:, 0]
    x, logq = _pick(logits, keys[k], sp, sampling, w.draft_vocab, args.vocab_size)
    seqs = jnp.where(col == (idx + k + 2)[:, None], x[:, None], seqs)                   # x_{E+k+1}
    drafts.append(x)
    logqs.append(logq)
  return jnp.stack(drafts, axis=1), (jnp.stack(logqs, axis=1) if sampling else None), {"cache": cache,
                                                                                        "recent": new_recent}


def drafter_for(model, w: Weights, settings: Settings, sp, state, hidden, block, pos0, offset, prefill):
  """drafter(a, token, key) -> (drafts, log q, state updates or None), drafting at block index offset + a.

  Heads that drafted inside the verify pass (hidden [n_heads, B, k, d]) read their hidden states
  there; sequential modules run now, after it. offset None: a step (offset 0); else the prefill's
  last prompt index [B].
  """
  if w.drafter is None:
    h = hidden[1:] if offset is None else jax.vmap(lambda hh: take_at(hh, offset)[:, None])(hidden[1:])
    return lambda a, token, key: draft_heads_at(model, w.params, w.draft_vocab, h, a, key, sp, settings.sampling)
  return lambda a, token, key: _draft_modules(
      model, w, sp, settings.sampling, hidden[0], block, pos0, state.recent, state.cache["drafter"], prefill,
      0 if offset is None else offset, a, token, key)
