"""KV-cached decoding as one jit-compiled program: a prefill, then one `jax.lax.while_loop`.

Every mode is the same loop over *blocks*. A step feeds each row's block [last token, drafts]
(k tokens) at the row's own cache position, verifies the drafts with head 0, emits the accepted
drafts plus one token from head 0 (1..k tokens), and drafts the next block with heads 1..n-1 at
the last accepted position. `greedy` and `sample` are the case k=1 (no drafts, only head 0 run):
the reference next-token decoders. `speculative` accepts a draft when it equals head 0's argmax,
so it emits greedy's tokens exactly; `speculative_sample` accepts draft x with probability
min(1, p(x)/q(x)) and otherwise samples max(0, p - q) (Leviathan et al. 2023), so it draws from
`sample`'s distribution exactly. p is head 0's and q the drafting head's distribution, both after
the same temperature / top-k / top-p.

DeepSeek-V3's sequential modules (head_type="sequential") read the embedding of a later token
(module k at position p reads x_{p+k}), so they cannot draft inside the verify pass: the verify pass
runs head 0 only, then modules 1..n-1 draft in turn (module k embeds draft k-1), each with its own
KV cache, over the block and the D-1 positions before it, whose cache entries were computed from
drafts (`_draft_modules`). Drafts are the modules' argmax (or samples, with q the module's
distribution given the drafts before it), so greedy and speculative sampling stay exact as for
the other heads.

Before the loop the weights are rearranged once (`decode_weights`): trunk layers unstacked, so a step
reads each layer in place, and the heads that run stacked, so parallel and linear heads are one
batched layer. Greedy and sample run (and cache) head 0 only.

The prefill attends within the prompt only (nothing is cached before it) and writes its keys and
values to the cache. Shapes are static: prompts are right-padded to a bucket P, the cache holds
P + max_new_tokens + n_future slots, and rejected drafts' cache slots lie past the row's position
(masked by the model) until the next block overwrites them. Rows that are done stay in the batch,
frozen, until at most half the batch is active; then the active rows move into a batch half the
size (argmax modes; see `decode`). Given more prompts than rows (`slots`), a finished row takes the next
prompt instead, as serving systems do (continuous batching, `_serve_queue`), and compaction ends the last batch.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, NamedTuple, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mtp_jax.errors import UserError
from mtp_jax.model import Block, MTPModule, MTPTransformer, ModelArgs, default_positions, init_cache

Array = jax.Array
MODES = ("greedy", "speculative", "sample", "speculative_sample")
PAD = -1          # marks output slots past a row's end


class DecodeError(UserError):
  """A decoding request that cannot run (bad prompt, length, mode or sampling setting)."""


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything static about a decode: changing any of it compiles a new program."""
  mode: str
  max_new_tokens: int
  n_future: int
  batch_shards: int = 1   # the batch's split over devices: compaction keeps every stage a multiple of it
  slots: int = 0          # rows decoded at once; fewer than the prompts: finished rows take the next prompt
                          # (argmax modes). 0: every prompt at once

  def stages(self, batch: int) -> tuple:
    """Batch sizes the loop runs at, in turn (see `decode`): halving while the half is >= 2 rows and
    splits over the batch's shards. Sampling modes run at one size, so that their draws do not
    depend on how the batch was compacted."""
    sizes = [batch]
    while not self.sampling and sizes[-1] // 2 >= max(2, self.batch_shards) and sizes[-1] // 2 % self.batch_shards == 0:
      sizes.append(sizes[-1] // 2)
    return tuple(sizes)

  def batch(self, n_prompts: int) -> int:
    """Rows the loop decodes at once for n_prompts prompts."""
    return min(self.slots, n_prompts) if self.slots else n_prompts

  @property
  def speculative(self) -> bool:
    return self.mode in ("speculative", "speculative_sample") and self.n_future > 1

  @property
  def sampling(self) -> bool:
    return self.mode in ("sample", "speculative_sample")

  @property
  def block(self) -> int:       # tokens fed per step: last token + k-1 drafts
    return self.n_future if self.speculative else 1

  @property
  def heads_run(self) -> int:   # greedy and sample need head 0 only
    return self.block


class SamplingParams(NamedTuple):
  """Traced scalars, so new values never recompile. top_k=0 and top_p=1 switch those filters off."""
  temperature: Array
  top_k: Array
  top_p: Array
  eos_id: Array     # -1: no end-of-sequence token

  @classmethod
  def of(cls, temperature=1.0, top_k=0, top_p=1.0, eos_id: Optional[int] = None) -> "SamplingParams":
    """From Python numbers, with the dtypes the compiled loop was traced with."""
    return cls(jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p), jnp.int32(-1 if eos_id is None else eos_id))


