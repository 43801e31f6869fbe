"""A run directory's layout, in one place: the names of its files, and the reading and writing of config.json.

    W/config.json                  the run's config; written at every start, it binds the model shape once
                                   W holds weights (a checkpoint or an import)
    W/checkpoints/<step>/          orbax checkpoints: train state, RNG, data iterator (checkpoint.py)
    W/checkpoints_corrupt/         damaged checkpoints moved aside on restore
    W/pretrained/                  parameters `convert import` wrote, read while no checkpoint exists
    W/tokenizer.model              the run's SentencePiece model (nothing for bytes); an imported Hugging
    W/tokenizer.json               Face tokenizer is tokenizer.json + special_tokens.json (tokenizer.py)
    W/special_tokens.json
    W/data.json                    what the run reads: source, tokenizer, token counts (data_record.py)
    W/metrics.jsonl                train and validation records (metrics.py)
    W/.lock                        held while a run lives (io.lock_workdir)

Every module that reads or writes one of these takes its name from here; nothing else spells them.
"""
from __future__ import annotations

import json

import ml_collections

from mtp_jax import io
from mtp_jax.config import base_config
from mtp_jax.errors import UserError

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"
CORRUPT = "checkpoints_corrupt"
PRETRAINED = "pretrained"
TOKENIZER_MODEL = "tokenizer.model"
HF_TOKENIZER = "tokenizer.json"
HF_SPECIAL_TOKENS = "special_tokens.json"
DATA_RECORD = "data.json"
METRICS = "metrics.jsonl"
LOCK = io.LOCK


def config_path(workdir) -> io.Path:
  return io.path(workdir) / CONFIG_FILE


def is_run(workdir) -> bool:
  """Whether `workdir` is a run directory (training or an import wrote its config.json)."""
  return config_path(workdir).exists()


def has_pretrained(workdir) -> bool:
  """Whether `convert import` wrote parameters here (W/pretrained)."""
  return (io.path(workdir) / PRETRAINED).is_dir()


def write_config(config, workdir) -> None:
  io.write_text(config_path(workdir), config_json(config))


def config_json(config) -> str:
  return config.to_json(indent=2, sort_keys=True)


def read_json(workdir) -> dict | None:
  """W/config.json as a plain dict (None if there is none); UserError if it is not JSON."""
  path = config_path(workdir)
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise UserError(f"{path} is damaged (not JSON: {e}); restore it, or rerun the training command that made "
                    f"this run (it rewrites {CONFIG_FILE})")


def read_config(workdir) -> ml_collections.ConfigDict:
  """W/config.json as a ConfigDict, with every field of base_config() present (UserError otherwise)."""
  path = config_path(workdir)
  saved = read_json(workdir)
  if saved is None:
    raise UserError(f"{workdir} has no {CONFIG_FILE}: not a training run directory (train with "
                    f"python -m mtp_jax.main --config=... --workdir={workdir})")
  # The shape fields must be there (they cannot be guessed); any other missing field takes its default.
  need = [f"model.{k}" for k in base_config().model] + ["data.tokenizer", "data.seq_len"]
  missing = [k for k in need if not _has(saved, k)]
  if missing:
    raise UserError(f"{path} lacks {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}: damaged or "
                    f"written by another version; restore it, or rerun the training command that made this run")
  config = base_config()
  try:
    config.update_from_flattened_dict({k: _get(saved, k) for k in _flat_keys(config.to_dict()) if _has(saved, k)})
  except (TypeError, ValueError, KeyError) as e:
    raise UserError(f"{path} is damaged ({_first_line(e)}); restore it, or rerun the training command that made "
                    f"this run")
  return config


def _first_line(e: BaseException) -> str:
  return ((str(e).strip().splitlines() or [type(e).__name__])[0])[:200]


def _flat_keys(d: dict, prefix: str = "") -> list[str]:
  out = []
  for k, v in d.items():
    out += _flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
  return out


def _has(d, dotted: str) -> bool:
  for part in dotted.split("."):
    if not isinstance(d, dict) or part not in d:
      return False
    d = d[part]
  return True


def _get(d, dotted: str):
  for part in dotted.split("."):
    d = d[part]
  return d
