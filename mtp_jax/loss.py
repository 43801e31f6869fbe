"""The multi-token loss: L = sum_i w_i * CE_i / sum_i w_i, head i scored on the tokens shifted by i.

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

from mtp_jax.config import head_weights
from mtp_jax.cross_entropy import fused_ce
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


def _ce_sums(logits, targets, mask):
  """(sum of masked negative log-likelihoods, number of masked-in top-1 hits), in float32."""
  logits = logits.astype(jnp.float32)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
  hits = (jnp.argmax(logits, axis=-1) == targets) & mask
  return jnp.sum(nll * mask), jnp.sum(hits)


def _final_norm(model, params, h):
  return model.apply({"params": params}, h, method=lambda m, x: m.final_norm(x))


def _head_ce(model, params, hn, targets, mask, chunk_size: int):
  """Cross-entropy sums of one head's normed hidden states through the shared unembedding (fused:
  cross_entropy.py keeps no logits for the backward pass)."""
  kernel = params["embed"]["embedding"].T if model.args.tie_embeddings else params["unembed"]["kernel"]
  return fused_ce(hn, kernel, targets, mask, chunk_size, model.args.dtype)


def _finish(nll, hits, counts, weights):
  """Per-head means and the weighted total from per-head sums (each [n])."""
  denom = jnp.maximum(counts, 1).astype(jnp.float32)
  head_losses, head_acc = nll / denom, hits.astype(jnp.float32) / denom
  w = jnp.asarray(weights, jnp.float32)
  loss = jnp.sum(w * head_losses) / jnp.sum(w)
  return loss, {"loss": loss, "head_losses": head_losses, "head_accuracies": head_acc, "head_tokens": counts}


def mtp_loss_scan(params, batch, model: MTPTransformer, seq_len: int, chunk_size: int = 0, weights=None):
  args = model.args
  n = args.n_future
  weights = weights or [1.0] * n
  tokens, positions, segments = model_inputs(batch, seq_len)
  z, _ = model.apply({"params": params}, tokens, positions, segments, method=MTPTransformer.run_trunk)

  def run_head(i, prev):
    h, _ = model.apply({"params": params}, i, z, prev, positions, segments, method=MTPTransformer.run_head)
    return h

  causal = args.head_type == "causal"

  def head_ce(i, hn):
    targets, mask = shifted_targets(batch, seq_len, i + 1, n)
    nll, hits = _head_ce(model, params, hn, targets, mask, chunk_size)
    return nll, hits, jnp.sum(mask)

  if n == 1:   # the lean one-head path: no scan, nothing recomputed, so n=1 costs what a plain LM does
    nll, hits, counts = (x[None] for x in head_ce(0, _final_norm(model, params, run_head(0, z))))
    return _finish(nll, hits, counts, weights)

  @jax.checkpoint  # head layer + shared norm: only its inputs and the normed output are kept per head
  def layer(prev, i):
    h = jax.lax.switch(i, [functools.partial(run_head, j) for j in range(n)], prev)
    return h, _final_norm(model, params, h)

  def body(prev, i):
    # The fused cross-entropy sits outside the checkpoint: it saves no logits of its own, and
    # recomputing it would redo the unembedding and let the forward's logits live beside the rerun.
    h, hn = layer(prev, i)
    return (h if causal else prev), head_ce(i, hn)

  init = z if causal else None   # parallel and linear heads need no carry: don't save one
  _, (nll, hits, counts) = jax.lax.scan(body, init, jnp.arange(n))
  return _finish(nll, hits, counts, weights)


def mtp_loss_naive(params, batch, model: MTPTransformer, seq_len: int, chunk_size: int = 0, weights=None):
  """Reference: every head's full logits at once (the model's plain forward), then each CE."""
  del chunk_size  # the reference never chunks
  n = model.args.n_future
  weights = weights or [1.0] * n
  tokens, positions, segments = model_inputs(batch, seq_len)
  all_logits, _ = model.apply({"params": params}, tokens, positions, segments)
  sums = []
  for i in range(n):
    targets, mask = shifted_targets(batch, seq_len, i + 1, n)
    sums.append((*_ce_sums(all_logits[i], targets, mask), jnp.sum(mask)))
  nll, hits, counts = (jnp.stack(x) for x in zip(*sums))
  return _finish(nll, hits, counts, weights)


def make_loss_fn(model: MTPTransformer, config):
  """loss_fn(params, batch) -> (loss, metrics) as configured by config.loss."""
  impl = {"scan": mtp_loss_scan, "naive": mtp_loss_naive}[config.loss.impl]
  return functools.partial(impl, model=model, seq_len=config.data.seq_len, chunk_size=config.loss.chunk_size,
                           weights=head_weights(config.loss.head_weights, config.model.n_future))