@flax.struct.dataclass
class DecodeState:
  cache: Any
  tokens: Array      # [B, max_new + k] generated tokens; slots at and past `count` are scratch
  count: Array       # [B] tokens generated so far
  position: Array    # [B] position of the last generated token: where the next block starts
  drafts: Array      # [B, k-1] drafted tokens that follow the last generated token
  draft_logq: Any    # [B, k-1, V] the distributions the drafts were sampled from (sampling modes only)
  done: Array        # [B] hit EOS or max_new_tokens
  key: Array
  steps: Array       # [] forward passes after the prefill
  forwards: Array    # [B] forward passes that emitted this row's tokens, prefill included
  accepted: Array    # [B, k-1] drafts of head i (1..k-1) accepted
  recent: Any = None  # sequential modules: head 0's hidden states [B, D-1, d] and the tokens [B, D-1] at the
                      # D-1 positions before `position`, where the modules' caches are rewritten next step


@flax.struct.dataclass
class DecodeOutput:
  tokens: Array      # [B, max_new_tokens], PAD past `lengths`
  lengths: Array     # [B] tokens generated (the first EOS included)
  forwards: Array    # [B] forward passes that emitted them (prefill included)
  accepted: Array    # [B, k-1] drafts accepted per draft head; each was proposed forwards-1 times
  steps: Array       # [] loop iterations (forward passes after the prefill) for the whole batch
  row_steps: Array   # [] rows x forward passes the batch ran, the prefills' included: less than
                     # batch x (steps + 1) where compaction dropped finished rows


# ----------------------------------------------------------------------------- model pieces

class Weights(NamedTuple):
  """The parameters as the decode loop reads them, rearranged once per generation by a program of
  their own, so the loop's program receives them ready-made (no slicing left for XLA to sink into
  the loop body)."""
  params: Any        # the model's own tree, embedding, final norm and unembedding only
  layers: tuple      # trunk layers unstacked: the training scan would copy each layer's slice every step
  heads: Any         # the heads that run in the verify pass, stacked on a leading axis (one batched layer)
  drafter: Any = None  # sequential modules 1..n_heads-1, stacked (they draft after the verify pass)


def _verify_heads(args: ModelArgs, n_heads: int) -> int:
  """How many of the n_heads heads that run do so in the verify pass (the rest draft afterwards)."""
  return 1 if args.heads.reads_ahead else n_heads


def decode_weights(params, args: ModelArgs, n_heads: int) -> Weights:
  trunk = params["trunk"]["layer"] if args.n_trunk_layers else None
  layers = tuple(jax.tree.map(lambda x: x[i], trunk) for i in range(args.n_trunk_layers))
  stack = lambda ids: jax.tree.map(lambda *xs: jnp.stack(xs), *(params[f"heads_{i}"] for i in ids)) if ids else None
  n_verify = _verify_heads(args, n_heads)
  shared = {k: v for k, v in params.items() if k in ("embed", "final_norm", "unembed")}
  return Weights(shared, layers, stack(range(n_verify)), stack(range(n_verify, n_heads)))


def init_decode_cache(args: ModelArgs, batch: int, max_len: int, n_heads: int) -> dict:
  """Zeroed caches: a (keys, values) pair per trunk layer, and the heads' (and drafting modules') caches
  stacked like their weights."""
  n_verify = _verify_heads(args, n_heads)
  cache = init_cache(args, batch, max_len, n_heads=n_verify)
  trunk = cache["trunk"]
  drafter = init_cache(args, batch, max_len, n_heads=n_heads - n_verify)["heads"] if n_heads > n_verify else None
  return {"trunk": tuple((trunk[0][i], trunk[1][i]) for i in range(args.n_trunk_layers)), "heads": cache["heads"],
          "drafter": drafter}


