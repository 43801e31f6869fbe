"""Training from a prepared corpus (data.source=prepared, data.path = prepare's output).

A split is the records of its shards in order (shard 0 first, records by name inside a shard),
read through grain's ArrayRecordDataSource. `PreparedTokens` looks like the single-process cache's
flat token array, `tokens[lo:hi]` reading only the records that overlap [lo, hi), so data.py's
windows, grain shuffling and per-process slicing (`ds[process_index::process_count]`) work
unchanged: each process reads only the records of its own windows, nobody re-tokenizes, and the
grain iterator state in every checkpoint restores the position exactly.

ArrayRecord's reader opens local files only, so shards on a bucket are first copied (each file
whole, once) into data.cache_dir/prepared-<key>/; the key names the URL and the output's
meta.json, so a re-prepared output is copied afresh.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np

from mtp_jax import io
from mtp_jax import tokenizer as tokenizer_lib
from mtp_jax.errors import UserError
from mtp_jax.shards import format as fmt


class PreparedTokens:
  """The flat token ids of one split, read record by record from its shards."""

  def __init__(self, source, lengths: np.ndarray, where: str):
    self.source, self.where = source, where
    self.offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])

  def __len__(self):
    return int(self.offsets[-1])

  def __getitem__(self, sl: slice) -> np.ndarray:
    lo, hi, _ = sl.indices(len(self))
    if hi <= lo:
      return np.zeros(0, np.uint32)
    first = int(np.searchsorted(self.offsets, lo, side="right")) - 1
    last = int(np.searchsorted(self.offsets, hi, side="left"))
    try:
      parts = [fmt.decode(r)[1] for r in self.source.__getitems__(list(range(first, last)))]
    except Exception as e:   # a damaged shard: checksums fail or a record is cut short
      raise UserError(f"data.path={self.where}: a shard is damaged ({type(e).__name__}: "
                      f"{str(e).strip()[:160]}); run prepare again into a new --output") from e
    flat = np.concatenate(parts)
    if len(flat) != self.offsets[last] - self.offsets[first]:
      raise UserError(f"data.path={self.where}: a shard does not match its lengths file; run prepare again")
    return flat[lo - self.offsets[first]:hi - self.offsets[first]]


def _local_copy(output: str, meta_text: str, cache_dir) -> io.Path:
  """The output itself when local; else a cached local copy of it (ArrayRecord reads local files only)."""
  out = io.path(output)
  if not io.is_remote(out):
    return out
  key = hashlib.sha256(f"{output}\n{meta_text}".encode()).hexdigest()[:16]
  local = io.path(cache_dir) / f"prepared-{key}"
  meta = json.loads(meta_text)
  names = [fmt.META, fmt.TRAIN_COUNTS] + ([fmt.TOKENIZER] if meta["tokenizer"]["kind"] == "sentencepiece" else [])
  for split in fmt.SPLITS:
    for shard in meta["splits"][split]["shards"]:
      names += [shard, fmt.lengths_name(shard)]
  fs, rel = io.fsspec_of(out)
  with io.user_errors(f"data.path={output}"):
    for name in names:
      if not (local / name).exists():
        local.mkdir(parents=True, exist_ok=True)
        tmp = local / f".{name}.tmp"
        fs.get_file(f"{rel}/{name}", str(tmp))
        tmp.replace(local / name)
  return local


def _tokenizer(directory: io.Path, meta: dict, config, workdir):
  """The tokenizer prepare used; the config (and a resumed workdir's copy) must agree with it."""
  info = meta["tokenizer"]
  tok = (tokenizer_lib.ByteTokenizer() if info["kind"] == "bytes"
         else tokenizer_lib.SentencePieceTokenizer((directory / fmt.TOKENIZER).read_bytes(),
                                                   origin=f"{config.data.path}/{fmt.TOKENIZER}"))
  wanted = config.data.tokenizer
  if wanted == "bytes" and info["kind"] != "bytes" or wanted not in ("bytes", "sentencepiece") and \
      tokenizer_lib.identity(tokenizer_lib.for_config(config)) != info["identity"]:
    raise UserError(f"data.tokenizer={wanted!r} is not the tokenizer {config.data.path} was prepared with "
                    f"({info['kind']}); set data.tokenizer=sentencepiece to use the prepared one")
  if workdir is not None:
    old = tokenizer_lib.from_workdir(workdir, config.data.tokenizer)
    if old is not None and tokenizer_lib.identity(old) != info["identity"]:
      raise UserError(f"{workdir} was trained with another tokenizer than {config.data.path} holds; "
                      f"use a new --workdir")
  tokenizer_lib.check_vocab(tok, config)
  return tok


def open_prepared(config, workdir=None):
  """(tokenizer, {'train': PreparedTokens, 'valid': PreparedTokens}, train token counts) of data.path."""
  import grain
  output = config.data.path
  out = io.path(output)
  io.check_bucket(out, "data.path")
  with io.user_errors(f"data.path={output}"):
    if not (out / fmt.META).exists():
      raise UserError(f"data.path={output!r} holds no {fmt.META}: not a finished prepare output; run "
                      f"python -m mtp_jax.prepare --config=... --output={output}")
    meta_text = (out / fmt.META).read_text()
  meta = json.loads(meta_text)
  if meta.get("format") != fmt.FORMAT:
    raise UserError(f"data.path={output}: prepared with format {meta.get('format')}, this version reads "
                    f"{fmt.FORMAT}; run prepare again")
  local = _local_copy(output, meta_text, tokenizer_lib.cache_dir(config))
  tok = _tokenizer(local, meta, config, workdir)
  splits = {}
  for split in fmt.SPLITS:
    shards = meta["splits"][split]["shards"]
    lengths = [fmt.load_npy(local / fmt.lengths_name(s)) for s in shards]
    try:
      source = grain.sources.ArrayRecordDataSource([str(local / s) for s in shards])
    except Exception as e:   # a truncated or overwritten file fails when its footer is read
      raise UserError(f"data.path={output}: cannot open the {split} shards ({type(e).__name__}: "
                      f"{str(e).strip().splitlines()[0][:160]}); run prepare again into a new --output") from e
    if len(source) != sum(len(l) for l in lengths):
      raise UserError(f"data.path={output}: the {split} shards hold {len(source)} records but their lengths "
                      f"files {sum(len(l) for l in lengths)}; run prepare again into a new --output")
    lengths = np.concatenate(lengths)
    splits[split] = PreparedTokens(source, lengths, output)
  counts = fmt.load_npy(local / fmt.TRAIN_COUNTS)
  return tok, splits, counts
