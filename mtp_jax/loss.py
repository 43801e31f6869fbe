"""The multi-token loss: L = sum_i w_i * CE_i, head i scored on the tokens shifted by i.

w comes from `config.loss_weights`: the normalised head weights (the paper's average), or for
DeepSeek-V3's sequential modules [1, lambda/D, ...], lambda scheduled over training by the step.

`impl='scan'` runs the head layers (each with its norm) in a `jax.lax.scan` whose body checkpoints
the layer, so only the heads' hidden states [n, B, T, d] are kept, never their activations. All heads'
cross-entropies then go through one fused op (cross_entropy.py: a custom VJP that unembeds one head and
one sequence chunk at a time and forms the gradient as it goes), so at most one chunk of one head's
logits exists, in the forward pass only. `chunk_size` sets the chunk (-1: chosen from the logits' size).
n=1 skips the scan: it costs what a plain language model does.
`remat_heads=False` keeps the head layers' activations instead (experiments/speed/step_ratio.py measures
what that trades: at parity on CPU, about 5% of the step time for 75% more temporaries).
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
from mtp_jax.cross_entropy import fused_ce_heads
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


def _head_norm(model, params, i, h):
  """Head i's norm before the unembedding (a traced i picks among the sequential modules' own norms)."""
  norm = lambda j, x: model.apply({"params": params}, j, x, method=MTPTransformer.output_norm)
  if not model.args.heads.reads_ahead or isinstance(i, int):
    return norm(i if isinstance(i, int) else 0, h)
  return jax.lax.switch(i, [functools.partial(norm, j) for j in range(model.args.n_future)], h)


def _unembedding(model, params):
  """The shared unembedding as a [d, V] kernel (the embedding's transpose when they are tied)."""
  return params["embed"]["embedding"].T if model.args.tie_embeddings else params["unembed"]["kernel"]


def _finish(nll, hits, counts, accepted, given, weights):
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


def _acceptance_sums(hits, masks):
  """(accepted [n], given [n]): head i's hits where heads 0..i-1 were all right, and the masked positions
  where they were. hits and masks bool [n, B, T] (hits already masked)."""
  joint = jnp.cumprod(hits.astype(jnp.int32), axis=0).astype(bool)        # heads 0..i all right
  ok = jnp.concatenate([jnp.ones_like(joint[:1]), joint[:-1]])              # heads 0..i-1 all right
  return jnp.sum(joint, axis=(1, 2)), jnp.sum(ok & masks, axis=(1, 2))


def mtp_loss_scan(params, batch, model: MTPTransformer, seq_len: int, chunk_size: int = 0, weights=None,
                  remat_heads: bool = True):
  args = model.args
  n = args.n_future
  weights = _uniform(n) if weights is None else weights
  tokens, positions, segments = model_inputs(batch, seq_len)
  z, _ = model.apply({"params": params}, tokens, positions, segments, method=MTPTransformer.run_trunk)

  def run_head(i, prev, ahead):   # head i's layer and its norm: (hidden for the next head, normed hidden)
    h, _ = model.apply({"params": params}, i, z, prev, positions, segments, ahead=ahead,
                       method=MTPTransformer.run_head)
    return h, _head_norm(model, params, i, h)

  if n == 1:   # the lean one-head path: no scan, nothing recomputed, so n=1 costs what a plain LM does
    hs = run_head(0, None, None)[1][None]
  else:
    # Only the head layers are checkpointed: the fused cross-entropy below keeps no logits of its own.
    layer = lambda prev, ahead, i: jax.lax.switch(i, [functools.partial(run_head, j) for j in range(n)], prev, ahead)
    if remat_heads:
      layer = jax.checkpoint(layer)
    chained = args.heads.chained

    def body(prev, i):
      ahead, _ = shifted_targets(batch, seq_len, i, n)     # x_{t+i}: what sequential modules embed
      h, normed = layer(prev, ahead, i)
      return (h if chained else prev), normed

    _, hs = jax.lax.scan(body, z if chained else None, jnp.arange(n))   # parallel / linear heads carry no h

  targets, masks = (jnp.stack(x) for x in zip(*(shifted_targets(batch, seq_len, i + 1, n) for i in range(n))))
  counts = jnp.sum(masks, axis=(1, 2))
  # All heads' cross-entropies in one fused op, one head's logits at a time (cross_entropy.py).
  loss, nll, hits = fused_ce_heads(hs, _unembedding(model, params), targets, masks,
                                   weights / jnp.maximum(counts, 1).astype(jnp.float32), chunk_size, args.dtype)
  accepted, given = _acceptance_sums(hits, masks)
  _, metrics = _finish(nll, jnp.sum(hits, axis=(1, 2)), counts, accepted, given, weights)
  return loss, dict(metrics, loss=loss)


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
  return _finish(nll, hits, counts, accepted, given, weights)


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
