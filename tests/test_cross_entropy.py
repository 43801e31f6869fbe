"""The fused cross-entropy (custom VJP, chunked) against autodiff of the plain logits + log-softmax."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtp_jax.cross_entropy import auto_chunk, fused_ce, fused_ce_heads
from tolerances import assert_close


def _reference(h, kernel, targets, mask):
  logits = h @ kernel
  nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
  hits = (jnp.argmax(logits, -1) == targets) & mask
  return jnp.sum(nll * mask), hits


@pytest.mark.parametrize("chunk", [0, 1, 4, 12, -1])
def test_fused_ce_matches_autodiff(chunk):
  ks = jax.random.split(jax.random.key(0), 3)
  h, kernel = jax.random.normal(ks[0], (2, 12, 16)), jax.random.normal(ks[1], (16, 40)) * 0.3
  targets = jax.random.randint(ks[2], (2, 12), 0, 40)
  mask = jnp.arange(12)[None, :] < jnp.array([[9], [12]])
  fused = lambda h, k: fused_ce(h, k, targets, mask, chunk, jnp.float32)
  ref = lambda h, k: _reference(h, k, targets, mask)
  (nll, hits), (rnll, rhits) = fused(h, kernel), ref(h, kernel)
  k = 16 + 40 + 24                       # d, then the vocabulary's log-sum-exp, then the 24 positions
  assert_close(nll, rnll, k)
  np.testing.assert_array_equal(hits, rhits)
  grads = jax.grad(lambda h, k: fused(h, k)[0] * 0.7, argnums=(0, 1))(h, kernel)
  ref_grads = jax.grad(lambda h, k: ref(h, k)[0] * 0.7, argnums=(0, 1))(h, kernel)
  for a, b in zip(grads, ref_grads):
    assert_close(a, b, k)


def test_auto_chunk_fits_the_budget():
  assert auto_chunk(8, 256, 2048) == 256                    # 16 MiB of logits: no chunking
  assert auto_chunk(8, 256, 32000) == 64                    # 250 MiB: four chunks of 62.5 MiB
  assert auto_chunk(1, 7, 10 ** 9) == 1                     # nothing fits: one position at a time
  assert auto_chunk(8, 6, 2 ** 20, budget=3 * 8 * 4 * 2 ** 20) == 3   # the largest divisor that fits


def test_fused_ce_bfloat16_tracks_float32():
  """bf16 matmuls, f32 log-sum-exp: the nll stays within bf16 rounding of the float32 value."""
  ks = jax.random.split(jax.random.key(1), 3)
  h, kernel = jax.random.normal(ks[0], (2, 8, 32)), jax.random.normal(ks[1], (32, 64)) * 0.2
  targets, mask = jax.random.randint(ks[2], (2, 8), 0, 64), jnp.ones((2, 8), bool)
  nll32, _ = fused_ce(h, kernel, targets, mask, 4, jnp.float32)
  nll16, _ = fused_ce(h, kernel, targets, mask, 4, jnp.bfloat16)
  assert nll16.dtype == jnp.float32
  np.testing.assert_allclose(nll16, nll32, rtol=2e-2)


@pytest.mark.parametrize("chunk", [0, 4])
def test_fused_ce_heads_matches_autodiff_of_the_weighted_sum(chunk):
  """n heads in one op: loss = sum_i coefs_i * nll_i and its gradients equal autodiff's; the per-head nll
  are metrics, through which no gradient flows."""
  ks = jax.random.split(jax.random.key(2), 3)
  n = 3
  hs, kernel = jax.random.normal(ks[0], (n, 2, 8, 16)), jax.random.normal(ks[1], (16, 40)) * 0.3
  targets = jax.random.randint(ks[2], (n, 2, 8), 0, 40)
  masks = jnp.arange(8)[None, None, :] < jnp.array([8, 7, 5])[:, None, None]
  masks = jnp.broadcast_to(masks, (n, 2, 8))
  coefs = jnp.array([0.5, 0.3, 0.2]) / jnp.sum(masks, axis=(1, 2))

  def ref(hs, k):
    nll, hits = zip(*(_reference(hs[i], k, targets[i], masks[i]) for i in range(n)))
    return jnp.sum(coefs * jnp.stack(nll)), jnp.stack(nll), jnp.stack(hits)

  fused = lambda hs, k: fused_ce_heads(hs, k, targets, masks, coefs, chunk, jnp.float32)
  terms = 16 + 40 + n * 16               # d, the vocabulary, then the heads' 16 positions each
  for a, b in zip(fused(hs, kernel), ref(hs, kernel)):
    assert_close(a, b, terms)
  grads = jax.grad(lambda hs, k: fused(hs, k)[0], argnums=(0, 1))(hs, kernel)
  ref_grads = jax.grad(lambda hs, k: ref(hs, k)[0], argnums=(0, 1))(hs, kernel)
  for a, b in zip(grads, ref_grads):
    assert_close(a, b, terms)
  no_grad = jax.grad(lambda hs: jnp.sum(fused(hs, kernel)[1]))(hs)
  np.testing.assert_array_equal(no_grad, 0.0)
