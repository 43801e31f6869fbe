"""Orbax checkpoints of a run: params, optimizer state, step + RNG key, and the grain iterator position.

Layout: W/checkpoints/<step>/{params,opt_state,meta,data}; each item restores on its own, so
`load_params` reads only the parameters. Saving is asynchronous (the arrays are copied to host
before `save` returns, so the next donated train step may reuse their buffers); call
`wait_until_finished()` before exit. A checkpoint that fails to restore (damaged files) is moved to
W/checkpoints_corrupt/<step> with a warning and the previous one is used instead.
"""
from __future__ import annotations

import json

import grain
import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from mtp_jax import io
from mtp_jax.errors import UserError

CHECKPOINTS = "checkpoints"
CORRUPT = "checkpoints_corrupt"


def with_shardings(abstract, shardings=None):
  """ShapeDtypeStructs that carry shardings, so orbax restores each array where it belongs.

  `shardings`: a matching pytree of jax.sharding.Sharding; default: every array on the first device.
  """
  if shardings is None:
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


class Checkpointer:
  """The CheckpointManager of one workdir, with fallback past damaged checkpoints."""

  def __init__(self, workdir, keep: int = 3, read_only: bool = False):
    # orbax wants absolute paths; the README passes a relative --workdir
    self.workdir, self.read_only = io.absolute(workdir), read_only
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only,
                                           enable_async_checkpointing=not read_only,
                                           cleanup_tmp_directories=not read_only)
    self.manager = ocp.CheckpointManager(self.workdir / CHECKPOINTS, options=options)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  @staticmethod
  def train_targets(abstract_state, abstract_rng_data, data_iter) -> dict:
    """Restore args for everything `save` writes; the data iterator is reset in place."""
    meta = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=abstract_state.step.sharding),
            "rng": abstract_rng_data}
    return {"params": ocp.args.StandardRestore(abstract_state.params),
            "opt_state": ocp.args.StandardRestore(abstract_state.opt_state),
            "meta": ocp.args.StandardRestore(meta),
            "data": grain.checkpoint.CheckpointRestore(data_iter)}

  def save(self, step: int, state, rng, data_iter) -> None:
    """Start an async save of `state` (step.TrainState), the RNG key and the data iterator position."""
    # The key lives on one device; a multi-host save needs global arrays: replicate it like the step.
    meta = {"step": state.step, "rng": jax.device_put(np.asarray(jax.random.key_data(rng)), state.step.sharding)}
    self.manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        opt_state=ocp.args.StandardSave(state.opt_state),
        meta=ocp.args.StandardSave(meta),
        data=grain.checkpoint.CheckpointSave(data_iter)), force=True)

  def restore_latest(self, **targets):
    """Restore the named items (orbax restore args) of the newest good checkpoint: (step, items) or (0, None)."""
    for step in reversed(self.steps()):
      try:
        return step, self.manager.restore(step, args=ocp.args.Composite(**targets))
      except Exception as e:  # any damage: unreadable metadata, truncated arrays, missing files
        self._quarantine(step, e)
    return 0, None

  def _quarantine(self, step: int, error: Exception) -> None:
    src = self.workdir / CHECKPOINTS / str(step)
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    if self.read_only:  # a reader must not move files: just skip it
      logging.warning("checkpoint %s is unreadable (%s); trying the previous one", src, first)
      print(f"warning: checkpoint {src} is unreadable ({first}); using the previous one", flush=True)
      return
    dst = self.workdir / CORRUPT / str(step)
    io.move_tree(src, dst)
    self.manager.reload()
    print(f"warning: checkpoint step {step} is unreadable ({type(error).__name__}: {first}); moved it to {dst} "
          f"and falling back to the previous checkpoint", flush=True)

  def wait_until_finished(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def read_config(workdir) -> ml_collections.ConfigDict:
  path = io.path(workdir) / "config.json"
  if not path.exists():
    raise UserError(f"{workdir} has no config.json: not a training run directory (train with "
                    f"python -m mtp_jax.main --config=... --workdir={workdir})")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def load_params(workdir):
  """(params, config) of a run's latest good checkpoint, params only (for generate.py and notebooks)."""
  from mtp_jax.model import abstract_params, build_model   # model code only where it is needed

  config = read_config(workdir)
  abstract, _ = abstract_params(build_model(config.model))
  ckpt = Checkpointer(workdir, read_only=True) if (io.path(workdir) / CHECKPOINTS).is_dir() else None
  if ckpt is None or not ckpt.steps():
    raise UserError(f"{workdir} has no checkpoint yet; train first (python -m mtp_jax.main "
                    f"--config=... --workdir={workdir}) or pass another workdir")
  try:
    step, restored = ckpt.restore_latest(params=ocp.args.StandardRestore(with_shardings(abstract)))
  finally:
    ckpt.close()
  if restored is None:
    raise UserError(f"every checkpoint in {io.path(workdir) / CHECKPOINTS} is unreadable; retrain or restore them")
  logging.info("loaded params of step %d from %s", step, workdir)
  return restored.params, config
