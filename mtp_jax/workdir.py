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
    W/draft_vocab.npy              token ids, most frequent first: what drafts may choose among (--draft_vocab)
    W/.lock                        held while a run lives (io.lock_workdir)

Every module that reads or writes one of these takes its name from here; nothing else spells them. A run
checks its workdir here before writing anything (`check_path`, `check_shape`) and holds it (`lock`).
"""
from __future__ import annotations

import json
import os

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
DRAFT_VOCAB = "draft_vocab.npy"
LOCK = io.LOCK


def config_path(workdir) -> io.Path:
  return io.path(workdir) / CONFIG_FILE


def is_run(workdir) -> bool:
  """Whether `workdir` is a run directory (training or an import wrote its config.json)."""
  return config_path(workdir).exists()


def has_pretrained(workdir) -> bool:
  """Whether `convert import` wrote parameters here (W/pretrained)."""
  return (io.path(workdir) / PRETRAINED).is_dir()


def read_draft_vocab(workdir, n: int, flag: str = "--draft_vocab"):
  """The first n ids of W/draft_vocab.npy (the ranking experiments/real_model/real_model_heads.py writes)."""
  import numpy as np
  path = io.path(workdir) / DRAFT_VOCAB
  if not path.exists():
    raise UserError(f"{flag}={n} needs {path}, token ids ranked by frequency (experiments/real_model/real_model_heads.py "
                    f"writes it); leave {flag} unset to draft over the whole vocabulary")
  with path.open("rb") as f:
    try:
      ranking = np.load(f)
    except ValueError as e:
      raise UserError(f"{path} is not a numpy array of token ids ({e}); write it again")
  if ranking.ndim != 1:
    raise UserError(f"{path} holds an array of shape {ranking.shape}, not a list of token ids; write it again")
  if n > len(ranking):
    raise UserError(f"{flag}={n}: {path} ranks {len(ranking)} tokens; use {flag}<={len(ranking)}, or leave it "
                    f"unset to draft over the whole vocabulary")
  return ranking[:n]


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

def step_dirs(workdir) -> list[int]:
  """The committed checkpoint steps under W/checkpoints, by listing alone (no orbax; tmp dirs excluded)."""
  root = io.path(workdir) / CHECKPOINTS
  if not root.is_dir():
    return []
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir())


def _shape_fields(cfg: dict) -> dict:
  """The fields a checkpoint's shapes (and meaning) depend on: every model field, seq_len, tokenizer."""
  fields = {f"model.{k}": v for k, v in cfg["model"].items()}
  fields.update({f"data.{k}": cfg["data"][k] for k in ("seq_len", "tokenizer")})
  return fields


def check_path(workdir) -> io.Path:
  """The workdir as a path (~ expanded; bucket URLs as they are), refused before anything is written if it
  cannot be a writable directory: it is a file, a parent of it is a file, the place it lives in is
  read-only, or its bucket cannot be reached."""
  workdir = io.path(workdir)
  if io.is_remote(workdir):
    io.check_bucket(workdir, "--workdir")
    return workdir
  if workdir.exists() and not workdir.is_dir():
    raise UserError(f"--workdir={workdir} is a file, not a directory; give a directory (new or a run's)")
  place = workdir
  while not place.exists() and place != place.parent:
    place = place.parent
  if not place.is_dir():
    raise UserError(f"--workdir={workdir} cannot be created: {place} is a file; give a path under a directory")
  if not os.access(place, os.W_OK | os.X_OK):
    why = "read-only file system" if _read_only_fs(place) else "no write permission"
    raise UserError(f"--workdir={workdir}: cannot write in {place} ({why}); give a writable --workdir")
  return workdir


def _read_only_fs(path) -> bool:
  try:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
  except OSError:
    return False


def check_shape(config, workdir: io.Path) -> None:
  """Refuse (before writing anything) a workdir whose run has another model shape.

  Only a workdir with a checkpoint, or with imported weights, has a shape: the config.json of a start
  that failed before its first checkpoint (a mesh error, a loss NaN at step 1) is provisional and gets
  overwritten."""
  path = config_path(workdir)
  trained = bool(step_dirs(workdir))
  if not trained and not has_pretrained(workdir):
    return
  if not path.exists():
    raise UserError(f"{workdir} holds checkpoints but no {CONFIG_FILE}, so their shapes cannot be "
                    f"checked; use a new --workdir (or restore {path})")
  try:
    old = _shape_fields(json.loads(path.read_text()))
  except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
    raise UserError(f"{path} is damaged ({type(e).__name__}: {e}), so the checkpoints' shapes cannot be checked; "
                    f"restore it, or use a new --workdir")
  old.setdefault("model.rope_scaling", base_config().model.rope_scaling.to_dict())   # runs from before the field
  new = _shape_fields(config.to_dict())
  if not trained:   # an import that has not trained yet: the weights' shapes bind, and the tokenizer they read
    new = {k: v for k, v in new.items() if k.startswith("model.") or k == "data.tokenizer"}
  diffs = [f"{k}={old.get(k)!r} there vs {new[k]!r} now" for k in new if old.get(k) != new[k]]
  if diffs and not trained:
    raise UserError(f"{workdir} holds an imported model that this config does not fit ({'; '.join(diffs)}): the "
                    f"imported weights only make sense with their own shapes and tokenizer; drop these overrides "
                    f"(configs/imported.py:{workdir} sets them), or import into a new --workdir")
  if diffs:
    raise UserError(f"{workdir} holds a run with another model shape ({'; '.join(diffs)}); use a new --workdir, "
                    f"or the run's own values to resume it")


def lock(workdir: io.Path):
  """Hold the workdir while this run lives (local: flock on W/.lock, dropped by the OS even on SIGKILL;
  gs://: a lease object, see io.lock_workdir). Returns the lock; close it at exit."""
  try:
    return io.lock_workdir(workdir)
  except OSError as e:
    raise UserError(f"--workdir={workdir}: cannot write there ({e.strerror or e}); give a writable --workdir")
