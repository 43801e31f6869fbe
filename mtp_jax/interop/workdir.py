"""An imported model's workdir: config.json, the tokenizer, and the parameters in W/pretrained (orbax).

Training finds no checkpoint there, so it starts at step 0 from W/pretrained with a fresh optimizer,
the configured data and schedule; its own checkpoints (W/checkpoints) take over from the first save.
`generate` and `export` read W/pretrained while no checkpoint exists. The workdir is written in a
sibling temporary directory and renamed into place, so a failed import leaves nothing behind. A
bucket workdir (gs://) is written locally first, then uploaded with config.json last (a workdir
without config.json is not a workdir), and the upload is removed if it fails.
"""
from __future__ import annotations

import jax

from mtp_jax import io
from mtp_jax.interop.tensors import ConvertError

PRETRAINED = "pretrained"
CONFIG_FILE = "config.json"


def check_target(workdir):
  """Refuse a workdir that holds anything (a run, another import); returns it absolute."""
  return io.require_new_dir(workdir, "--workdir", "import", ConvertError)


def write_workdir(workdir, config, params, tokenizer):
  """config.json + tokenizer files + W/pretrained, all or nothing."""
  import orbax.checkpoint as ocp
  from mtp_jax import tokenizer as tokenizer_lib

  workdir = check_target(workdir)
  with io.new_dir(workdir, "--workdir", last=CONFIG_FILE) as tmp:
    (tmp / CONFIG_FILE).write_text(config.to_json(indent=2, sort_keys=True))
    tokenizer_lib.save_to_workdir(tokenizer, tmp)
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(tmp / PRETRAINED, params)
      ckptr.wait_until_finished()
  return workdir


def has_pretrained(workdir) -> bool:
  return (io.path(workdir) / PRETRAINED).is_dir()


def load_pretrained(workdir, abstract):
  """The imported parameters, restored into `abstract` (ShapeDtypeStructs, with shardings if given)."""
  import orbax.checkpoint as ocp
  from mtp_jax.checkpoint import with_shardings

  if all(getattr(a, "sharding", None) is None for a in jax.tree.leaves(abstract)):
    abstract = with_shardings(abstract)
  path = io.absolute(workdir) / PRETRAINED
  try:
    with ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(path, abstract)
  except Exception as e:
    raise ConvertError(f"{path} is unreadable or does not match config.json "
                       f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); import again")


def init_state_from_pretrained(workdir, abstract_state, state_shardings, tx):
  """A TrainState at step 0 holding the imported parameters and a fresh optimizer state, in its shardings."""
  from mtp_jax.step import TrainState
  params = load_pretrained(workdir, abstract_state.params)
  opt_state = jax.jit(tx.init, out_shardings=state_shardings.opt_state)(params)
  step = jax.device_put(jax.numpy.zeros((), jax.numpy.int32), state_shardings.step)
  return TrainState(step=step, params=params, opt_state=opt_state)
