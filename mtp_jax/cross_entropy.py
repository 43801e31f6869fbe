"""Fused unembedding + cross-entropy whose gradient is formed in the forward pass: no logits are kept,
and none are recomputed.

    loss, nll, hits = fused_ce_heads(hs, kernel, targets, masks, coefs, chunk, dtype)   # n heads
    nll_sum, hits = fused_ce(h, kernel, targets, mask, chunk, dtype)                   # one head

Forward, one head and one sequence chunk at a time: logits = h @ kernel, their log-sum-exp, the
target's logit and the argmax, and at once softmax - onehot, contracted straight into the chunk's dh
and into the kernel's gradient (accumulated over chunks and heads, each head scaled by its coefficient).
The loss is the scalar sum_i coefs_i * nll_i, so its cotangent only rescales what the forward formed:
the backward pass is two multiplies. Saved between the passes: dh (shaped like h) and one [d, V]
kernel gradient. Logits exist one chunk at a time, in the forward pass only: three matmuls per head
(logits, dh, dkernel), where recomputing the logits in the backward pass (this file's previous form)
took four, and autodiff of log_softmax + take_along_axis keeps three or four logits-sized buffers
per head. The idea of Liger's fused linear cross-entropy, in plain JAX.

Only `loss` carries a gradient; the per-head `nll` sums are metrics (stop_gradient). Under
differentiation the forward pass does the gradient's work even for a frozen kernel or h: the same
matmuls the backward pass did before.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

# Automatic chunk: the largest divisor of T whose logits chunk (B x chunk x V float32) fits this.
AUTO_CHUNK_BYTES = 64 * 2 ** 20


def auto_chunk(batch: int, seq_len: int, vocab: int, budget: int = AUTO_CHUNK_BYTES) -> int:
  """Positions per chunk: all of T when one head's logits fit the budget, else the largest divisor that does."""
  per_position = batch * vocab * 4
  return max(c for c in range(1, seq_len + 1) if seq_len % c == 0 and (c * per_position <= budget or c == 1))


