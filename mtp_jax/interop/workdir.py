"""Writing an imported model's workdir: config.json, the tokenizer, and the parameters in W/pretrained (orbax).

Training finds no checkpoint there, so it starts at step 0 from W/pretrained with a fresh optimizer,
the configured data and schedule; its own checkpoints (W/checkpoints) take over from the first save.
`generate` and `export` read W/pretrained while no checkpoint exists (checkpoint.load_pretrained; the
layout's names are mtp_jax.workdir's). The workdir is written in a sibling temporary directory and
renamed into place, so a failed import leaves nothing behind. A bucket workdir (gs://) is written
locally first, then uploaded with config.json last (a workdir without config.json is not a workdir),
and the upload is removed if it fails.
"""
from __future__ import annotations

from mtp_jax import io
from mtp_jax.interop.tensors import ConvertError
from mtp_jax.workdir import CONFIG_FILE, PRETRAINED, config_json


def check_target(workdir):
  """Refuse a workdir that holds anything (a run, another import); returns it absolute."""
  return io.require_new_dir(workdir, "--workdir", "import", ConvertError)


def write_workdir(workdir, config, params, tokenizer):
  """config.json + tokenizer files + W/pretrained, all or nothing; parameters holding NaN/inf are refused by
  name before anything is written (every importer comes through here)."""
  import orbax.checkpoint as ocp
  from mtp_jax import tokenizer as tokenizer_lib
  from mtp_jax.interop.assemble import check_finite

  workdir = check_target(workdir)
  check_finite(params)
  with io.new_dir(workdir, "--workdir", last=CONFIG_FILE) as tmp:
    (tmp / CONFIG_FILE).write_text(config_json(config))
    tokenizer_lib.save_to_workdir(tokenizer, tmp)
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(tmp / PRETRAINED, params)
      ckptr.wait_until_finished()
  return workdir
