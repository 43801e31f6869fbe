"""What a run trains on, W/data.json: written at its first start, checked at every resume.

A checkpoint's data position (the iterator state) indexes windows of the token splits the run
started with. Resumed over other text (data.path pointed elsewhere, a corpus edited, another
max_train_bytes) it would continue silently over data it never meant, and "exact resume" would
be false. The record keeps the split sizes, which any such change alters; the data's location
does not bind, so a corpus copied to a bucket resumes (with a note).
"""
import json

from mtp_jax import io
from mtp_jax.errors import UserError

FILE = "data.json"


def describe(config, data) -> dict:
  d = config.data
  return {"source": d.source, "path": d.path, "train_tokens": len(data.train), "valid_tokens": len(data.valid),
          "train_documents": len(data.train.starts), "valid_documents": len(data.valid.starts)}


SIZES = ("train_tokens", "valid_tokens", "train_documents", "valid_documents")


def _where(record: dict) -> str:
  return f"data.source={record['source']!r}" + (f", data.path={record['path']!r}" if record.get("path") else "")


def check(workdir: io.Path, trained: bool, now: dict) -> str | None:
  """Refuse to resume a trained run over other data; returns a note when only the data's location moved."""
  path = workdir / FILE
  if not trained or not path.exists():        # a new run, or one from before this record: nothing to hold to
    return None
  try:
    then = json.loads(path.read_text())
    then_sizes, _ = [int(then[k]) for k in SIZES], then["source"]
  except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
    raise UserError(f"{path} is damaged ({type(e).__name__}: {e}), so this run's data cannot be checked; restore it "
                    f"(or delete it to resume without the check)")
  if then_sizes != [now[k] for k in SIZES]:
    def sizes(r):
      return (f"{r['train_tokens']:,} train tokens in {r['train_documents']:,} documents, "
              f"{r['valid_tokens']:,} valid tokens in {r['valid_documents']:,}")
    raise UserError(f"{workdir} trained on other data: {_where(then)} gave {sizes(then)}; this config's "
                    f"{_where(now)} gives {sizes(now)}. Its checkpoint's data position would continue over other "
                    f"text. Resume with the run's data settings ({workdir / 'config.json'}), or train on this "
                    f"data in a new --workdir")
  if (then["source"], then.get("path")) != (now["source"], now["path"]):
    return f"the data moved ({_where(then)} -> {_where(now)}); the same split sizes, so resuming over it"
  return None


def write(workdir: io.Path, now: dict) -> None:
  io.write_text(workdir / FILE, json.dumps(now, indent=2, sort_keys=True))
