"""The model: causality, parameter parity, head layout, dtypes and rematerialisation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtp_jax.loss import make_loss_fn
from mtp_jax.model import build_model, init_params
from mtp_jax.dry_run import param_counts
from tolerances import assert_close, assert_trees_close, network_k

HEAD_TYPES = ["parallel", "causal", "linear"]


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_causal_every_head(make_config, head_type):
  """Logits at position t do not depend on tokens after t, for every head."""
  model = build_model(make_config(head_type=head_type, n_future=3).model)
  params = init_params(model, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 64)
  changed = tokens.at[:, 7:].set((tokens[:, 7:] + 5) % 64)
  a, _ = model.apply({"params": params}, tokens)
  b, _ = model.apply({"params": params}, changed)
  np.testing.assert_allclose(a[:, :, :7], b[:, :, :7], atol=1e-6)
  assert np.abs(np.asarray(a[:, :, 7:] - b[:, :, 7:])).max() > 1e-3   # later positions do see the change


def test_documents_do_not_attend_to_each_other(make_config):
  config = make_config()
  model = build_model(config.model)
  params = init_params(model, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (1, 12), 0, 64)
  segments = jnp.array([[1] * 5 + [2] * 7])
  alone, _ = model.apply({"params": params}, tokens[:, 5:])          # document 2 on its own
  packed, _ = model.apply({"params": params}, tokens, segment_ids=segments)
  assert_close(packed[:, :, 5:], alone, network_k(config, 1, 12))    # RoPE: only relative positions matter


@pytest.mark.parametrize("head_type", ["parallel", "causal"])
def test_parameter_parity(make_config, head_type):
  """With parity, n heads take n of the L layers: every n has the n=1 parameter count."""
  counts = []
  for n in (1, 2, 4):
    model = build_model(make_config(n_layers=4, n_future=n, head_type=head_type).model)
    params = init_params(model, jax.random.key(0))
    counts.append(param_counts(params)["params_total"])
    assert model.args.n_trunk_layers == 4 - n
    assert sorted(k for k in params if k.startswith("heads_")) == [f"heads_{i}" for i in range(n)]
  assert counts[0] == counts[1] == counts[2]


def test_no_parity_adds_head_layers(make_config):
  base = param_counts(init_params(build_model(make_config(n_future=1, parity=False).model), jax.random.key(0)))
  four = param_counts(init_params(build_model(make_config(n_future=4, parity=False).model), jax.random.key(0)))
  assert four["params_trunk"] == base["params_trunk"]
  assert four["params_heads"] == 4 * base["params_heads"]


def test_tied_embeddings_drop_unembedding(make_config):
  params = init_params(build_model(make_config(tie_embeddings=True).model), jax.random.key(0))
  assert "unembed" not in params


def _loss_and_grads(config, batch):
  model = build_model(config.model)
  params = init_params(model, jax.random.key(0))
  (loss, _), grads = jax.jit(jax.value_and_grad(make_loss_fn(model, config), has_aux=True))(params, batch)
  return loss, grads


@pytest.mark.parametrize("policy", ["full", pytest.param("dots", marks=pytest.mark.slow)])
def test_remat_policies_change_nothing(make_config, policy):
  batch = {"tokens": jax.random.randint(jax.random.key(2), (2, 18), 0, 64)}
  config = make_config(n_layers=5, n_future=2)
  ref_loss, ref_grads = _loss_and_grads(config, batch)
  loss, grads = _loss_and_grads(make_config(n_layers=5, n_future=2, remat=policy), batch)
  k = network_k(config, 2, 16)
  assert_close(loss, ref_loss, k)
  assert_trees_close(grads, ref_grads, k)


def test_bfloat16_compute(make_config):
  """bf16 compute with f32 parameters stays close to the f32 model (loss within a few percent)."""
  batch = {"tokens": jax.random.randint(jax.random.key(2), (2, 18), 0, 64)}
  ref, _ = _loss_and_grads(make_config(n_future=2), batch)
  config = make_config(n_future=2, dtype="bfloat16")
  loss, grads = _loss_and_grads(config, batch)
  assert abs(float(loss) - float(ref)) < 0.05 * float(ref)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
  bf16_params = init_params(build_model(make_config(param_dtype="bfloat16").model), jax.random.key(0))
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(bf16_params))


def _check_against_autodiff(ours, ref, args, inner):
  """Value and gradients (w.r.t. every argument) of sum(f(*args) * g) for a fixed random cotangent g, within
  float32 reassociation of f's own reduction (`inner` terms) and of the sum over its outputs."""
  out = ref(*args)
  g = jax.random.normal(jax.random.key(9), jnp.shape(out))
  loss = lambda f: lambda *a: jnp.sum(f(*a) * g)
  assert_close(loss(ours)(*args), loss(ref)(*args), inner * out.size, scale=np.max(np.abs(out * g)))
  argnums = tuple(range(len(args)))
  for a, b in zip(jax.grad(loss(ours), argnums)(*args), jax.grad(loss(ref), argnums)(*args)):
    assert_close(a, b, inner + out.size)


