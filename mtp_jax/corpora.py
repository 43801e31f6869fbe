"""Where documents come from: the files of a corpus, and the documents inside each file.

Sources (config.data.source), each local or on a bucket (gs://, through io.py):
  stdlib   the running interpreter's standard library: every .py file under sysconfig's stdlib dir,
           except site-packages/dist-packages and test directories, in sorted order.
  glob     every file data.path matches (`**` recurses) is one document.
  jsonl    data.path (a file or a glob; .gz / .zst decompressed by suffix): one JSON object per
           line, text in field data.text_field.
  parquet  data.path (a file or a glob): one document per row of column data.text_field, read one
           row group at a time (the layout of the common web-scale corpora).
  hf_disk  a Hugging Face `datasets` directory written by `save_to_disk` (a DatasetDict: its
           `train` split): its Arrow files read with pyarrow alone, column data.text_field.

A corpus is a list of files; `file_docs` gives the documents of one file, so the single-process
path (Corpus, read by data.py) and the Beam pipeline (prepare.py, one file per work item) list the
same documents under the same names.

Train/valid split by whole document: a document is held out when a hash of its name falls below
data.valid_fraction (stable across runs and machines). Unreadable or non-UTF-8 files, and records whose
text is not UTF-8, are skipped and counted as such (bad JSONL lines / rows too, apart); a file that cannot
be read to its end (a truncated .gz) stops the run with one error naming it. data.max_train_bytes > 0 caps the training text (and the
validation text in proportion) for quick tests.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import sysconfig
from typing import Callable, Optional

from mtp_jax import io
from mtp_jax.errors import UserError, require

SOURCES = ("stdlib", "glob", "jsonl", "parquet", "hf_disk")
# Lone surrogates: the bytes of a line that are not UTF-8 (io.open_text decodes them so), or a JSON escape
# such as "\udc80" that is no character. Such text is skipped and counted, never read as U+FFFD.
_NOT_TEXT = re.compile("[\ud800-\udfff]")
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclasses.dataclass(frozen=True)
class Doc:
  name: str                              # what the split hashes, and what messages show
  read: Callable[[], Optional[str]]      # the text, or None when unreadable / not UTF-8
  size: int = 0
  mtime_ns: int = 0


@dataclasses.dataclass(frozen=True)
class File:
  url: str          # local path or bucket URL
  name: str         # how its documents are named
  size: int
  version: str      # mtime (local) or generation / update time (bucket): any edit changes it


def _read_local(path: str) -> Optional[str]:
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except (OSError, UnicodeDecodeError):
    return None


def _read_remote(url: str) -> Optional[str]:
  try:
    return io.path(url).read_bytes().decode("utf-8")
  except UnicodeDecodeError:
    return None


def _file(url: str, name: Optional[str] = None) -> File:
  if io.is_remote(url):
    fs, rel = io.fsspec_of(url)
    info = fs.info(rel)
    version = str(info.get("generation") or info.get("updated") or info.get("mtime") or "")
    return File(url, name or url, int(info.get("size") or 0), version)
  st = os.stat(url)
  return File(url, name or url, st.st_size, str(st.st_mtime_ns))


def _stdlib_files() -> list[File]:
  root = sysconfig.get_paths()["stdlib"]
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
    for f in filenames:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        files.append(_file(path, os.path.relpath(path, root)))
  return files


def _matches(pattern: str, kind: str) -> list[str]:
  with io.user_errors(f"data.path={pattern}"):
    paths = io.glob(pattern)
  if not paths and not any(c in pattern for c in "*?["):
    with io.user_errors(f"data.path={pattern}"):
      folder = io.path(pattern).is_dir()
      empty = folder and io.is_empty_dir(pattern)
    if empty:
      raise UserError(f"data.path={pattern!r} is an empty directory; put the corpus's files in it, or give "
                      f"another {kind or 'file'} or a glob")
    if folder:
      raise UserError(f"data.path={pattern!r} is a directory; give a glob of its files, e.g. "
                      f"{os.path.join(pattern, '*')} ({os.path.join(pattern, '**', '*')} recurses)")
    raise UserError(f"data.path={pattern!r}: no such file; give an existing {kind or 'file'} or a glob")
  if not paths:
    raise UserError(f"data.path={pattern!r} matches no files; check the pattern (use ** to recurse into folders)")
  return paths


def _hf_arrow_files(directory: str) -> list[str]:
  """The Arrow files of a save_to_disk directory (its `train` split for a DatasetDict)."""
  root = io.path(directory)
  with io.user_errors(f"data.path={directory}"):
    if (root / "dataset_dict.json").exists():
      splits = json.loads((root / "dataset_dict.json").read_text())["splits"]
      if "train" not in splits:
        raise UserError(f"data.path={directory!r} is a DatasetDict without a 'train' split (it has "
                        f"{', '.join(splits)}); point data.path at one split's folder, e.g. {directory}/{splits[0]}")
      root = root / "train"
    if not (root / "state.json").exists():
      raise UserError(f"data.path={directory!r} is not a directory written by datasets' save_to_disk "
                      f"(no state.json); give such a directory, or use data.source=parquet/jsonl")
    state = json.loads((root / "state.json").read_text())
  return [str(root / f["filename"]) for f in state["_data_files"]]


def list_files(data_cfg) -> list[File]:
  """The corpus's files, in a fixed order."""
  source, pattern = data_cfg.source, data_cfg.path
  if source == "stdlib":
    return _stdlib_files()
  if source == "hf_disk":
    urls = _hf_arrow_files(pattern)
  else:
    urls = _matches(pattern, {"jsonl": ".jsonl file", "parquet": ".parquet file"}.get(source, ""))
  if not io.is_remote(pattern):
    urls = [u for u in urls if os.path.isfile(u)]
  with io.user_errors(f"data.path={pattern}"):
    return [_file(u) for u in urls]


