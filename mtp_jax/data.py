"""Corpus -> tokenizer -> cached token files -> grain windows -> batches.

The corpus (config.data.source: stdlib, glob, jsonl, parquet, hf_disk; local or on a bucket) and its
train/valid split are corpora.py's, the tokenizer is built in tokenizer.py; data.source=prepared reads
the token shards `python -m mtp_jax.prepare` wrote (shards/source.py).

Each split is tokenized once into a cache (cache_dir/tokens-<key>/): one flat token file where every
document is BOS + tokens + EOS, plus the offsets where documents start. Windows of
seq_len + n_future tokens start every seq_len tokens, so the n_future extra tokens hold the targets
of the last positions; segment_ids number the documents inside a window from 1 (0 = padding past the
end of the split), so the loss never scores a target from another document.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import grain
import jax
import numpy as np

from mtp_jax import tokenizer as tokenizer_lib
from mtp_jax.corpora import Corpus
from mtp_jax.errors import UserError
from mtp_jax.tokenizer import build_tokenizer


@dataclasses.dataclass
class TokenSplit:
  tokens: np.ndarray    # flat token ids (a read-only memmap, or shards.source.PreparedTokens), documents as BOS ... EOS
  starts: np.ndarray    # int64 offsets where each document starts
  counts: Optional[np.ndarray] = None   # token frequencies when known without reading every token

  def __len__(self):
    return len(self.tokens)

  def token_counts(self, vocab: int) -> np.ndarray:
    return self.counts if self.counts is not None else np.bincount(np.asarray(self.tokens), minlength=vocab)


def _write_split(texts, tok, directory: Path, split: str, vocab: int) -> dict:
  dtype = np.uint16 if vocab <= 2 ** 16 else np.uint32
  starts, n = [], 0
  encode = getattr(tok, "encode_batch", lambda ts: [tok.encode(t) for t in ts])
  with open(directory / f"{split}.bin", "wb") as f:
    def flush(group):
      nonlocal n
      for ids in encode(group):
        starts.append(n)
        doc = np.asarray([tok.bos_id, *ids, tok.eos_id], dtype)
        f.write(doc.tobytes())
        n += len(doc)
    group = []
    for text in texts:
      group.append(text)
      if len(group) == 64:
        flush(group)
        group = []
    flush(group)
  np.save(directory / f"{split}.starts.npy", np.asarray(starts, np.int64))
  return {"tokens": n, "docs": len(starts), "dtype": np.dtype(dtype).name}


def _open_split(directory: Path, split: str, meta: dict) -> TokenSplit:
  dtype = np.dtype(meta[split]["dtype"])
  n = meta[split]["tokens"]
  tokens = np.memmap(directory / f"{split}.bin", dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)
  return TokenSplit(tokens, np.load(directory / f"{split}.starts.npy"))


def tokenize_corpus(corpus: Corpus, tok, config) -> tuple[dict, dict]:
  """Both splits as TokenSplits, from the cache or tokenized now (written atomically)."""
  key = hashlib.sha256(f"{corpus.fingerprint}/{tokenizer_lib.identity(tok)}".encode()).hexdigest()[:16]
  directory = tokenizer_lib.cache_dir(config) / f"tokens-{key}"
  damage = _cache_damage(directory) if directory.exists() else None
  if damage:   # would fail every later run over this corpus: tokenize again
    _say(f"warning: the token cache {directory} is damaged ({damage}); tokenizing the corpus again")
    shutil.rmtree(directory, ignore_errors=True)
  if not (directory / "meta.json").exists():
    start = time.time()
    tmp = directory.with_name(f".{directory.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = {}
    for split in ("train", "valid"):
      meta[split] = _write_split(corpus.texts(split), tok, tmp, split, tok.vocab_size)
      meta[split]["about"] = corpus.describe(split)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
      os.rename(tmp, directory)
    except OSError:  # another process cached the same corpus meanwhile: use theirs
      shutil.rmtree(tmp, ignore_errors=True)
    _say(f"tokenized the corpus in {time.time() - start:.1f}s into {directory}")
  meta = json.loads((directory / "meta.json").read_text())
  for split in ("train", "valid"):
    _say(f"{split}: {meta[split]['tokens']:,} tokens from {meta[split]['about']}")
  return {s: _open_split(directory, s, meta) for s in ("train", "valid")}, meta


def _cache_damage(directory: Path) -> Optional[str]:
  """What is wrong with a token cache directory (a truncated file, bad meta.json), or None if it is whole."""
  try:
    meta = json.loads((directory / "meta.json").read_text())
    for split in ("train", "valid"):
      want = int(meta[split]["tokens"]) * np.dtype(meta[split]["dtype"]).itemsize
      got = (directory / f"{split}.bin").stat().st_size
      if got != want:
        return f"{split}.bin has {got} bytes, meta.json says {want}"
      starts = np.load(directory / f"{split}.starts.npy")
      if len(starts) != int(meta[split]["docs"]):
        return f"{split}.starts.npy has {len(starts)} entries, meta.json says {meta[split]['docs']}"
  except (OSError, ValueError, KeyError, TypeError, EOFError) as e:
    return f"{type(e).__name__}: {str(e)[:120]}"
  return None


def _say(msg: str):
  if jax.process_index() == 0:
    print(msg, flush=True)


# ----- windows and batches -----

def num_windows(split: TokenSplit, seq_len: int) -> int:
  """Windows start every seq_len tokens, while at least one target is left after their start."""
  return max(0, -(-(len(split) - 1) // seq_len))


def window(split: TokenSplit, seq_len: int, n_future: int, index: int) -> dict:
  """Window `index`: tokens [i*seq_len, i*seq_len + seq_len + n_future), zero-padded past the end."""
  length = seq_len + n_future
  lo = int(index) * seq_len
  hi = min(lo + length, len(split))
  tokens = np.zeros(length, np.int32)
  segments = np.zeros(length, np.int32)
  tokens[:hi - lo] = split.tokens[lo:hi]
  doc = np.searchsorted(split.starts, np.arange(lo, hi), side="right")   # 1-based document number
  segments[:hi - lo] = doc - doc[0] + 1
  return {"tokens": tokens, "segment_ids": segments}


def local_batch_size(global_batch: int) -> int:
  count = jax.process_count()
  if global_batch % count:
    raise UserError(f"train.batch_size={global_batch} is not divisible by the {count} processes; pick a multiple")
  return global_batch // count


def _own_rows(i, local: int, count: int, index: int):
  """Row i of this process's stream -> its position in the global stream: each global batch is the
  processes' local batches one after another, as jax.make_array_from_process_local_data lays them out."""
  return (i // local) * local * count + index * local + i % local


def window_indices(split: TokenSplit, config) -> grain.MapDataset:
  """The window numbers this process reads, in order: shuffled windows, reshuffled every epoch
  (deterministic in config.seed); of each global batch, this process takes its own contiguous rows, so
  P processes together read every window once per epoch and their global batches are exactly the
  one-process batches."""
  n = num_windows(split, config.data.seq_len)
  order = grain.MapDataset.range(n).shuffle(seed=config.seed).repeat()
  local, count, index = local_batch_size(config.train.batch_size), jax.process_count(), jax.process_index()
  own = grain.MapDataset.range(len(order) // count)
  return own.map(lambda i: order[_own_rows(i, local, count, index)])


def train_dataset(split: TokenSplit, config) -> grain.IterDataset:
  """This process's share of the shuffled windows (window_indices), read and batched."""
  ds = window_indices(split, config)
  ds = ds.map(functools.partial(window, split, config.data.seq_len, config.model.n_future))
  ds = ds.batch(local_batch_size(config.train.batch_size), drop_remainder=True)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4))