def run_heads(args: ModelArgs, heads, z, positions, segment_ids, cache, cache_index, prefill=False):
  """Stacked heads on trunk output z [B, k, d]: hidden [n_heads, B, k, d] and their updated stacked cache.

  Parallel and linear heads all read z, so they run as ONE batched layer (vmap over the stacked
  parameters) rather than n layers one after another. Chained (causal) heads read the previous
  head's output and run in turn.
  """
  layer = args.heads.first(args)   # heads that run in the verify pass are all of head 0's class
  apply = lambda p, x, c: layer.apply({"params": p}, x, positions, segment_ids, c, cache_index, prefill)
  if not args.heads.chained:
    return jax.vmap(apply, in_axes=(0, None, 0))(heads, z, cache)
  n = jax.tree.leaves(heads)[0].shape[0]
  outs, h = [], z
  for i in range(n):
    h, c = apply(jax.tree.map(lambda x: x[i], heads), h, jax.tree.map(lambda x: x[i], cache))
    cache = jax.tree.map(lambda full, new: full.at[i].set(new), cache, c)
    outs.append(h)
  return jnp.stack(outs), cache


def forward_hidden(model: MTPTransformer, w: Weights, tokens, positions, cache, cache_index, prefill=False):
  """Trunk + heads with the cache: hidden states [n_heads, B, k, d] and the new cache.

  The same layers as the model's forward (Block), unrolled over the trunk: static code, no per-step copies.
  prefill=True: the cache is empty and `tokens` start at position 0, so attention stays within the block.
  """
  _, segment_ids = default_positions(tokens, positions)
  z = model.apply({"params": w.params}, tokens, method=MTPTransformer.embed_tokens)
  block, trunk_cache = Block(model.args), []
  for layer, c in zip(w.layers, cache["trunk"]):
    z, c = block.apply({"params": layer}, z, positions, segment_ids, c, cache_index, prefill)
    trunk_cache.append(c)
  hidden, head_cache = run_heads(model.args, w.heads, z, positions, segment_ids, cache["heads"], cache_index, prefill)
  return hidden, {**cache, "trunk": tuple(trunk_cache), "heads": head_cache}


def unembed(model, params, h):
  """Shared norm + unembedding, applied only where logits are needed (not at every prompt position)."""
  return model.apply({"params": params}, h, method=MTPTransformer.logits).astype(jnp.float32)


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


# ----------------------------------------------------------------------------- verify and draft

def _take(x, idx):
  """x[b, idx[b]] for x [B, k, ...], idx [B]."""
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 1)), axis=1)[:, 0]


def _verify(p_logits, drafts, draft_logq, key, sp: SamplingParams, sampling: bool):
  """Check a block's drafts against head 0.

  p_logits [B, k, V]: head 0 at the block's k positions; drafts [B, k-1] for positions 1..k-1.
  Returns a [B] (drafts accepted, a prefix), the token head 0 emits after them [B], and ok [B, k-1].
  """
  k = p_logits.shape[1]
  if not sampling:
    target = jnp.argmax(p_logits, axis=-1)                        # [B, k]
    ok = drafts == target[:, :k - 1]
    a = jnp.sum(jnp.cumprod(ok, axis=1), axis=1)
    return a, _take(target, a), ok
  k_accept, k_token = jax.random.split(key)
  p = jnp.exp(adjusted_logprobs(p_logits, sp.temperature, sp.top_k, sp.top_p))   # [B, k, V]
  q = jnp.exp(draft_logq)                                                          # [B, k-1, V]
  px = jnp.take_along_axis(p[:, :k - 1], drafts[..., None], axis=-1)[..., 0]
  qx = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
  ok = jax.random.uniform(k_accept, qx.shape) * qx < px          # accept with prob min(1, p/q)
  a = jnp.sum(jnp.cumprod(ok, axis=1), axis=1)
  # First rejection at j: resample from max(0, p - q) there; all accepted: a bonus token from p.
  residual = jnp.concatenate([jnp.maximum(p[:, :k - 1] - q, 0.0), p[:, k - 1:]], axis=1)
  r, p_a = _take(residual, a), _take(p, a)
  r = jnp.where(jnp.sum(r, axis=-1, keepdims=True) > 0, r, p_a)  # p == q up to rounding: never rejected anyway
  return a, jax.random.categorical(k_token, jnp.log(r), axis=-1), ok


def _pick(logits, key, sp: SamplingParams, sampling: bool):
  """Draft tokens from logits [..., V]: the argmax, or a sample and its log q [..., V]."""
  if not sampling:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), None
  logq = adjusted_logprobs(logits, sp.temperature, sp.top_k, sp.top_p)
  return jax.random.categorical(key, logq, axis=-1).astype(jnp.int32), logq


