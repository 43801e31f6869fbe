"""The optimizer, the train state and the pure train / eval steps (jit-compiled by their callers).

A TrainState is built here and nowhere else: fresh in its shardings, around given or imported parameters,
or from a restored checkpoint's parts; sharding.py only maps logical axes to the mesh.

`train.trainable` freezes parameters: the optimizer is an optax `multi_transform` over a label tree
('train' / 'frozen'), frozen leaves get `set_to_zero` and hold no optimizer state, the loss is
differentiated with respect to the trainable leaves only and sees the frozen ones through
`stop_gradient`. With the trunk and embedding frozen (trainable=heads) nothing upstream of the heads
depends on a trained parameter, so autodiff does no backward work in the trunk at all.
"""
from __future__ import annotations

import re
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mtp_jax import sharding
from mtp_jax.config import trainable_regex
from mtp_jax.errors import UserError
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


def param_path(key_path) -> str:
  """'trunk/layer/attn/q/kernel' for a pytree key path (boxes' attribute keys skipped)."""
  return "/".join(str(k.key) for k in key_path if isinstance(k, jax.tree_util.DictKey))


def trainable_mask(params, spec: str):
  """A tree of bools shaped like `params` (boxed or not): True where `train.trainable` trains the leaf."""
  regex = trainable_regex(spec)
  return jax.tree.map_with_path(lambda p, _: not regex or re.fullmatch(regex, param_path(p)) is not None, params)


def make_optimizer(train_cfg) -> optax.GradientTransformation:
  """AdamW after global-norm clipping; no weight decay on norm scales (the only 1-D parameters).

  With train.trainable other than 'all', only the trainable leaves have AdamW moments (multi_transform
  gives the frozen ones set_to_zero, whose state is empty).
  """
  t = train_cfg
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  tx = optax.chain(
      optax.clip_by_global_norm(t.grad_clip),
      optax.adamw(learning_rate_schedule(t), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=decay_mask))
  if t.get("trainable", "all") == "all":
    return tx
  # Labels of the unboxed tree: on logically boxed parameters (sharding.py builds the state from them) a
  # label per box makes multi_transform mask whole boxes, so no box is left around a frozen leaf's empty state.
  labels = lambda params: jax.tree.map(lambda m: "train" if m else "frozen",
                                       trainable_mask(nn.unbox(params), t.trainable))
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def new_train_state(params, tx) -> TrainState:
  """A step-0 TrainState around existing parameters (`init_train_state` initialises them instead).

  The jitted train step donates its state: afterwards the `params` passed here are deleted (reading
  them raises 'Array has been deleted'); pass `jax.tree.map(jnp.copy, params)` to keep a copy.
  """
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def resumed_train_state(step, params, opt_state) -> TrainState:
  """The TrainState of a restored checkpoint's parts (checkpoint.py restores them into `abstract_train_state`)."""
  return TrainState(step=step, params=params, opt_state=opt_state)


_FROZEN_WRAPPER = ".inner_states['train'].inner_state"   # multi_transform's branch of the trainable leaves


def carry_opt_state(old, new):
  """`new` (a fresh optimizer state for this run's train.trainable) with every leaf that `old` (a checkpoint's
  state under another train.trainable) holds at the same place: the step counts, so the schedule goes on,
  and the AdamW moments of parameters that trained then and still do. Returns (state, the parameter paths
  whose moments start at zero, those whose moments were dropped)."""
  key = lambda path: jax.tree_util.keystr(path).replace(_FROZEN_WRAPPER, "", 1)
  olds = {key(p): x for p, x in jax.tree_util.tree_leaves_with_path(old)}
  news = {key(p) for p, _ in jax.tree_util.tree_leaves_with_path(new)}
  moments = lambda keys: {k.split(".mu", 1)[1] for k in keys if ".mu[" in k}

  def take(path, x):
    was = olds.get(key(path))
    return x if was is None or was.shape != x.shape else jax.device_put(was, x.sharding)

  return (jax.tree_util.tree_map_with_path(take, new), sorted(moments(news) - moments(olds)),
          sorted(moments(olds) - moments(news)))