def _chunks(x, n):
  """[B, T, ...] -> [n, B, T/n, ...]."""
  b, t = x.shape[:2]
  return jnp.swapaxes(x.reshape(b, n, t // n, *x.shape[2:]), 0, 1)


def _unchunk(x):
  """[n, B, T/n, ...] -> [B, T, ...]."""
  n, b, c = x.shape[:3]
  return jnp.swapaxes(x, 0, 1).reshape(b, n * c, *x.shape[3:])


def _logits(h, kernel, dtype):
  out = jax.lax.dot_general(h.astype(dtype), kernel.astype(dtype), (((h.ndim - 1,), (0,)), ((), ())),
                            preferred_element_type=jnp.float32)
  return nn.with_logical_constraint(out, ("act_batch", "act_length", "act_vocab"))


def _chunk_stats(logits, targets, mask):
  """(masked nll sum, masked hits, log-sum-exp) of one chunk's float32 logits."""
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  hits = (jnp.argmax(logits, axis=-1) == targets) & mask
  return jnp.sum((lse - target_logit) * mask), hits, lse


def _head_forward(h, kernel, targets, mask, n_chunks, dtype):
  """One head, no gradient: (nll sum, hits [B, T])."""
  def body(nll, chunk):
    s, hits, _ = _chunk_stats(_logits(chunk[0], kernel, dtype), chunk[1], chunk[2])
    return nll + s, hits

  nll, hits = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                           (_chunks(h, n_chunks), _chunks(targets, n_chunks), _chunks(mask, n_chunks)))
  return nll, _unchunk(hits)


def _head_forward_and_grad(h, kernel, targets, mask, coef, dkernel, n_chunks, dtype):
  """One head: (nll sum, hits, d(coef * nll)/dh, dkernel + d(coef * nll)/dkernel)."""
  def body(dkernel, chunk):
    hc, tc, mc = chunk
    logits = _logits(hc, kernel, dtype)
    s, hits, lse = _chunk_stats(logits, tc, mc)
    onehot = jnp.arange(logits.shape[-1]) == tc[..., None]
    dlogits = ((jnp.exp(logits - lse[..., None]) - onehot) * (coef * mc)[..., None]).astype(dtype)
    dh = jax.lax.dot_general(dlogits, kernel.astype(dtype), (((2,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)
    dk = jax.lax.dot_general(hc.astype(dtype), dlogits, (((0, 1), (0, 1)), ((), ())),
                             preferred_element_type=jnp.float32)
    return dkernel + dk, (s, hits, dh.astype(h.dtype))

  dkernel, (nll, hits, dh) = jax.lax.scan(
      body, dkernel, (_chunks(h, n_chunks), _chunks(targets, n_chunks), _chunks(mask, n_chunks)))
  return jnp.sum(nll), _unchunk(hits), _unchunk(dh), dkernel


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _fused(hs, kernel, targets, masks, coefs, n_chunks, dtype):
  nll, hits = jax.lax.map(lambda a: _head_forward(a[0], kernel, a[1], a[2], n_chunks, dtype), (hs, targets, masks))
  return jnp.sum(coefs * nll), nll, hits


def _fused_fwd(hs, kernel, targets, masks, coefs, n_chunks, dtype):
  def head(dkernel, a):
    h, targets, mask, coef = a
    nll, hits, dh, dkernel = _head_forward_and_grad(h, kernel, targets, mask, coef, dkernel, n_chunks, dtype)
    return dkernel, (nll, hits, dh)

  dkernel, (nll, hits, dhs) = jax.lax.scan(head, jnp.zeros(kernel.shape, jnp.float32), (hs, targets, masks, coefs))
  return (jnp.sum(coefs * nll), nll, hits), (dhs, dkernel.astype(kernel.dtype), coefs)


def _fused_bwd(n_chunks, dtype, res, cts):
  dhs, dkernel, coefs = res
  g = cts[0]          # the loss's cotangent; the per-head nll are stop_gradient'ed by the callers
  return (g * dhs).astype(dhs.dtype), (g * dkernel).astype(dkernel.dtype), None, None, jnp.zeros_like(coefs)


_fused.defvjp(_fused_fwd, _fused_bwd)


def _n_chunks(h, kernel, chunk: int) -> int:
  if chunk < 0:
    chunk = auto_chunk(h.shape[-3], h.shape[-2], kernel.shape[-1])
  return h.shape[-2] // chunk if chunk else 1


def fused_ce_heads(hs, kernel, targets, masks, coefs, chunk: int, dtype):
  """(loss = sum_i coefs[i] * nll[i], nll [n] float32, hits bool [n, B, T]) of n heads' logits hs[i] @ kernel.

  hs [n, B, T, d] (after each head's norm); kernel [d, V]; targets int [n, B, T]; masks bool [n, B, T];
  coefs [n] float32 (no gradient flows to them); chunk: positions per chunk (must divide T); 0 = all T
  at once; -1 = `auto_chunk`. Only `loss` is differentiable: nll are metrics.
  """
  loss, nll, hits = _fused(hs, kernel, targets, masks.astype(bool), jnp.asarray(coefs, jnp.float32),
                           _n_chunks(hs, kernel, chunk), dtype)
  return loss, jax.lax.stop_gradient(nll), hits


def fused_ce(h, kernel, targets, mask, chunk: int, dtype):
  """One head: (sum of masked negative log-likelihoods float32, differentiable; masked top-1 hits bool [B, T]).

  h [B, T, d] (after the head's norm); kernel [d, V]; targets int [B, T]; mask bool [B, T].
  """
  loss, _, hits = fused_ce_heads(h[None], kernel, targets[None], mask[None], jnp.ones((1,), jnp.float32), chunk,
                                 dtype)
  return loss, hits[0]
