"""The on-disk layout of a prepared corpus (what prepare writes and training reads).

    OUT/meta.json                            written last: its presence means the output is complete
    OUT/tokenizer.model                      the sentencepiece model (absent for bytes)
    OUT/<split>-00003-of-00016.array_record  one record per document (group_size:1, random access)
    OUT/<split>-00003-of-00016.lengths.npy   int64 token count of each record, in record order (written
                                             after the shard: its presence means the shard is complete)
    OUT/<split>-00003-of-00016.counts.npy    int64 [vocab] token frequencies of the shard
    OUT/train.counts.npy                     their sum over the training split (the unigram baseline)

A record is the document's name (UTF-8), a NUL byte, then its token ids as little-endian uint32:
BOS + tokens + EOS, exactly what the single-process cache holds for that document, so a document's
boundaries are its record's. A document goes to shard `shard_of(name)` and to the split
`split_of(name)`; inside a shard, records are sorted by name. So the output does not depend on the
runner, its worker count, or the order work items finish in.
"""
from __future__ import annotations

import hashlib

import numpy as np

from mtp_jax import io
from mtp_jax.corpora import hash_fraction

FORMAT = 1
META = "meta.json"
TOKENIZER = "tokenizer.model"
TRAIN_COUNTS = "train.counts.npy"   # int64 [vocab]: how often each token occurs in the training split
SPLITS = ("train", "valid")


def shard_name(split: str, index: int, count: int) -> str:
  return f"{split}-{index:05d}-of-{count:05d}.array_record"


def lengths_name(shard: str) -> str:
  return shard.removesuffix(".array_record") + ".lengths.npy"


def counts_name(shard: str) -> str:
  return shard.removesuffix(".array_record") + ".counts.npy"


def shard_of(name: str, count: int) -> int:
  return int(hashlib.sha1(b"shard:" + name.encode()).hexdigest()[:8], 16) % count


def split_of(name: str, valid_fraction: float) -> str:
  """The same rule as data.split_documents (minus its guard against an empty split)."""
  return "valid" if hash_fraction(name) < valid_fraction else "train"


def encode(name: str, tokens) -> bytes:
  return name.encode("utf-8") + b"\0" + np.asarray(tokens, "<u4").tobytes()


def decode(record: bytes) -> tuple[str, np.ndarray]:
  cut = record.index(b"\0")
  return record[:cut].decode("utf-8"), np.frombuffer(record, "<u4", offset=cut + 1)


def load_npy(path) -> np.ndarray:
  with io.open_binary(path) as f:
    return np.load(f)
