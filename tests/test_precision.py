"""Mixed precision: bfloat16 compute with float32 parameters, optimizer state and loss tracks float32 training."""
import jax
import jax.numpy as jnp
import numpy as np

from mtp_jax.model import build_model, init_params
from mtp_jax.step import make_optimizer, make_train_step, new_train_state

STEPS = 25
# Stated tolerance: every step's loss within 2% of the float32 run's (bf16 has an 8-bit mantissa:
# ~0.4% per rounding), and both fall by more than half, so the test can tell tracking from noise.
REL_TOL = 0.02


def _losses(config, batches):
  model, tx = build_model(config.model), make_optimizer(config.train)
  state = new_train_state(init_params(model, jax.random.key(0)), tx)
  step = jax.jit(make_train_step(model, config, tx))
  losses = []
  for batch in batches:
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  return np.array(losses), state


def test_bfloat16_training_tracks_float32(make_config):
  def config(dtype):
    c = make_config(n_future=2, dtype=dtype, param_dtype="float32")
    c.train.update(steps=STEPS, warmup_steps=2, learning_rate=1e-2)
    return c
  # A few fixed batches in rotation, so the loss falls fast and far.
  batches = [{"tokens": jax.random.randint(jax.random.key(i), (2, 18), 0, 64)} for i in range(3)]
  batches = [batches[i % 3] for i in range(STEPS)]
  ref, _ = _losses(config("float32"), batches)
  bf16, state = _losses(config("bfloat16"), batches)
  assert ref[-1] < 0.5 * ref[0] and bf16[-1] < 0.5 * bf16[0]
  np.testing.assert_array_less(np.abs(bf16 - ref), REL_TOL * ref)
  leaves = jax.tree.leaves(state.params) + [x for x in jax.tree.leaves(state.opt_state) if x.ndim]
  assert all(x.dtype == jnp.float32 for x in leaves)          # parameters and AdamW moments stay f32