def _draft(model, params, hidden, a, token, key, sp: SamplingParams, sampling: bool):
  """Heads 1..n-1 at block index a: draft tokens [B, n-1], when sampling their log q [B, n-1, V], and no
  cache to update (these heads ran in the verify pass)."""
  del token
  b = a.shape[0]
  if hidden.shape[0] == 0:   # no draft heads run (greedy, sample, n_future=1)
    v = model.args.vocab_size
    return jnp.zeros((b, 0), jnp.int32), (jnp.zeros((b, 0, v), jnp.float32) if sampling else None), None
  h = jax.vmap(lambda hh: _take(hh, a))(hidden)                   # [n-1, B, d]
  logits = jnp.swapaxes(unembed(model, params, h), 0, 1)          # [B, n-1, V]
  return (*_pick(logits, key, sp, sampling), None)


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
    normed = module.apply({"params": p}, _take(h, idx)[:, None], method=MTPModule.output_norm)   # [B, 1, d]
    logits = model.apply({"params": w.params}, normed, method=MTPTransformer.unembed_normed)[:, 0].astype(jnp.float32)
    x, logq = _pick(logits, keys[k], sp, sampling)
    seqs = jnp.where(col == (idx + k + 2)[:, None], x[:, None], seqs)                   # x_{E+k+1}
    drafts.append(x)
    logqs.append(logq)
  return jnp.stack(drafts, axis=1), (jnp.stack(logqs, axis=1) if sampling else None), {"cache": cache,
                                                                                        "recent": new_recent}


def _drafter(model, w: Weights, settings: Settings, sp, state, hidden, block, pos0, offset, prefill):
  """drafter(a, token, key) -> (drafts, log q, state updates or None), drafting at block index offset + a.

  Heads that drafted inside the verify pass (hidden [n_heads, B, k, d]) read their hidden states
  there; sequential modules run now, after it. offset None: a step (offset 0); else the prefill's
  last prompt index [B].
  """
  if w.drafter is None:
    h = hidden[1:] if offset is None else jax.vmap(lambda hh: _take(hh, offset)[:, None])(hidden[1:])
    return lambda a, token, key: _draft(model, w.params, h, a, token, key, sp, settings.sampling)
  return lambda a, token, key: _draft_modules(
      model, w, sp, settings.sampling, hidden[0], block, pos0, state.recent, state.cache["drafter"], prefill,
      0 if offset is None else offset, a, token, key)


def _emit(settings: Settings, sp, state: DecodeState, p_logits, drafter, drafts, draft_logq, key, active):
  """Verify a block, append the accepted tokens (up to EOS / max_new_tokens), draft the next block.

  The block's index 0 sits at state.position; rows that are not `active` keep their state.
  """
  k_verify, k_draft = jax.random.split(key) if settings.sampling else (key, key)   # argmax modes draw nothing
  a, token, _ = _verify(p_logits, drafts, draft_logq, k_verify, sp, settings.sampling)
  new_drafts, new_logq, updates = drafter(a, token, k_draft)
  if updates is not None:   # sequential modules: their cache, and the positions before the next block
    state = state.replace(cache={**state.cache, "drafter": updates["cache"]}, recent=updates["recent"])

  kk = p_logits.shape[1]
  idx = jnp.arange(kk)[None, :]
  new = jnp.where(idx == a[:, None], token[:, None], jnp.pad(drafts, ((0, 0), (0, 1))))   # d_1..d_a, token
  m = jnp.minimum(a + 1, settings.max_new_tokens - state.count)
  is_eos = (new == sp.eos_id) & (idx < m[:, None])
  hit = jnp.any(is_eos, axis=1)
  m = jnp.where(hit, jnp.argmax(is_eos, axis=1) + 1, m)
  written = jax.vmap(lambda buf, u, i: jax.lax.dynamic_update_slice_in_dim(buf, u, i, 0))(
      state.tokens, new.astype(state.tokens.dtype), state.count)

  def keep(new_val, old_val):
    if new_val is None:
      return None
    return jnp.where(active.reshape(active.shape + (1,) * (new_val.ndim - 1)), new_val, old_val)

  heads = jnp.arange(1, settings.block)[None, :]
  return state.replace(
      tokens=keep(written, state.tokens),
      count=keep(state.count + m, state.count),
      position=keep(state.position + m, state.position),
      drafts=keep(new_drafts, state.drafts),
      draft_logq=keep(new_logq, state.draft_logq),
      done=state.done | (active & (hit | (state.count + m >= settings.max_new_tokens))),
      forwards=state.forwards + active,
      accepted=state.accepted + (active[:, None] & (a[:, None] >= heads)))


