"""Tokenizers: a sentencepiece model trained on the training split (cached), a user's .model file, or bytes.

All share one small interface: encode(str) -> list[int], decode(list[int]) -> str, vocab_size, bos_id,
eos_id. A training run copies its sentencepiece model to W/tokenizer.model, so `load_tokenizer(W)`
gives generate.py exactly the tokenizer the run trained with, even if the cache is gone.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
from pathlib import Path
from typing import Iterable

import sentencepiece as spm
from absl import logging

from mtp_jax import io as io_lib
from mtp_jax import workdir as workdir_lib
from mtp_jax.corpora import Corpus
from mtp_jax.errors import UserError

WORKDIR_MODEL = workdir_lib.TOKENIZER_MODEL
# Bump when the trainer settings below change, so cached models trained otherwise are not reused.
_SP_VERSION = 1
_SP_SENTENCES = 200_000   # chunks sampled for training: keeps training well under a minute on 2 cores
_SP_CHUNK_LINES = 8       # train on multi-line chunks so newlines and indentation become pieces


class ByteTokenizer:
  """Ids 0..255 are the UTF-8 bytes; 256 is BOS, 257 is EOS. Any text round-trips."""
  kind = "bytes"
  bos_id, eos_id, vocab_size = 256, 257, 258

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids) -> str:
    return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class DamagedModel(ValueError):
  """Bytes that are not a usable sentencepiece model (corrupt, empty, or without pieces)."""


class SentencePieceTokenizer:
  """A sentencepiece model; `proto` is its serialized bytes (what W/tokenizer.model holds)."""
  kind = "sentencepiece"

  def __init__(self, proto: bytes, origin: str = ""):
    self.proto, self.origin = proto, origin
    try:
      self.sp = spm.SentencePieceProcessor(model_proto=proto)
    except RuntimeError as e:
      raise DamagedModel("it does not parse as a sentencepiece model") from e
    self.vocab_size = self.sp.get_piece_size()
    if self.vocab_size < 1:   # an empty file loads as a model with no pieces
      raise DamagedModel("it holds no pieces (an empty or truncated file)")
    self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()

  def encode(self, text: str) -> list[int]:
    return self.sp.encode(text)

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return self.sp.encode(texts, num_threads=os.cpu_count() or 1)

  def decode(self, ids) -> str:
    return self.sp.decode([int(i) for i in ids])


class HFTokenizer:
  """A Hugging Face `tokenizers` file (tokenizer.json: Llama 3, Mistral) with BOS/EOS ids given beside it.

  tokenizer.json does not say which ids begin and end a document, so the ids come from the checkpoint's
  config and travel with it in W/special_tokens.json. Encoding adds no special tokens (the data pipeline
  and generate add BOS/EOS themselves).
  """
  kind = "huggingface"

  def __init__(self, json_bytes: bytes, bos_id: int, eos_id: int, origin: str = "", add_bos: bool = True,
               chat_template: str | None = None, eot_id: int | None = None):
    import tokenizers
    self.proto, self.origin = json_bytes, origin
    self.tok = tokenizers.Tokenizer.from_str(json_bytes.decode("utf-8"))
    self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
    self.bos_id, self.eos_id = int(bos_id), int(eos_id)
    # Whether prompts start with BOS (SmolLM2's GGUF says no), and the model's jinja chat template.
    self.add_bos, self.chat_template = bool(add_bos), chat_template
    self.eot_id = None if eot_id is None else int(eot_id)   # the chat template's end-of-turn token, if named

  def encode(self, text: str) -> list[int]:
    return self.tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


Tokenizer = ByteTokenizer | SentencePieceTokenizer | HFTokenizer
HF_WORKDIR_FILE, HF_SPECIAL_FILE = workdir_lib.HF_TOKENIZER, workdir_lib.HF_SPECIAL_TOKENS


def identity(tok: Tokenizer) -> str:
  """A short hash naming exactly this tokenizer (keys the token cache)."""
  payload = b"bytes-v1"
  if isinstance(tok, SentencePieceTokenizer):
    payload = tok.proto
  elif isinstance(tok, HFTokenizer):
    payload = tok.proto + json.dumps([tok.bos_id, tok.eos_id]).encode()
  return hashlib.sha256(payload).hexdigest()[:16]


def _load_model_file(path) -> SentencePieceTokenizer:
  try:
    return SentencePieceTokenizer(io_lib.path(path).read_bytes(), origin=str(path))
  except OSError as e:
    raise UserError(f"data.tokenizer={str(path)!r}: cannot read it ({e.strerror}); give an existing sentencepiece "
                    f".model file, or 'sentencepiece' to train one, or 'bytes'")
  except DamagedModel as e:
    raise UserError(f"data.tokenizer={str(path)!r} is not a usable sentencepiece model file ({e}); give a .model "
                    f"file, or 'sentencepiece' to train one, or 'bytes'")


def _sentences(texts: Iterable[str]):
  for text in texts:
    lines = text.splitlines(keepends=True)
    for i in range(0, len(lines), _SP_CHUNK_LINES):
      yield "".join(lines[i:i + _SP_CHUNK_LINES])


def train_sentencepiece(texts: Iterable[str], vocab_size: int) -> SentencePieceTokenizer:
  """BPE over the texts, tuned for exact round trips of code: no normalization, whitespace kept as is,
  byte fallback for anything unseen; unk=0, bos=1, eos=2, no pad."""
  if vocab_size < 256 + 3 + 1:
    raise UserError(f"model.vocab_size={vocab_size} is too small for a sentencepiece model with byte fallback "
                    f"(256 byte pieces + 3 specials); use at least 512, or data.tokenizer=bytes with vocab 258")
  spm.set_random_generator_seed(0)   # the sampled sentences, hence the model, are reproducible
  out = io.BytesIO()
  start = time.time()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_sentences(texts), model_writer=out, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
        input_sentence_size=_SP_SENTENCES, shuffle_input_sentence=True, max_sentence_length=16384,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=os.cpu_count() or 1, minloglevel=2)
  except RuntimeError as e:  # too little text for the requested vocabulary, or too many distinct characters
    detail = str(e).strip().splitlines()[-1]
    fix = ("raise model.vocab_size" if "smaller than required_chars" in detail or "Increase vocab_size" in detail
           else "lower model.vocab_size or add data")
    raise UserError(f"sentencepiece could not train a {vocab_size}-piece vocabulary on the training split "
                    f"({detail}); {fix}")
  logging.info("trained a %d-piece sentencepiece model in %.1fs", vocab_size, time.time() - start)
  return SentencePieceTokenizer(out.getvalue(), origin="trained")


def _atomic_write(path, data: bytes):
  io_lib.write_bytes(path, data)   # readers never see half a file (local: rename; bucket: one upload)


def cached_sentencepiece(texts_fn, corpus_fingerprint: str, vocab_size: int, cache_dir):
  """Train once per (corpus, vocab, settings) and reuse the model from cache_dir afterwards.

  texts_fn() -> iterable of training texts; only called when the cache misses.
  """
  key = hashlib.sha256(json.dumps([corpus_fingerprint, vocab_size, _SP_VERSION]).encode()).hexdigest()[:16]
  path = Path(cache_dir) / f"tokenizer-{key}.model"
  if path.exists():
    try:
      tok = SentencePieceTokenizer(path.read_bytes(), origin=str(path))
      if tok.vocab_size == vocab_size:
        logging.info("reusing the cached tokenizer %s", path)
        return tok
      why = f"{tok.vocab_size} pieces, not {vocab_size}"
    except DamagedModel as e:
      why = str(e)
    # A damaged cache would fail every later run over this corpus: train again, replace it.
    print(f"warning: the cached tokenizer {path} is damaged ({why}); training it again", flush=True)
  tok = train_sentencepiece(texts_fn(), vocab_size)
  _atomic_write(path, tok.proto)
  tok.origin = str(path)
  return tok


def check_vocab(tok: Tokenizer, config) -> None:
  if tok.vocab_size < 2:
    where = getattr(tok, "origin", "") or config.data.tokenizer
    raise UserError(f"the tokenizer ({where}) has {tok.vocab_size} ids: not a usable model; give another "
                    f"data.tokenizer")
  if tok.vocab_size != config.model.vocab_size:
    where = getattr(tok, "origin", "") or config.data.tokenizer
    raise UserError(f"the tokenizer ({where}) has {tok.vocab_size} ids but model.vocab_size="
                    f"{config.model.vocab_size}; set --config.model.vocab_size={tok.vocab_size}")


def save_to_workdir(tok: Tokenizer, workdir) -> None:
  """Make the run self-contained: W/tokenizer.model, or W/tokenizer.json + special_tokens.json (nothing for bytes)."""
  if isinstance(tok, HFTokenizer):
    special = {"bos_id": tok.bos_id, "eos_id": tok.eos_id, "add_bos": tok.add_bos}
    if tok.chat_template:
      special["chat_template"] = tok.chat_template
    if tok.eot_id is not None:
      special["eot_id"] = tok.eot_id
    _atomic_write(io_lib.path(workdir) / HF_SPECIAL_FILE, json.dumps(special).encode())
    _atomic_write(io_lib.path(workdir) / HF_WORKDIR_FILE, tok.proto)
  elif isinstance(tok, SentencePieceTokenizer):
    path = io_lib.path(workdir) / WORKDIR_MODEL
    if not path.exists() or path.read_bytes() != tok.proto:
      _atomic_write(path, tok.proto)


def from_workdir(workdir, kind: str) -> Tokenizer | None:
  """The tokenizer a run in `workdir` used, or None if the run has not stored one yet."""
  if kind == "bytes":
    return ByteTokenizer()
  if kind == "huggingface":
    path, special = io_lib.path(workdir) / HF_WORKDIR_FILE, io_lib.path(workdir) / HF_SPECIAL_FILE
    if not path.exists():
      return None
    ids = json.loads(special.read_text()) if special.exists() else {}
    if "bos_id" not in ids or "eos_id" not in ids:
      raise UserError(f"{workdir} holds {HF_WORKDIR_FILE} but no {HF_SPECIAL_FILE} with bos_id and eos_id; "
                      f"write it (e.g. {{\"bos_id\": 1, \"eos_id\": 2}}) or convert the model again")
    return HFTokenizer(path.read_bytes(), ids["bos_id"], ids["eos_id"], origin=str(path),
                       add_bos=ids.get("add_bos", True), chat_template=ids.get("chat_template"),
                       eot_id=ids.get("eot_id"))
  path = io_lib.path(workdir) / WORKDIR_MODEL
  if not path.exists():
    return None
  try:
    return SentencePieceTokenizer(path.read_bytes(), origin=str(path))
  except (OSError, DamagedModel) as e:   # the run's own copy, not the user's data.tokenizer
    raise UserError(f"{path} (the run's copy of its tokenizer) is damaged ({getattr(e, 'strerror', None) or e}); "
                    f"delete it and rerun training with the same settings to copy the tokenizer again (the "
                    f"cache rebuilds the same model from the same corpus), or restore it from a copy")


def load_tokenizer(source) -> Tokenizer:
  """The tokenizer of a training run (a workdir path) or of a config (bytes, .model path, or trained).

  For generate.py: `load_tokenizer(workdir)` reads W/tokenizer.model (or W/config.json says bytes).
  """
  if isinstance(source, (str, os.PathLike)):
    workdir = io_lib.path(source)
    saved = workdir_lib.read_json(workdir)
    kind = "sentencepiece"
    if saved is not None:
      try:
        kind = saved["data"]["tokenizer"]
      except (KeyError, TypeError) as e:
        raise UserError(f"{workdir_lib.config_path(workdir)} is damaged ({type(e).__name__}: {e}); restore it, or "
                        f"rerun the training command that made this run")
    tok = from_workdir(workdir, kind)
    if tok is None:
      if kind not in ("bytes", "sentencepiece", "huggingface"):
        return _load_model_file(kind)
      raise UserError(f"{workdir} has no {WORKDIR_MODEL} (and no {workdir_lib.CONFIG_FILE} naming a tokenizer); "
                      f"pass the workdir of a training run")
    return tok
  return for_config(source)


def build_tokenizer(config, corpus: Corpus | None = None, workdir=None):
  """The run's tokenizer: the workdir's own copy when resuming, else as config.data.tokenizer says."""
  if workdir is not None:
    tok = from_workdir(workdir, config.data.tokenizer)
    if tok is not None:
      check_vocab(tok, config)
      return tok
  if config.data.tokenizer == "sentencepiece":
    corpus = corpus or Corpus(config.data)
    return for_config(config, lambda: corpus.texts("train"), corpus.fingerprint)
  return for_config(config)


def for_config(config, texts_fn=None, corpus_fingerprint: str = "") -> Tokenizer:
  """The tokenizer config.data.tokenizer names; 'sentencepiece' trains (or reuses) one on the training split."""
  name = config.data.tokenizer
  if name == "bytes":
    tok = ByteTokenizer()
  elif name == "huggingface":
    raise UserError("data.tokenizer=huggingface reads W/tokenizer.json and W/special_tokens.json of the workdir, "
                    "and this workdir has none; import a model there first (python -m mtp_jax.convert import "
                    "--from=DIR --workdir=W)")
  elif name == "sentencepiece":
    if texts_fn is None:  # called without a corpus: list it
      return build_tokenizer(config)
    tok = cached_sentencepiece(texts_fn, corpus_fingerprint, config.model.vocab_size, cache_dir(config))
  else:
    tok = _load_model_file(os.path.expanduser(name))
  check_vocab(tok, config)
  return tok


def cache_dir(config) -> Path:
  return Path(os.path.expanduser(config.data.cache_dir or "~/.cache/mtp_jax"))