def test_swiglu_gradient_matches_autodiff():
  """The SwiGLU's hand-written gradient (from gate and up only) against autodiff of silu(gate) * up."""
  from mtp_jax.lean_ops import _swiglu_grads
  gate, up, g = (jax.random.normal(k, (2, 5, 12)) * 3 for k in jax.random.split(jax.random.key(3), 3))
  _, vjp = jax.vjp(lambda a, b: jax.nn.silu(a) * b, gate, up)
  for a, b in zip(_swiglu_grads(gate, up, g), vjp(g)):
    assert_close(a, b, 8)      # no reduction: the rounding of each of the formula's ~8 operations


def test_swiglu_project_gradient_matches_autodiff():
  """SwiGLU then the down projection, whose backward recomputes silu(gate) * up, against autodiff."""
  from mtp_jax.lean_ops import swiglu_project
  ks = jax.random.split(jax.random.key(4), 3)
  gate, up = (jax.random.normal(k, (2, 5, 12)) * 3 for k in ks[:2])
  kernel = jax.random.normal(ks[2], (12, 7))
  _check_against_autodiff(swiglu_project, lambda a, b, w: (jax.nn.silu(a) * b) @ w, (gate, up, kernel), 12)


def test_rms_norm_gradient_matches_autodiff():
  """RMSNorm's hand-written backward (it keeps x and 1/rms, not the normalised x) against autodiff."""
  from mtp_jax.lean_ops import rms_norm, rms_norm_lean
  x = jax.random.normal(jax.random.key(5), (2, 5, 16)) * 2 + 0.5
  scale = jax.random.normal(jax.random.key(6), (16,))
  _check_against_autodiff(lambda x, s: rms_norm_lean(x, s, 1e-5), lambda x, s: rms_norm(x, s, 1e-5), (x, scale), 16)


def test_lean_ops_keep_bfloat16_inputs_in_bfloat16():
  from mtp_jax.lean_ops import rms_norm_lean as rms_norm, swiglu_project
  x = jnp.ones((2, 3, 8), jnp.bfloat16)
  gx, gs = jax.grad(lambda x, s: jnp.sum(rms_norm(x, s, 1e-5).astype(jnp.float32)), (0, 1))(x, jnp.ones(8))
  assert rms_norm(x, jnp.ones(8), 1e-5).dtype == gx.dtype == jnp.bfloat16 and gs.dtype == jnp.float32
  w = jnp.ones((8, 4), jnp.bfloat16)
  grads = jax.grad(lambda a, b, w: jnp.sum(swiglu_project(a, b, w).astype(jnp.float32)), (0, 1, 2))(x, x, w)
  assert all(g.dtype == jnp.bfloat16 for g in grads)


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
def test_few_rows_are_one_product_per_row_and_each_is_the_one_row_product(rows):
  """row_products.project: the same values as one contraction for any rows and contracted axes (n_in = 2: the
  attention output's heads x head_dim), split per row for 2..ROWS_UP_TO rows on CPU, where each row is then
  bit-for-bit what a one-row product gives it (a batch-1 greedy step's arithmetic)."""
  from mtp_jax import row_products
  key1, key2 = jax.random.split(jax.random.key(rows))
  x = jax.random.normal(key1, (rows, 1, 4, 64))
  kernel = jax.random.normal(key2, (4, 64, 64))      # row_products.MIN_WEIGHTS entries
  out = jax.jit(lambda x, k: row_products.project(x, k, n_in=2))(x, kernel)
  assert out.shape == (rows, 1, 64)
  np.testing.assert_allclose(out, jnp.einsum("bthd,hdf->btf", x, kernel), rtol=1e-4, atol=1e-4)
  assert not row_products.split_rows(rows, kernel.size // 2)       # smaller matrices: one product
  split = row_products.split_rows(rows, kernel.size)
  assert split == (1 < rows <= row_products.ROWS_UP_TO)   # these tests run on CPU
  one_row = jax.jit(lambda x, k: row_products.project(x, k, n_in=2))
  if split:
    for i in range(rows):
      np.testing.assert_array_equal(out[i], one_row(x[i:i + 1], kernel)[0])
  grad = jax.grad(lambda k: jnp.sum(row_products.project(x, k, n_in=2) ** 2))(kernel)
  np.testing.assert_allclose(grad, jax.grad(lambda k: jnp.sum(jnp.einsum("bthd,hdf->btf", x, k) ** 2))(kernel),
                             rtol=1e-4, atol=1e-3)