def hash_fraction(name: str) -> float:
  """A stable number in [0, 1) for a document name: what the train/valid split compares."""
  return int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) / 2 ** 32


# ----- the documents of one file -----

def _jsonl(file: File, field: str, stats: dict) -> list[Doc]:
  docs = []
  with io.user_errors(f"data.path={file.url}"), io.open_text(file.url) as f:
    for i, line in enumerate(f):
      try:
        text = json.loads(line)[field]
        if not isinstance(text, str):
          raise TypeError
      except (ValueError, KeyError, TypeError, IndexError):
        stats["bad_lines"] = stats.get("bad_lines", 0) + 1
        continue
      docs.append(_record(f"{file.name}:{i + 1}", text))
  return docs


def _record(name: str, text: str) -> Doc:
  """A record's document; one whose text is not UTF-8 reads as None, so it is skipped and counted like an
  unreadable file."""
  if _NOT_TEXT.search(text):
    return Doc(name, lambda: None, len(text))
  return Doc(name, lambda: text, len(text))


def _strings(column) -> list:
  """A column's values; a string column holding bytes that are not UTF-8 is decoded value by value, those
  values as text with lone surrogates (skipped later), as io.open_text reads a JSONL line."""
  try:
    return column.to_pylist()
  except UnicodeDecodeError:
    import pyarrow as pa
    return [v if v is None else v.decode("utf-8", "surrogateescape") for v in column.cast(pa.binary()).to_pylist()]


def _column_docs(file: File, field: str, stats: dict, batches, names: list[str]) -> list[Doc]:
  if field not in names:
    raise UserError(f"data.path: {file.url} has no column {field!r} (its columns: {', '.join(names)}); "
                    f"set data.text_field to the column holding the text")
  docs, row = [], 0
  for batch in batches:
    for text in _strings(batch.column(field)):
      row += 1
      if not isinstance(text, str):
        stats["bad_lines"] = stats.get("bad_lines", 0) + 1
        continue
      docs.append(_record(f"{file.name}:{row}", text))
  return docs


def _parquet(file: File, field: str, stats: dict) -> list[Doc]:
  pa = require("pyarrow", "pods", "data.source=parquet")
  import pyarrow.parquet as pq
  with io.user_errors(f"data.path={file.url}"), io.open_binary(file.url) as f:
    try:
      pf = pq.ParquetFile(f)
    except pa.ArrowException as e:
      raise UserError(f"data.path: {file.url} is not a readable Parquet file ({str(e).splitlines()[0][:160]})")
    names = pf.schema_arrow.names
    groups = (pf.read_row_group(i, columns=[field] if field in names else []) for i in range(pf.num_row_groups))
    return _column_docs(file, field, stats, groups, names)


def _arrow_stream(file: File, field: str, stats: dict) -> list[Doc]:
  pa = require("pyarrow", "pods", "data.source=hf_disk")
  with io.user_errors(f"data.path={file.url}"), io.open_binary(file.url) as f:
    try:
      reader = pa.ipc.open_stream(f)
    except pa.ArrowException as e:
      raise UserError(f"data.path: {file.url} is not an Arrow file of a saved dataset ({str(e).splitlines()[0][:160]})")
    return _column_docs(file, field, stats, reader, reader.schema.names)


def file_docs(data_cfg, file: File, stats: dict) -> list[Doc]:
  """The documents inside `file`; bad records are counted in stats['bad_lines'], records whose text is not
  UTF-8 read as None. A file that cannot be read to its end is one UserError naming it."""
  source = data_cfg.source
  if source in ("stdlib", "glob"):
    read = functools.partial(_read_remote if io.is_remote(file.url) else _read_local, file.url)
    return [Doc(file.name, read, file.size, int(file.version) if file.version.isdigit() else 0)]
  reader = {"jsonl": _jsonl, "parquet": _parquet}.get(source, _arrow_stream)
  try:
    return reader(file, data_cfg.text_field, stats)
  except UserError:
    raise
  except Exception as e:  # EOFError of a truncated .gz, zlib / lzma / zstd / Arrow errors of damaged bytes, ...
    first = (str(e).strip().splitlines() or [""])[0][:160]
    raise UserError(f"data.path: {file.url} cannot be read to its end ({type(e).__name__}: {first}); it is "
                    f"truncated or damaged: write or download it again, or leave it out of data.path") from None


