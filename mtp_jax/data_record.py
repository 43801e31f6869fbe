"""What a run trains on, W/data.json: written at its first start, checked at every resume.

A checkpoint's data position (the iterator state) indexes windows of the token splits the run
started with. Resumed over other text (data.path pointed elsewhere, a corpus edited, another
max_train_bytes) it would continue silently over data it never meant, and "exact resume" would
be false. The record keeps each split's size and a digest of its token stream; the settings that produced them do not bind, so another
spelling of the same data resumes, with a note.
"""
import hashlib
import json

import numpy as np

from mtp_jax import io
from mtp_jax import workdir as workdir_lib
from mtp_jax.errors import UserError

FILE = workdir_lib.DATA_RECORD
SETTINGS = ("source", "path", "text_field", "valid_fraction", "max_train_bytes")
IDENTITY = ("train_tokens", "valid_tokens", "train_documents", "valid_documents", "train_digest", "valid_digest")
_SAMPLES, _SAMPLE_LEN, _CHUNK = 64, 64, 1 << 26


def digest(split) -> str:
  """sha256 of the split's document starts and its tokens: all of them when they are a local array (the
  token cache: about a second per GB), 64 runs spread along them for prepared shards, which are written
  once by `prepare` and may live in a bucket (reading them all would download the corpus)."""
  h = hashlib.sha256(np.asarray(split.starts, np.int64).tobytes())
  n = len(split)
  if isinstance(split.tokens, np.ndarray):
    for lo in range(0, n, _CHUNK):
      h.update(np.ascontiguousarray(split.tokens[lo:lo + _CHUNK]).data)
  else:
    for i in range(_SAMPLES):
      lo = n * i // _SAMPLES
      h.update(np.asarray(split.tokens[lo:min(lo + _SAMPLE_LEN, n)], np.int64).tobytes())
  return h.hexdigest()[:16]


def describe(config, data) -> dict:
  record = {k: config.data[k] for k in SETTINGS}
  for name, split in (("train", data.train), ("valid", data.valid)):
    record.update({f"{name}_tokens": len(split), f"{name}_documents": len(split.starts),
                   f"{name}_digest": digest(split)})
  return record


def _where(record: dict, other: dict) -> str:
  """data.source (and data.path when set), and the other settings where `record` differs from `other`."""
  return ", ".join(f"data.{k}={record[k]!r}" for k in SETTINGS
                   if k == "source" or (k == "path" and record[k]) or record[k] != other[k])


def _sizes(r: dict) -> str:
  return (f"{r['train_tokens']:,} train tokens in {r['train_documents']:,} documents, "
          f"{r['valid_tokens']:,} valid tokens in {r['valid_documents']:,}")


def check(workdir: io.Path, trained: bool, now: dict) -> str | None:
  """Refuse to resume a trained run over other data; returns a note when only the settings spelling it changed."""
  path = workdir / FILE
  if not trained or not path.exists():        # a new run, or one from before this record: nothing to hold to
    return None
  try:
    then = json.loads(path.read_text())
    same_data = all(then[k] == now[k] for k in IDENTITY)
    same_settings = all(then[k] == now[k] for k in SETTINGS)
  except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
    raise UserError(f"{path} is damaged ({type(e).__name__}: {e}), so this run's data cannot be checked; restore it "
                    f"(or delete it to resume without the check)")
  if not same_data:
    why = (f"the data under the same settings ({_where(now, then)}) changed since the run started: it gave "
           f"{_sizes(then)}, and now gives {_sizes(now)}" if same_settings else
           f"{_where(then, now)} gave {_sizes(then)}; this config's {_where(now, then)} gives {_sizes(now)}")
    raise UserError(f"{workdir} trained on other data: {why}. Its checkpoint's data position would continue over "
                    f"other text. Resume with the run's own data (settings in {workdir_lib.config_path(workdir)}), "
                    f"or train on this data in a new --workdir")
  if not same_settings:
    return (f"the data settings changed ({_where(then, now)} -> {_where(now, then)}) but give the same tokens; "
            f"resuming over them")
  return None


def write(workdir: io.Path, now: dict) -> None:
  io.write_text(workdir / FILE, json.dumps(now, indent=2, sort_keys=True))