# ----------------------------------------------------------------------------- prefill, step, loop

def prefill(model, w: Weights, settings: Settings, sp, tokens, lengths, key) -> DecodeState:
  """Run the padded prompts through the model, emit each row's first token and first drafts."""
  args, (b, p) = model.args, tokens.shape
  k = settings.block
  cache = init_decode_cache(args, b, p + settings.max_new_tokens + args.n_future, settings.heads_run)
  positions = jnp.broadcast_to(jnp.arange(p), (b, p))
  zero = jnp.zeros((b,), jnp.int32)
  hidden, cache = forward_hidden(model, w, tokens, positions, cache, zero, prefill=True)
  last = lengths - 1
  h_last = _take(hidden[0], last)[:, None]                            # head 0 at each prompt's end [B, 1, d]
  key, sub = jax.random.split(key)
  state = DecodeState(
      cache=cache, tokens=jnp.zeros((b, settings.max_new_tokens + k), jnp.int32),
      count=jnp.zeros((b,), jnp.int32), position=last.astype(jnp.int32),
      drafts=jnp.zeros((b, k - 1), jnp.int32),
      draft_logq=jnp.zeros((b, k - 1, args.vocab_size), jnp.float32) if settings.sampling else None,
      done=jnp.zeros((b,), bool), key=key, steps=jnp.zeros((), jnp.int32),
      forwards=jnp.zeros((b,), jnp.int32), accepted=jnp.zeros((b, k - 1), jnp.int32),
      recent=None if w.drafter is None else (jnp.zeros((b, k - 2, args.d_model), hidden.dtype),
                                             jnp.zeros((b, k - 2), jnp.int32)))
  no_drafts = jnp.zeros((b, 0), jnp.int32)
  no_logq = jnp.zeros((b, 0, args.vocab_size), jnp.float32) if settings.sampling else None
  drafter = _drafter(model, w, settings, sp, state, hidden, tokens, zero, last, True)
  return _emit(settings, sp, state, unembed(model, w.params, h_last), drafter, no_drafts, no_logq, sub,
               jnp.ones((b,), bool))


def step(model, w: Weights, settings: Settings, sp, state: DecodeState) -> DecodeState:
  """One forward pass over every row's block [last token, drafts] at its own cache position."""
  k = settings.block
  last = _take(state.tokens, state.count - 1)
  block = jnp.concatenate([last[:, None], state.drafts], axis=1)
  positions = state.position[:, None] + jnp.arange(k)[None, :]
  hidden, cache = forward_hidden(model, w, block, positions, state.cache, state.position)
  key, sub = jax.random.split(state.key) if settings.sampling else (state.key, state.key)
  state = state.replace(cache=cache, key=key, steps=state.steps + 1)
  drafter = _drafter(model, w, settings, sp, state, hidden, block, state.position, None, False)
  return _emit(settings, sp, state, unembed(model, w.params, hidden[0]), drafter, state.drafts, state.draft_logq,
               sub, ~state.done)


_TRACES = [0]