def train_state_from_params(params, tx, state_shardings) -> TrainState:
  """A step-0 TrainState holding `params` (e.g. imported weights, already in their shardings) and a fresh
  optimizer state, created in `state_shardings`."""
  opt_state = jax.jit(tx.init, out_shardings=state_shardings.opt_state)(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), state_shardings.step)
  return TrainState(step=step, params=params, opt_state=opt_state)


def _boxed_state_fn(model, tx, seq_len: int = 8):
  def boxed_state(rng):
    params = model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  return boxed_state


def abstract_train_state(model, tx, mesh, config):
  """(abstract TrainState with shardings attached, its shardings), allocating nothing.

  Optimizer moments are built from the boxed (logically annotated) parameters, so they inherit
  each parameter's logical axes and shard the same way.
  """
  boxed = jax.eval_shape(_boxed_state_fn(model, tx), jax.random.key(0))
  shardings = sharding.logical_to_shardings(nn.get_partition_spec(boxed), mesh, config)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nn.unbox(boxed), shardings)
  return abstract, shardings


def init_train_state(model, tx, mesh, config, rng):
  """A freshly initialised TrainState, created directly in its shardings (never whole on one device)."""
  _, shardings = abstract_train_state(model, tx, mesh, config)
  init = jax.jit(lambda r: nn.unbox(_boxed_state_fn(model, tx)(r)), out_shardings=shardings)
  with sharding.activate(mesh, config):
    return init(rng)


def jit_train_step(model, config, tx, mesh, state_shardings):
  """The train step jitted with the state and batch shardings (pjit's current form), state donated."""
  return jax.jit(make_train_step(model, config, tx), donate_argnums=0,
                 in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)))


def make_train_step(model: MTPTransformer, config, tx=None):
  """train_step(state, batch) -> (state, metrics); donate `state` when jitting it.

  Donation deletes the buffers of the state passed in: keep using the returned state, never the old one.
  """
  loss_fn = make_loss_fn(model, config)
  tx = tx or make_optimizer(config.train)
  schedule = learning_rate_schedule(config.train)
  spec = config.train.get("trainable", "all")

  def train_step(state: TrainState, batch):
    leaves, treedef = jax.tree.flatten(state.params)
    trains = jax.tree.leaves(trainable_mask(state.params, spec))
    if not any(trains):
      raise UserError(f"train.trainable={spec!r} matches no parameter; paths look like "
                      f"{param_path(jax.tree.leaves_with_path(state.params)[0][0])!r}")

    def merged(trained, fill):
      it = iter(trained)
      return treedef.unflatten([next(it) if t else fill(x) for x, t in zip(leaves, trains)])

    def loss_of(trained):   # frozen leaves are constants: no gradient is computed for them, or through them
      # The step is traced: a scheduled loss weight (loss.mtp_lambda) never recompiles.
      return loss_fn(merged(trained, jax.lax.stop_gradient), batch, state.step)

    trained = [x for x, t in zip(leaves, trains) if t]
    (_, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(trained)
    full_grads = merged(grads, jnp.zeros_like)   # frozen zeros are masked out by multi_transform, never used
    updates, opt_state = tx.update(full_grads, state.opt_state, state.params)
    new = optax.apply_updates(state.params, updates)
    params = jax.tree.map(lambda t, old, upd: upd if t else old, trainable_mask(state.params, spec), state.params, new)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=schedule(state.step))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(model: MTPTransformer, config):
  """eval_step(params, batch) -> per-head sums, so batches can be added up exactly before dividing."""
  loss_fn = make_loss_fn(model, config)

  def eval_step(params, batch):
    _, m = loss_fn(params, batch)
    counts = m["head_tokens"].astype(jnp.float32)
    return {"nll": m["head_losses"] * counts, "hits": m["head_accuracies"] * counts, "tokens": counts,
            "accepted": m["head_accepted"].astype(jnp.float32), "given": m["head_given"].astype(jnp.float32)}

  return eval_step