def valid_batches(split: TokenSplit, config) -> list[dict]:
  """The fixed validation set: the split's first eval_batches batches of windows, in order (no shuffle).
  A short split gives fewer batches; the last one is padded with all-zero rows (segment 0: not scored).
  Each process holds its own contiguous rows of every global batch (as train_dataset)."""
  seq_len, n_future, batch = config.data.seq_len, config.model.n_future, config.train.batch_size
  n = min(num_windows(split, seq_len), config.train.eval_batches * batch)
  pad = {"tokens": np.zeros(seq_len + n_future, np.int32), "segment_ids": np.zeros(seq_len + n_future, np.int32)}
  rows = [window(split, seq_len, n_future, i) for i in range(n)]
  rows += [pad] * (-n % batch)     # whole global batches, so every process gets as many
  size, count = local_batch_size(batch), jax.process_count()
  rows = [rows[_own_rows(i, size, count, jax.process_index())] for i in range(len(rows) // count)]
  return [{k: np.stack([r[k] for r in rows[i:i + size]]) for k in pad} for i in range(0, len(rows), size)]


def unigram_baseline(train: TokenSplit, batches: list[dict], seq_len: int, vocab: int) -> float:
  """Cross-entropy (nats) of the training split's unigram distribution (add-one smoothed) on the
  next-token targets of the validation batches: what a model that ignores context would score."""
  counts = train.token_counts(vocab).astype(np.float64) + 1
  logp = np.log(counts / counts.sum())
  total = n = 0.0
  for b in batches:
    seg = b["segment_ids"]
    mask = (seg[:, 1:seq_len + 1] == seg[:, :seq_len]) & (seg[:, :seq_len] != 0)
    total -= logp[b["tokens"][:, 1:seq_len + 1]][mask].sum()
    n += mask.sum()
  return float(total / max(n, 1))


@dataclasses.dataclass
class Data:
  tokenizer: object
  train: TokenSplit
  valid: TokenSplit


def build(config, workdir=None) -> Data:
  """Corpus, tokenizer (the workdir's copy when resuming) and both token splits."""
  if config.data.source == "prepared":   # shards written by `python -m mtp_jax.prepare`
    from mtp_jax.shards.source import open_prepared
    tok, prepared, counts = open_prepared(config, workdir)
    splits = {k: TokenSplit(tokens, tokens.offsets[:-1]) for k, tokens in prepared.items()}
    splits["train"].counts = counts
  else:
    corpus = Corpus(config.data)
    corpus.require_text()
    tok = build_tokenizer(config, corpus, workdir)
    splits, _ = tokenize_corpus(corpus, tok, config)
  if num_windows(splits["train"], config.data.seq_len) == 0:
    raise UserError(f"the training split has {len(splits['train'])} tokens: too few for one window; add data")
  if num_windows(splits["valid"], config.data.seq_len) == 0:
    raise UserError(f"the validation split has {len(splits['valid'])} tokens: too few for one window; "
                    f"raise data.valid_fraction or add data")
  return Data(tok, splits["train"], splits["valid"])