def decode(w: Weights, tokens, lengths, key, sp: SamplingParams, *, model: MTPTransformer,
           settings: Settings) -> DecodeOutput:
  """The whole generation (jit this): w from `decode_weights`, tokens [N, P] right-padded prompts,
  lengths [N] their lengths. The loop decodes settings.batch(N) rows at once."""
  _TRACES[0] += 1   # runs only while tracing: the tests count compilations with it
  n_prompts, b = tokens.shape[0], settings.batch(tokens.shape[0])
  state = prefill(model, w, settings, sp, tokens[:b], lengths[:b], key)
  # `slots` maps the loop's rows to the caller's prompts; `done_rows` collects every prompt's results
  # as its row finishes (refill) or its stage ends (compaction).
  slots = jnp.arange(b)
  done_rows = _Results(*(jnp.zeros((n_prompts,) + getattr(state, f).shape[1:], getattr(state, f).dtype)
                         for f in _Results._fields))
  row_steps = jnp.int32(b)
  if b < n_prompts:
    state, slots, done_rows, row_steps = _serve_queue(model, w, settings, sp, tokens, lengths, state, done_rows,
                                                      row_steps)
  # Rows finish at different steps (EOS; in speculative modes each row accepts its own drafts), and a
  # finished row would ride along to the end, paying for a forward pass of its own at every step. So
  # once no prompt is waiting the loop runs in stages of halving batch size: once at most half of a
  # stage's rows are active, they move (cache and all) into the next stage's smaller batch.
  sizes = settings.stages(b)
  for size, next_size in zip(sizes, sizes[1:] + (0,)):
    # Each active step emits >= 1 token per active row, so max_new_tokens bounds the loop.
    began = state.steps
    cond = lambda s, nxt=next_size, began=began: (jnp.sum(~s.done) > nxt) & (s.steps - began < settings.max_new_tokens)
    state = jax.lax.while_loop(cond, lambda s: step(model, w, settings, sp, s), state)
    row_steps += size * (state.steps - began)
    done_rows = done_rows.record(slots, state)
    if next_size:
      keep = jnp.argsort(state.done, stable=True)[:next_size]   # the active rows first
      state, slots = _select_rows(state, keep), slots[keep]
  n = settings.max_new_tokens
  out = jnp.where(jnp.arange(n)[None, :] < done_rows.count[:, None], done_rows.tokens[:, :n], PAD)
  return DecodeOutput(tokens=out, lengths=done_rows.count, forwards=done_rows.forwards, accepted=done_rows.accepted,
                      steps=state.steps, row_steps=row_steps)


def _serve_queue(model, w, settings: Settings, sp, tokens, lengths, state: DecodeState, done_rows, row_steps):
  """Continuous batching: while prompts wait, run the batch until a row finishes, record that row and
  prefill the next prompt into it (a one-row prefill). Rows then never ride along finished while
  work waits, and no row waits for a slower one. Returns (state, slots, done_rows, row_steps) once
  every prompt has had a row; the last batch finishes in `decode`'s compaction stages.

  A row's tokens do not depend on which row it ran in or alongside what (argmax modes): each row
  attends to its own cache only, so the output is what decoding every prompt alone gives.
  """
  n_prompts, b = tokens.shape[0], state.count.shape[0]

  def serve_one(carry):
    state, slots, done_rows, row_steps, nxt = carry
    began = state.steps
    # One row's generation takes <= max_new_tokens steps, so the loop ends even without a done row.
    until_one_done = lambda s: ~jnp.any(s.done) & (s.steps - began < settings.max_new_tokens)
    state = jax.lax.while_loop(until_one_done, lambda s: step(model, w, settings, sp, s), state)
    r = jnp.argmax(state.done)                                           # a finished row
    finished = _Results(*(getattr(state, f)[r][None] for f in _Results._fields))
    done_rows = done_rows.record(slots[r][None], finished)
    fresh = prefill(model, w, settings, sp, jax.lax.dynamic_slice_in_dim(tokens, nxt, 1),
                    jax.lax.dynamic_slice_in_dim(lengths, nxt, 1), state.key)
    return (_put_row(state, r, fresh), slots.at[r].set(nxt), done_rows, row_steps + b * (state.steps - began) + 1,
            nxt + 1)

  carry = (state, jnp.arange(b), done_rows, row_steps, jnp.int32(b))
  state, slots, done_rows, row_steps, _ = jax.lax.while_loop(lambda c: c[4] < n_prompts, serve_one, carry)
  return state, slots, done_rows, row_steps


class _Results(NamedTuple):
  """Every caller row's output fields, written as the stage holding the row ends."""
  tokens: Array
  count: Array
  forwards: Array
  accepted: Array

  def record(self, slots, state: DecodeState) -> "_Results":
    return _Results(*(full.at[slots].set(getattr(state, f)) for full, f in zip(self, self._fields)))


# The batch axis of each cache (stacked head and drafter caches have their stack first) and the
# per-row state fields; the step count and the key belong to the whole batch.
_CACHE_BATCH_AXIS = {"trunk": 0, "heads": 1, "drafter": 1}
_ROW_FIELDS = ("tokens", "count", "position", "drafts", "draft_logq", "done", "forwards", "accepted", "recent")


