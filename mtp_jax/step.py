"""The optimizer, the train state and the pure train / eval steps (jit-compiled by their callers)."""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from mtp_jax.loss import make_loss_fn
from mtp_jax.model import MTPTransformer


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def learning_rate_schedule(train_cfg) -> optax.Schedule:
  """Linear warmup to learning_rate, then cosine decay to learning_rate * min_lr_ratio at train.steps."""
  t = train_cfg
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.learning_rate, warmup_steps=t.warmup_steps,
      decay_steps=max(t.steps, t.warmup_steps + 1), end_value=t.learning_rate * t.min_lr_ratio)


def make_optimizer(train_cfg) -> optax.GradientTransformation:
  """AdamW after global-norm clipping; no weight decay on norm scales (the only 1-D parameters)."""
  t = train_cfg
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  return optax.chain(
      optax.clip_by_global_norm(t.grad_clip),
      optax.adamw(learning_rate_schedule(t), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=decay_mask))


def init_train_state(params, tx) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def make_train_step(model: MTPTransformer, config, tx=None):
  """train_step(state, batch) -> (state, metrics); donate `state` when jitting it."""
  loss_fn = make_loss_fn(model, config)
  tx = tx or make_optimizer(config.train)
  schedule = learning_rate_schedule(config.train)

  def train_step(state: TrainState, batch):
    # The step is traced: a scheduled loss weight (loss.mtp_lambda) never recompiles.
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, state.step)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=schedule(state.step))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(model: MTPTransformer, config):
  """eval_step(params, batch) -> per-head sums, so batches can be added up exactly before dividing."""
  loss_fn = make_loss_fn(model, config)

  def eval_step(params, batch):
    _, m = loss_fn(params, batch)
    counts = m["head_tokens"].astype(jnp.float32)
    return {"nll": m["head_losses"] * counts, "hits": m["head_accuracies"] * counts, "tokens": counts}

  return eval_step
