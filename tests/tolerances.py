"""Tolerances for equivalence tests, derived rather than picked, so they hold on every CPU.

Two correct computations of the same value (scan vs naive, blockwise vs einsum, sharded vs one device) sum
the same terms in different orders, and so does the same program under another CPU's kernels (AVX2 vs
AVX-512 reassociate float32 sums differently). Each addition rounds by at most eps/2 of the running sum,
and the roundings of a sum of k terms add up like a random walk: the difference between two orders is
about eps * sqrt(k) times the size of the terms, not of the result (cancellation leaves a small result
carrying the error of large terms). Hence

    atol = c * eps * sqrt(k) * scale,   rtol = c * eps * sqrt(k)

with eps the dtype's machine epsilon, k the length of the longest reduction behind the compared values
(for a chain of reductions, such as a loss gradient through a network, their sum: the variances add),
scale the largest magnitude among the reference values, and c a safety factor (4: about 5 times the
worst difference measured between the implementations this suite compares).
"""
import math

import jax
import numpy as np

C = 4.0


def tolerance(k: int, dtype=np.float32, scale: float = 1.0, c: float = C) -> dict:
  """rtol and atol, as keyword arguments for np.testing.assert_allclose."""
  rtol = c * float(np.finfo(dtype).eps) * math.sqrt(max(int(k), 1))
  return {"rtol": rtol, "atol": rtol * float(scale)}


def assert_close(actual, desired, k: int, dtype=np.float32, c: float = C, scale=None, err_msg: str = ""):
  """assert_allclose at tolerance(k, dtype, scale), scale defaulting to max |desired|. dtype is the precision
  the compared values were computed in (float32 unless said; a float64 reference does not make it finer)."""
  desired = np.asarray(desired, np.float64)
  if scale is None:
    scale = float(np.max(np.abs(desired))) if desired.size else 0.0
  np.testing.assert_allclose(np.asarray(actual, np.float64), desired, err_msg=err_msg, **tolerance(k, dtype, scale, c))


def assert_trees_close(actual, desired, k: int, dtype=np.float32, c: float = C, err_msg: str = ""):
  """assert_close leaf by leaf (each leaf scaled by its own largest reference value), naming the leaf."""
  flat, _ = jax.tree_util.tree_flatten_with_path(desired)
  for (path, want), got in zip(flat, jax.tree.leaves(actual)):
    assert_close(got, want, k, dtype, c, err_msg=f"{err_msg} {jax.tree_util.keystr(path)}".strip())


def network_k(config, rows: int, seq_len=None) -> int:
  """k for a loss, logits or gradients through the transformer a config describes: per layer (trunk and
  heads) the attention scores (d_model), the weighted values (seq_len), the output projection (d_model),
  the MLP (d_model, then d_ff); then the unembedding (d_model), the log-sum-exp (vocab), and the sum over
  rows x positions that every weight gradient and the mean loss take."""
  m = config.model
  t = seq_len or config.data.seq_len
  layers = m.n_layers + max(m.n_future - 1, 0)
  return layers * (3 * m.d_model + t + m.d_ff) + m.d_model + m.vocab_size + rows * t