def _map_rows(fn, state: DecodeState, *others: DecodeState) -> DecodeState:
  """state with fn(x, *ys, axis=batch axis) applied to every per-row leaf (ys: the same leaf of `others`)."""
  each = lambda axis, x, *ys: jax.tree.map(lambda a, *bs: fn(a, *bs, axis=axis), x, *ys)
  cache = {k: each(axis, state.cache[k], *(o.cache[k] for o in others)) for k, axis in _CACHE_BATCH_AXIS.items()}
  return state.replace(cache=cache, **{f: each(0, getattr(state, f), *(getattr(o, f) for o in others))
                                       for f in _ROW_FIELDS})


def _select_rows(state: DecodeState, keep) -> DecodeState:
  """The decode state of rows `keep` only: a smaller batch (caches keep their slots)."""
  return _map_rows(lambda x, axis: jnp.take(x, keep, axis=axis), state)


def _put_row(state: DecodeState, r, fresh: DecodeState) -> DecodeState:
  """state with row r replaced by the one-row state `fresh` (its cache included)."""
  return _map_rows(lambda x, y, axis: jax.lax.dynamic_update_slice_in_dim(x, y.astype(x.dtype), r, axis),
                   state, fresh)


def trace_count() -> int:
  """How many times `decode` has been traced (= compiled) in this process."""
  return _TRACES[0]


# ----------------------------------------------------------------------------- host side

MIN_TEMPERATURE = 1e-5   # as vLLM's sampling epsilon: sampling below it is argmax in effect, and far below
# it logits / temperature overflows float32 (temperature=1e-45 gave NaN probabilities, all token 0)


def check_request(args: ModelArgs, prompts, mode: str, max_new_tokens: int, temperature=1.0, top_k=0,
                  top_p=1.0) -> None:
  """Raise DecodeError for the first thing that cannot work, before any compile."""
  if mode not in MODES:
    raise DecodeError(f"mode={mode!r}: choose one of {', '.join(MODES)}")
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens <= 0:
    raise DecodeError(f"max_new_tokens={max_new_tokens}: must be a positive integer")
  if mode in ("sample", "speculative_sample"):
    # logits / temperature must stay finite in float32: below MIN_TEMPERATURE sampling is argmax anyway
    if not MIN_TEMPERATURE <= temperature < float("inf"):
      raise DecodeError(f"temperature={temperature}: must be finite and >= {MIN_TEMPERATURE} for sampling "
                        f"(use mode=greedy for argmax)")
    if top_k < 0:
      raise DecodeError(f"top_k={top_k}: must be >= 0 (0 = off)")
    if not 0 < top_p <= 1:
      raise DecodeError(f"top_p={top_p}: must be in (0, 1] (1 = off)")
  if not len(prompts):
    raise DecodeError("no prompts given")
  room = max_prompt_len(args, max_new_tokens)
  for i, p in enumerate(prompts):
    if not len(p):
      raise DecodeError(f"prompt {i} is empty: give at least one token")
    if len(p) > room:
      raise DecodeError(
          f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} and n_future={args.n_future} "
          f"decoding needs {len(p) + max_new_tokens + args.n_future} positions but model.max_seq_len="
          f"{args.max_seq_len}; shorten the prompt to <= {max(room, 0)} tokens or lower max_new_tokens")
    bad = [t for t in p if not 0 <= int(t) < args.vocab_size]
    if bad:
      raise DecodeError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {args.vocab_size})")


def check_draft_heads(args: ModelArgs, draft_heads: Optional[int], mode: str = "speculative") -> None:
  if draft_heads is not None and mode not in ("speculative", "speculative_sample"):
    raise DecodeError(f"draft_heads={draft_heads} sets the speculative block, but mode={mode!r} drafts nothing; "
                      f"use mode=speculative or speculative_sample, or leave draft_heads unset")
  if draft_heads is not None and not 2 <= draft_heads <= args.n_future:
    raise DecodeError(f"draft_heads={draft_heads}: the speculative block is 2..n_future={args.n_future} tokens "
                      f"(this model has {args.n_future} heads); leave it unset to use them all")


def check_slots(mode: str, slots: Optional[int], n_prompts: int) -> None:
  if slots is None:
    return
  if not isinstance(slots, (int, np.integer)) or slots < 1:
    raise DecodeError(f"slots={slots}: must be a positive integer (rows decoded at once)")
  if slots < n_prompts and mode in ("sample", "speculative_sample"):
    raise DecodeError(f"slots={slots} with {n_prompts} prompts: refilling rows is for the argmax modes (greedy, "
                      f"speculative); for mode={mode} decode the prompts in batches of {slots} instead")


