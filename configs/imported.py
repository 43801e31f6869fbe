"""Fine-tune a model that `python -m mtp_jax.convert import` wrote: its config.json, as the recipe.

    python -m mtp_jax.convert import --from=path/to/hf_model --workdir=W --n_future=4
    python -m mtp_jax.main --config=configs/imported.py:W --workdir=W --config.train.trainable=heads \
        --config.data.source=jsonl --config.data.path=my.jsonl

The model fields must stay as imported (the checkpoint's shapes); data and train fields are yours.
"""
import json
import os

from mtp_jax.config import base_config


def _update(c, d):
  for k, v in d.items():
    if k == "rules":                # tuples in the recipe, lists in JSON: keep the recipe's default
      continue
    if isinstance(v, dict):
      _update(c[k], v)
    else:
      c[k] = v


def get_config(arg=None):
  if not arg:
    raise ValueError("configs/imported.py needs the workdir: --config=configs/imported.py:W")
  path = os.path.join(os.path.expanduser(arg), "config.json")
  if not os.path.exists(path):
    raise ValueError(f"{path} does not exist; import a model first (python -m mtp_jax.convert import "
                     f"--from=DIR --workdir={arg})")
  c = base_config()
  with open(path) as f:
    _update(c, json.load(f))
  return c