def listing(data_cfg, files: list[File]) -> list:
  """What keys the token cache: names, sizes and versions of the files (not contents)."""
  fields = [data_cfg.text_field] if data_cfg.source in ("jsonl", "parquet", "hf_disk") else []
  return fields + [(f.name, f.size, f.version) for f in files]


_FORMAT_VERSION = 2   # part of Corpus.fingerprint: bump when the split or the text a document gives changes
_RECORD_FORMAT_VERSION = 3   # jsonl / parquet / hf_disk: a record that is not UTF-8 is skipped (was U+FFFD text)


def _part(doc: Doc, lo: float, hi: float, suffix: str) -> Doc:
  """The characters of `doc` from fraction lo to hi."""
  def read():
    text = doc.read()
    return None if text is None else text[int(lo * len(text)):int(hi * len(text))]
  return Doc(doc.name + suffix, read, doc.size, doc.mtime_ns)


def split_documents(docs: list[Doc], valid_fraction: float) -> tuple[list[Doc], list[Doc]]:
  """Whole documents to train or valid by a hash of their name; neither split is left empty."""
  docs = sorted(docs, key=lambda d: d.name)
  if len(docs) == 1:  # one document: hold out its tail instead
    return [_part(docs[0], 0, 1 - valid_fraction, "")], [_part(docs[0], 1 - valid_fraction, 1, "#tail")]
  by_hash = sorted(docs, key=lambda d: hash_fraction(d.name))
  valid = {d.name for d in docs if hash_fraction(d.name) < valid_fraction} or {by_hash[0].name}
  if len(valid) == len(docs):
    valid.discard(by_hash[-1].name)
  return [d for d in docs if d.name not in valid], [d for d in docs if d.name in valid]


class Corpus:
  """The listed documents of both splits, read lazily; counts what it skips."""

  def __init__(self, data_cfg):
    self.cfg = data_cfg
    self.stats = {}
    files = list_files(data_cfg)
    docs = [d for f in files for d in file_docs(data_cfg, f, self.stats)]
    if not docs and self.stats.get("bad_lines"):
      raise UserError(f"data.path={data_cfg.path!r}: none of its {self.stats['bad_lines']} records has a string "
                      f"field {data_cfg.text_field!r}; set data.text_field to the field holding the text")
    if not docs:
      raise UserError(f"data.source={data_cfg.source!r} found no documents; check data.path")
    self.splits = dict(zip(("train", "valid"), split_documents(docs, data_cfg.valid_fraction)))
    cap = data_cfg.max_train_bytes
    self.caps = {"train": cap, "valid": max(1, int(cap * data_cfg.valid_fraction / (1 - data_cfg.valid_fraction)))
                 if cap else 0}
    # Names, sizes and versions of the files (not contents): cheap to compute, and any edit changes them.
    version = _FORMAT_VERSION if data_cfg.source in ("stdlib", "glob") else _RECORD_FORMAT_VERSION
    key = [version, data_cfg.source, data_cfg.valid_fraction, cap, listing(data_cfg, files)]
    self.fingerprint = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]

  def texts(self, split: str):
    """The split's non-empty texts in order, capped; skipped (unreadable / non-UTF-8) ones are counted."""
    left = self.caps[split] or float("inf")
    used = skipped = empty = 0
    for d in self.splits[split]:
      if left <= 0:
        break
      text = d.read()
      if text is None:
        skipped += 1
        continue
      if not text:
        empty += 1
        continue
      raw = text.encode("utf-8")
      if len(raw) > left:
        text = raw[:int(left)].decode("utf-8", errors="ignore")
      left -= len(raw)
      used += 1
      yield text
    self.stats.update({f"{split}_used": used, f"{split}_skipped": skipped, f"{split}_empty": empty})

  def require_text(self):
    """Fail early, before any tokenizer training, when the training split has no text at all."""
    if next(iter(self.texts("train")), None) is None:
      where = f" ({self.cfg.path})" if self.cfg.path else ""
      raise UserError(f"no text in the training split of data.source={self.cfg.source!r}{where}: "
                      f"{self.describe('train')}; point data.path at non-empty UTF-8 text")

  def describe(self, split: str) -> str:
    skipped, empty = self.stats.get(f"{split}_skipped", 0), self.stats.get(f"{split}_empty", 0)
    bad = self.stats.get("bad_lines", 0)
    used = self.stats.get(f"{split}_used", 0)
    return (f"{used} of {len(self.splits[split])} documents ({skipped} skipped: unreadable or not UTF-8; "
            f"{empty} empty{'; the rest past data.max_train_bytes' if self.caps[split] else ''})"
            + (f", {bad} bad JSONL lines in the file" if bad else ""))
