"""The multi-token loss: L = sum_i w_i * CE_i, head i scored on the tokens shifted by i.

w comes from `config.loss_weights`: the normalised head weights (the paper's average), or for
DeepSeek-V3's sequential modules [1, lambda/D, ...], lambda scheduled over training by the step.

`impl='scan'` runs the heads in a `jax.lax.scan` whose body is `jax.checkpoint`ed: head i's layer,
the shared norm + unembedding and its cross-entropy happen inside one body, and only the body's
inputs are kept for the backward pass, so one head's logits exist at a time in both passes.
`chunk_size` goes further and scans the cross-entropy over sequence chunks inside each head.
`impl='naive'` keeps every head's logits: the reference the tests and benchmarks compare against.

A batch is {'tokens': int [B, L], 'segment_ids': int [B, L]} with L >= seq_len (the data pipeline
gives L = seq_len + n_future, so every head has a target at every position). Segment id 0 marks
padding; a target in another segment than its input position (another document) is masked.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mtp_jax.config import loss_weights
from mtp_jax.model import MTPTransformer


def model_inputs(batch, seq_len: int):
  """(tokens, positions, segment_ids) for the first seq_len positions of a batch."""
  tokens = batch["tokens"]
  segments = batch.get("segment_ids")
  if segments is None:
    segments = jnp.ones_like(tokens)
  positions = jnp.broadcast_to(jnp.arange(seq_len), (tokens.shape[0], seq_len))
  return tokens[:, :seq_len], positions, segments[:, :seq_len]


def shifted_targets(batch, seq_len: int, shift, max_shift: int):
  """Targets and mask of the head predicting `shift` tokens ahead (shift may be traced).

  targets[b, t] = tokens[b, t + shift]; mask is False where t + shift is past the end, is padding,
  or lies in another document than position t.
  """
  tokens = batch["tokens"]
  segments = batch.get("segment_ids")
  if segments is None:
    segments = jnp.ones_like(tokens)
  pad = ((0, 0), (0, max_shift))
  targets = jax.lax.dynamic_slice_in_dim(jnp.pad(tokens, pad), shift, seq_len, axis=1)
  target_seg = jax.lax.dynamic_slice_in_dim(jnp.pad(segments, pad), shift, seq_len, axis=1)
  input_seg = segments[:, :seq_len]
  return targets, (target_seg == input_seg) & (input_seg != 0)


def _ce_sums(logits, targets, mask, ok):
  """(sum of masked negative log-likelihoods, number of masked-in top-1 hits, hits where `ok`), in float32.

  ok [B, T]: every earlier head was right at that position; `hits & ok` is what acceptance counts.
  """
  logits = logits.astype(jnp.float32)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
  hits = (jnp.argmax(logits, axis=-1) == targets) & mask
  return jnp.sum(nll * mask), jnp.sum(hits), hits & ok


def _head_logits_fn(model, params, i):
  """x [..., d] -> head i's logits for a traced head index i: its norm (one of the heads' own, for
  sequential modules; the shared final norm otherwise) and the shared unembedding."""
  apply = lambda method, *xs: model.apply({"params": params}, *xs, method=method)
  if not model.args.heads.reads_ahead:
    return lambda x: apply(MTPTransformer.logits, x)
  norms = [functools.partial(apply, MTPTransformer.output_norm, j) for j in range(model.args.n_future)]
  return lambda x: apply(MTPTransformer.unembed_normed, jax.lax.switch(i, norms, x))


def _head_ce(logits_fn, h, targets, mask, chunk_size: int, ok):
  """Cross-entropy sums of one head's hidden states through logits_fn (its norm and the unembedding),
  and where it is right among the positions `ok` (earlier heads all right), for head_acceptance.

  The norm runs inside each chunk, so the backward pass recomputes it there rather than keeping a
  normed copy of the whole sequence."""
  if not chunk_size:
    return _ce_sums(logits_fn(h), targets, mask, ok)
  b, t, d = h.shape
  to_chunks = lambda x: jnp.swapaxes(x.reshape(b, t // chunk_size, chunk_size, *x.shape[2:]), 0, 1)

  @jax.checkpoint  # keep only each chunk's inputs; its logits are recomputed in the backward pass
  def body(sums, chunk):
    hc, tc, mc, okc = chunk
    nll, hits, joint = _ce_sums(logits_fn(hc), tc, mc, okc)
    return (sums[0] + nll, sums[1] + hits), joint

  zero = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
  sums, joint = jax.lax.scan(body, zero, (to_chunks(h), to_chunks(targets), to_chunks(mask), to_chunks(ok)))
  return (*sums, jnp.swapaxes(joint, 0, 1).reshape(b, t))


def _finish(nll, hits, counts, weights, accepted, given):
  """Per-head means and the weighted total (weights [n] already final: no renormalising) from per-head sums.

  head_acceptance[i] = accepted[i] / given[i]: how often head i's argmax is the target among the
  positions where heads 1..i-1 were all right (head 1: its accuracy), the quantity that sets how many
  drafted tokens self-speculative decoding keeps.
  """
  denom = jnp.maximum(counts, 1).astype(jnp.float32)
  head_losses, head_acc = nll / denom, hits.astype(jnp.float32) / denom
  w = jnp.asarray(weights, jnp.float32)
  loss = jnp.sum(w * head_losses)
  acceptance = accepted.astype(jnp.float32) / jnp.maximum(given, 1).astype(jnp.float32)
  return loss, {"loss": loss, "head_losses": head_losses, "head_accuracies": head_acc, "head_tokens": counts,
                "head_acceptance": acceptance, "head_accepted": accepted, "head_given": given}


def _uniform(n):
  return jnp.full((n,), 1.0 / n, jnp.float32)


def mtp_loss_scan(params, batch, model: MTPTransformer, seq_len: int, chunk_size: int = 0, weights=None):
  args = model.args
  n = args.n_future
  weights = _uniform(n) if weights is None else weights
  tokens, positions, segments = model_inputs(batch, seq_len)
  z, _ = model.apply({"params": params}, tokens, positions, segments, method=MTPTransformer.run_trunk)

  def run_head(i, prev, ahead):
    h, _ = model.apply({"params": params}, i, z, prev, positions, segments, ahead=ahead,
                       method=MTPTransformer.run_head)
    return h

  chained = args.heads.chained

  @jax.checkpoint  # saved per head: the carry (chained heads only; ok: earlier heads right) and the index
  def body(carry, i):
    prev, ok = carry
    ahead, _ = shifted_targets(batch, seq_len, i, n)     # x_{t+i}: what sequential modules embed
    h = jax.lax.switch(i, [functools.partial(run_head, j) for j in range(n)], prev, ahead)
    targets, mask = shifted_targets(batch, seq_len, i + 1, n)
    nll, hits, joint = _head_ce(_head_logits_fn(model, params, i), h, targets, mask, chunk_size, ok)
    return ((h if chained else prev), joint), (nll, hits, jnp.sum(mask), jnp.sum(joint), jnp.sum(ok & mask))

  init = (z if chained else None, jnp.ones(tokens.shape, bool))   # parallel / linear heads carry no h
  _, (nll, hits, counts, accepted, given) = jax.lax.scan(body, init, jnp.arange(n))
  return _finish(nll, hits, counts, weights, accepted, given)


def mtp_loss_naive(params, batch, model: MTPTransformer, seq_len: int, chunk_size: int = 0, weights=None):
  """Reference: every head's full logits at once (the model's plain forward), then each CE."""
  del chunk_size  # the reference never chunks
  n = model.args.n_future
  weights = _uniform(n) if weights is None else weights
  tokens, positions, segments = model_inputs(batch, seq_len)
  lookahead = jnp.pad(batch["tokens"], ((0, 0), (0, n)))[:, seq_len:seq_len + n - 1]   # x_{T..T+n-2}, 0 past the end
  all_logits, _ = model.apply({"params": params}, tokens, positions, segments, lookahead=lookahead)
  sums, ok = [], jnp.ones(tokens.shape, bool)
  for i in range(n):
    targets, mask = shifted_targets(batch, seq_len, i + 1, n)
    nll, hits, joint = _ce_sums(all_logits[i], targets, mask, ok)
    sums.append((nll, hits, jnp.sum(mask), jnp.sum(joint), jnp.sum(ok & mask)))
    ok = joint
  nll, hits, counts, accepted, given = (jnp.stack(x) for x in zip(*sums))
  return _finish(nll, hits, counts, weights, accepted, given)


def make_loss_fn(model: MTPTransformer, config):
  """loss_fn(params, batch, step=0) -> (loss, metrics) as configured by config.loss.

  `step` (an int32 scalar, may be traced: one compiled step serves the whole schedule) picks the
  scheduled loss weights (loss.mtp_lambda); metrics['loss_weights'] reports them.
  """
  impl = {"scan": mtp_loss_scan, "naive": mtp_loss_naive}[config.loss.impl]
  fn = functools.partial(impl, model=model, seq_len=config.data.seq_len, chunk_size=config.loss.chunk_size)

  def loss_fn(params, batch, step=0):
    weights = loss_weights(config, step, xp=jnp)
    loss, metrics = fn(params, batch, weights=weights)
    return loss, dict(metrics, loss_weights=weights)

  return loss_fn
