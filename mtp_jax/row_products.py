"""A weight matrix times a few rows, on CPU: one matrix-vector product per row.

A speculative verify step at batch 1 feeds 2-4 tokens through every weight matrix. XLA:CPU gives a product
over 2+ rows to a GEMM kernel (YNNPACK), which on one core costs far more than the weights' read that bounds
the one-row product: C(2) = 1.88 on SmolLM2-135M's matrices where the core's arithmetic allows 1.00
(experiments/speed/results/row_cost_amd.md). The one-row product XLA emits itself, repeated per row, reads
the matrix again from cache and costs less up to 3 rows (C(2) = 1.57 on SmolLM2's matrices, 1.03 on the
default model's). Each row is then computed exactly as a batch-1 greedy step computes it.

Only on CPU, only for 2..ROWS_UP_TO rows (a training step or a prefill has far more rows, and on an
accelerator a few rows cost what one does), and only for matrices of MIN_WEIGHTS entries or more: a smaller
product is too cheap to matter beside the step's other work, and splitting it would only grow the program
that XLA compiles (the test suite's toy models stay below it).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

ROWS_UP_TO = 3        # from 4 rows on YNNPACK's GEMM is as fast (row_cost_amd.md)
MIN_WEIGHTS = 16384   # the default model's q, o and MLP matrices have 16,384-45,056; its k and v 8,192


def split_rows(rows: int, weights: int) -> bool:
  """Whether a product of `rows` rows with a matrix of `weights` entries runs as one matrix-vector product per
  row here."""
  return 1 < rows <= ROWS_UP_TO and weights >= MIN_WEIGHTS and jax.default_backend() == "cpu"


def project(x, kernel, n_in: int = 1):
  """x [..., *in] contracted over its last n_in axes with kernel [*in, *out] -> [..., *out]."""
  lead = x.shape[:x.ndim - n_in]
  rows = math.prod(lead)
  if not split_rows(rows, kernel.size):
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    return jax.lax.dot_general(x, kernel, (contract, ((), ())))
  return one_product_per_row(x.reshape((rows,) + x.shape[x.ndim - n_in:]), kernel, n_in).reshape(
      lead + kernel.shape[n_in:])


def one_product_per_row(rows, kernel, n_in: int = 1):
  """rows [M, *in] times kernel [*in, *out] as M matrix-vector products, stacked: [M, *out]."""
  per_row = (tuple(range(n_in)), tuple(range(n_in)))
  return jnp.stack([jax.lax.dot_general(rows[i], kernel, (per_row, ((), ()))) for i in range(rows.shape[0])])
