"""The multi-token loss: scan == naive (loss and gradients), chunking, targets and masking."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtp_jax.config import ConfigError, head_weights
from mtp_jax.loss import make_loss_fn, shifted_targets
from mtp_jax.model import build_model, init_params
from helpers import loss_batch
from tolerances import assert_close, assert_trees_close, network_k


_SLOW = pytest.mark.slow   # CI keeps one case per head type and the n=1 lean path; -m slow runs the rest


@pytest.mark.parametrize("head_type,n", [
    ("parallel", 1), ("parallel", 4), ("causal", 2), ("linear", 4),
    pytest.param("parallel", 2, marks=_SLOW), pytest.param("causal", 1, marks=_SLOW),
    pytest.param("causal", 4, marks=_SLOW), pytest.param("linear", 1, marks=_SLOW),
    pytest.param("linear", 2, marks=_SLOW)])
def test_scan_equals_naive(make_config, head_type, n):
  """Loss, per-head metrics and every gradient agree, unchunked and chunked (f32, tight)."""
  config = make_config(head_type=head_type, n_future=n, n_layers=5)
  model = build_model(config.model)
  params = init_params(model, jax.random.key(0))
  batch = loss_batch(n)
  results = {}
  for impl, chunk in (("naive", 0), ("scan", 0), ("scan", 4)):
    config.loss.impl, config.loss.chunk_size = impl, chunk
    fn = jax.jit(jax.value_and_grad(make_loss_fn(model, config), has_aux=True))
    results[impl, chunk] = fn(params, batch)
  (ref_loss, ref_m), ref_g = results["naive", 0]
  k = network_k(config, batch["tokens"].shape[0])
  for key in (("scan", 0), ("scan", 4)):
    (loss, m), g = results[key]
    assert_close(loss, ref_loss, k, err_msg=str(key))
    assert_close(m["head_losses"], ref_m["head_losses"], k)
    np.testing.assert_array_equal(m["head_accuracies"], ref_m["head_accuracies"])
    np.testing.assert_array_equal(m["head_tokens"], ref_m["head_tokens"])
    assert_trees_close(g, ref_g, k, err_msg=str(key))


def test_naive_loss_is_the_textbook_cross_entropy(make_config):
  """Per-head loss = mean over unmasked positions of -log softmax(logits_i)[x_{t+i}]."""
  config = make_config(n_future=2)
  config.loss.impl = "naive"
  model = build_model(config.model)
  params = init_params(model, jax.random.key(0))
  batch = loss_batch(2)
  _, m = make_loss_fn(model, config)(params, batch)
  logits, _ = model.apply({"params": params}, batch["tokens"][:, :16], segment_ids=batch["segment_ids"][:, :16])
  logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
  tok, seg = np.asarray(batch["tokens"]), np.asarray(batch["segment_ids"])
  for i in range(2):
    nll = [-logp[i, b, t, tok[b, t + i + 1]] for b in range(3) for t in range(16)
           if seg[b, t] != 0 and seg[b, t + i + 1] == seg[b, t]]
    assert_close(m["head_losses"][i], np.mean(nll), network_k(config, 3))


def test_targets_shift_and_mask_by_hand():
  """Head i's target at t is token t+i; masked past the end, on padding and across documents."""
  batch = {"tokens": jnp.array([[10, 11, 12, 13, 14, 15, 16]]),
           "segment_ids": jnp.array([[1, 1, 1, 2, 2, 2, 0]])}
  t1, m1 = shifted_targets(batch, 5, 1, 3)
  np.testing.assert_array_equal(t1, [[11, 12, 13, 14, 15]])
  np.testing.assert_array_equal(m1, [[1, 1, 0, 1, 1]])           # 12 -> 13 crosses documents
  t3, m3 = shifted_targets(batch, 5, 3, 3)
  np.testing.assert_array_equal(t3, [[13, 14, 15, 16, 0]])
  np.testing.assert_array_equal(m3, [[0, 0, 0, 0, 0]])           # all cross, hit padding or run off the end
  t2, m2 = shifted_targets(batch, 5, 2, 3)
  np.testing.assert_array_equal(m2, [[1, 0, 0, 1, 0]])           # 13->15 same doc; 14->16 is padding


def test_no_segment_ids_masks_only_the_end(make_config):
  config = make_config(n_future=3)
  model = build_model(config.model)
  params = init_params(model, jax.random.key(0))
  _, m = make_loss_fn(model, config)(params, {"tokens": jnp.zeros((2, 16), jnp.int32)})   # L = seq_len
  np.testing.assert_array_equal(m["head_tokens"], [2 * 15, 2 * 14, 2 * 13])


def test_head_weights():
  assert head_weights("uniform", 3) == [1.0, 1.0, 1.0]
  assert head_weights("geometric:0.5", 3) == [1.0, 0.5, 0.25]
  assert head_weights("1,0,2", 3) == [1.0, 0.0, 2.0]
  for bad in ("1,2", "geometric:x", "a,b,c", "-1,1,1"):
    with pytest.raises(ConfigError):
      head_weights(bad, 3)


def test_weighted_total(make_config):
  config = make_config(n_future=2)
  config.loss.head_weights = "3,1"
  model = build_model(config.model)
  params = init_params(model, jax.random.key(0))
  loss, m = make_loss_fn(model, config)(params, loss_batch(2))
  assert_close(loss, (3 * m["head_losses"][0] + m["head_losses"][1]) / 4, 2)   # the same numbers, summed again