def max_prompt_len(args: ModelArgs, max_new_tokens: int) -> int:
  """Longest prompt that fits: the cache holds prompt + max_new_tokens + n_future (the drafted block)."""
  return args.max_seq_len - max_new_tokens - args.n_future


def prompt_bucket(longest: int, limit: int) -> int:
  """Pad prompts to a power of two (>= 16) so that similar lengths share one compiled program."""
  return min(max(16, 1 << (max(longest, 1) - 1).bit_length()), max(limit, longest))


def pad_prompts(prompts, bucket: int) -> tuple[np.ndarray, np.ndarray]:
  """Right-pad token lists into tokens [B, bucket] (pad id 0) and lengths [B]."""
  tokens = np.zeros((len(prompts), bucket), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  return tokens, np.array([len(p) for p in prompts], np.int32)


def _batch_shards(tokens) -> int:
  """Over how many devices the prompts' batch is split (1 for a host array or one device)."""
  sharding = getattr(tokens, "sharding", None)
  if sharding is None:
    return 1
  return tokens.shape[0] // sharding.shard_shape(tokens.shape)[0]


_COMPILED: dict = {}


def compiled_decode(params, args: ModelArgs, settings: Settings, tokens, lengths, key, sp):
  """The compiled program for these static settings and shapes (compiled on first use): (fn, seconds)."""
  # Shardings are part of the signature: the same shapes on a mesh are another program.
  sig = tuple((x.shape, str(x.dtype), str(getattr(x, "sharding", None))) for x in jax.tree.leaves(params))
  sig += (str(getattr(tokens, "sharding", None)),)
  cache_key = (args, settings, tokens.shape, jax.tree.structure(params), sig)
  if cache_key in _COMPILED:
    return _COMPILED[cache_key], 0.0
  start = time.perf_counter()
  weights = jax.jit(lambda p: decode_weights(p, args, settings.heads_run)).lower(params).compile()
  loop = jax.jit(lambda *xs: decode(*xs, model=MTPTransformer(args), settings=settings))
  loop = loop.lower(weights(params), tokens, lengths, key, sp).compile()
  _COMPILED[cache_key] = lambda params, *rest: loop(weights(params), *rest)
  return _COMPILED[cache_key], time.perf_counter() - start


def clear_compiled() -> None:
  """Drop every cached program (they hold device memory for their code only, but a long session may want it)."""
  _COMPILED.clear()


def run(params, args: ModelArgs, tokens, lengths, *, mode="greedy", max_new_tokens=64, seed=0, key=None,
        temperature=1.0, top_k=0, top_p=1.0, eos_id: Optional[int] = None, slots: Optional[int] = None,
        draft_heads: Optional[int] = None):
  """Decode padded prompts: (DecodeOutput of numpy arrays, {'compile_s', 'wall_s'}).

  `tokens` [N, P] / `lengths` [N] come from `pad_prompts`; validate with `check_request` first.
  slots: rows decoded at once (argmax modes; default all N): as a row finishes, the next prompt takes it.
  draft_heads: the speculative block, k = 2..n_future (default n_future): heads 2..k draft, so a verify
  step costs k tokens' forward; where a step is bound by arithmetic (a CPU, large batches) a shorter
  block can pay more than the last heads' rarely accepted drafts (experiments/results/speculative.md).
  wall_s is the decode alone (compile excluded), measured until the results are on the host.
  """
  check_slots(mode, slots, len(lengths))
  check_draft_heads(args, draft_heads, mode)
  settings = Settings(mode, int(max_new_tokens), draft_heads or args.n_future, batch_shards=_batch_shards(tokens),
                      slots=0 if slots is None or slots >= len(lengths) else int(slots))
  key = jax.random.key(seed) if key is None else key
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):   # a raw uint32 PRNGKey: one compiled signature
    key = jax.random.wrap_key_data(key)
  sp = SamplingParams.of(temperature, top_k, top_p, eos_id)
  tokens, lengths = jnp.asarray(tokens, jnp.int32), jnp.asarray(lengths, jnp.int32)
  fn, compile_s = compiled_decode(params, args, settings, tokens, lengths, key, sp)
  start = time.perf_counter()
  out = jax.device_get(fn(params, tokens, lengths, key, sp))
  return out, {"compile_s": compile_s, "wall_s": time.perf_counter() - start}
