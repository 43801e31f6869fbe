"""Fused unembedding + cross-entropy with a hand-written VJP: no head's logits are kept for the backward.

    nll_sum, hits = fused_ce(h, kernel, targets, mask, chunk, dtype)

Forward: logits = h @ kernel one sequence chunk at a time, alive only long enough to take their
log-sum-exp, the target's logit and the argmax. Saved for the backward: h, the kernel and the
log-sum-exp (B x T floats). Backward: recompute each chunk's logits, form softmax - onehot in
place (no gather, no scatter), and contract it straight into dh and dkernel. Autodiff of
log_softmax + take_along_axis keeps three or four logits-sized buffers per head (the logits, their
exp, the scatter's zeros, the product), and `jax.checkpoint` around it still let the scheduler hold
the forward's logits beside the backward's recomputation: one extra logits buffer at n=1.
The idea of Liger's fused linear cross-entropy and Apple's Cut Cross-Entropy, in plain JAX.
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


def _forward(h, kernel, targets, mask, n_chunks, dtype):
  def body(nll, chunk):
    hc, tc, mc = chunk
    logits = _logits(hc, kernel, dtype)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
    hits = (jnp.argmax(logits, axis=-1) == tc) & mc
    return nll + jnp.sum((lse - target_logit) * mc), (hits, lse)

  nll, (hits, lse) = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                                  (_chunks(h, n_chunks), _chunks(targets, n_chunks), _chunks(mask, n_chunks)))
  return nll, _unchunk(hits), lse            # lse stays chunked: [n_chunks, B, T/n_chunks]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused(h, kernel, targets, mask, n_chunks, dtype):
  nll, hits, _ = _forward(h, kernel, targets, mask, n_chunks, dtype)
  return nll, hits


def _fused_fwd(h, kernel, targets, mask, n_chunks, dtype):
  nll, hits, lse = _forward(h, kernel, targets, mask, n_chunks, dtype)
  return (nll, hits), (h, kernel, targets, mask, lse)


def _fused_bwd(n_chunks, dtype, res, cts):
  h, kernel, targets, mask, lse = res
  g = cts[0]                                   # the nll sum's cotangent (the hits are booleans)

  def body(dkernel, chunk):
    hc, tc, mc, lc = chunk
    logits = _logits(hc, kernel, dtype)
    onehot = jnp.arange(logits.shape[-1]) == tc[..., None]
    dlogits = ((jnp.exp(logits - lc[..., None]) - onehot) * (g * mc)[..., None]).astype(dtype)
    dh = jax.lax.dot_general(dlogits, kernel.astype(dtype), (((2,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)
    dk = jax.lax.dot_general(hc.astype(dtype), dlogits, (((0, 1), (0, 1)), ((), ())),
                             preferred_element_type=jnp.float32)
    return dkernel + dk, dh.astype(h.dtype)

  dkernel, dh = jax.lax.scan(body, jnp.zeros(kernel.shape, jnp.float32),
                             (_chunks(h, n_chunks), _chunks(targets, n_chunks), _chunks(mask, n_chunks), lse))
  return _unchunk(dh), dkernel.astype(kernel.dtype), None, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_ce(h, kernel, targets, mask, chunk: int, dtype):
  """(sum of masked negative log-likelihoods float32, masked top-1 hits bool [B, T]) of logits h @ kernel.

  h [B, T, d] (after the head's norm); kernel [d, V]; targets int [B, T]; mask bool [B, T];
  chunk: positions per chunk (must divide T); 0 = all T at once; -1 = `auto_chunk`.
  """
  if chunk < 0:
    chunk = auto_chunk(h.shape[0], h.shape[1], kernel.shape[-1])
  n_chunks = h.shape[1] // chunk if chunk else 1
  return _fused(h, kernel, targets, mask.astype(bool), n_chunks, dtype)
