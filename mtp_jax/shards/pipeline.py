"""The Apache Beam pipeline behind `python -m mtp_jax.prepare`: corpus files -> token shards.

    files (listed here) -> Reshuffle -> read + tokenize each file's documents (workers)
        -> key by (split, shard) -> GroupByKey -> sort by name, write one ArrayRecord shard each
    then, here: meta.json from the shards' length files (written last).

Any Beam runner: the local DirectRunner with several worker processes by default, Dataflow / Flink
/ Spark through the usual pipeline options (`--runner=DataflowRunner --project=... --region=...
--temp_location=gs://...`). Workers write each shard to a local temporary file and upload it
whole (the ArrayRecord writer writes local files only). Documents are tokenized exactly as the
single-process cache does: BOS + tokenizer.encode(text) + EOS, empty and unreadable ones skipped.

A file that cannot be read (truncated, no text column) is noted by the worker under --output/.failed
rather than raised there (a worker's error is a traceback per retry); the run then ends with one error
naming it. A run that fails in any way removes what it wrote: --output was empty when it began, and is so
again, so the same command can simply be rerun.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
import time
from io import BytesIO as _BytesIO

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions

from mtp_jax import corpora, io
from mtp_jax import tokenizer as tokenizer_lib
from mtp_jax.errors import UserError
from mtp_jax.shards import format as fmt

_NAMESPACE = "mtp_jax.prepare"
_FAILED = ".failed"   # under --output while the pipeline runs: one file per corpus file that could not be read


def _make_tokenizer(kind: str, proto: bytes):
  return tokenizer_lib.ByteTokenizer() if kind == "bytes" else tokenizer_lib.SentencePieceTokenizer(proto)


class _Tokenize(beam.DoFn):
  """One corpus file in, ((split, shard), (name, record)) per non-empty readable document out."""

  def __init__(self, data_cfg: dict, kind: str, proto: bytes, shards: int, output: str):
    self.data_cfg, self.kind, self.proto, self.shards, self.output = data_cfg, kind, proto, shards, output

  def setup(self):
    import ml_collections
    self.cfg = ml_collections.ConfigDict(self.data_cfg)
    self.tok = _make_tokenizer(self.kind, self.proto)
    self.skipped = beam.metrics.Metrics.counter(_NAMESPACE, "skipped")
    self.empty = beam.metrics.Metrics.counter(_NAMESPACE, "empty")
    self.bad = beam.metrics.Metrics.counter(_NAMESPACE, "bad_records")

  def process(self, file: corpora.File):
    stats = {}
    try:
      docs = corpora.file_docs(self.cfg, file, stats)
    except UserError as e:
      note = io.path(self.output) / _FAILED / f"{hashlib.sha1(file.url.encode()).hexdigest()[:16]}.txt"
      io.write_text(note, str(e))
      return
    for doc in docs:
      text = doc.read()
      if text is None:
        self.skipped.inc()
        continue
      if not text:
        self.empty.inc()
        continue
      tokens = [self.tok.bos_id, *self.tok.encode(text), self.tok.eos_id]
      key = (fmt.split_of(doc.name, self.cfg.valid_fraction), fmt.shard_of(doc.name, self.shards))
      yield key, (doc.name, fmt.encode(doc.name, tokens))
    self.bad.inc(stats.get("bad_lines", 0))


class _WriteShard(beam.DoFn):
  """All documents of one (split, shard), sorted by name, into one ArrayRecord file + its lengths."""

  def __init__(self, output: str, shards: int, vocab: int):
    self.output, self.shards, self.vocab = output, shards, vocab

  def setup(self):
    self.written = beam.metrics.Metrics.counter(_NAMESPACE, "docs_written")

  def process(self, element):
    from array_record.python.array_record_module import ArrayRecordWriter
    (split, index), docs = element
    docs = sorted(docs)
    name = fmt.shard_name(split, index, self.shards)
    lengths = np.asarray([(len(r) - r.index(b"\0") - 1) // 4 for _, r in docs], np.int64)
    counts = sum(np.bincount(fmt.decode(r)[1], minlength=self.vocab) for _, r in docs)
    with tempfile.TemporaryDirectory(prefix="mtp-prepare-") as tmp:
      local = os.path.join(tmp, name)
      writer = ArrayRecordWriter(local, "group_size:1")
      for _, record in docs:
        writer.write(record)
      writer.close()
      np.save(os.path.join(tmp, "counts.npy"), counts.astype(np.int64))
      io.upload(os.path.join(tmp, "counts.npy"), io.path(self.output) / fmt.counts_name(name))
      np.save(os.path.join(tmp, "lengths.npy"), lengths)   # after the shard's other files: marks it done
      io.upload(local, io.path(self.output) / name)
      io.upload(os.path.join(tmp, "lengths.npy"), io.path(self.output) / fmt.lengths_name(name))
    self.written.inc(len(docs))
    yield split, name


def sample_texts(data_cfg, files, sentences: int):
  """Training texts for sentencepiece from a sample of the corpus: files in a fixed pseudo-random order
  until about `sentences` chunks are read (sentencepiece's input_sentence_size), not the whole corpus."""
  budget = sentences * tokenizer_lib._SP_CHUNK_LINES
  for f in sorted(files, key=lambda f: corpora.hash_fraction(f.name)):
    for doc in corpora.file_docs(data_cfg, f, {}):
      if fmt.split_of(doc.name, data_cfg.valid_fraction) != "train":
        continue
      text = doc.read()
      if text:
        yield text
        budget -= text.count("\n") + 1
      if budget <= 0:
        return


def _tokenizer(config, files):
  name = config.data.tokenizer
  if name == "sentencepiece":
    tok = tokenizer_lib.train_sentencepiece(sample_texts(config.data, files, tokenizer_lib._SP_SENTENCES),
                                            config.model.vocab_size)
  else:
    tok = tokenizer_lib.for_config(config)
  tokenizer_lib.check_vocab(tok, config)
  return tok


class _ShardProgress:
  """A progress bar (on a terminal) of the shards written so far, polled from this process while the workers
  run: every runner writes into the same --output, and a shard's lengths file appears last."""
  POLL_S = 2.0

  def __init__(self, out, total: int):
    from tqdm import tqdm
    self.out = out
    self.bar = tqdm(total=total, unit="shard", desc="prepare: shards written (at most)", disable=None)
    self.done = threading.Event()
    self.thread = threading.Thread(target=self._poll, daemon=True)
    self.thread.start()

  def _poll(self):
    while not self.done.wait(self.POLL_S):
      try:
        self.bar.update(len(list(self.out.glob("*.lengths.npy"))) - self.bar.n)
      except Exception:   # a listing that fails now is retried; the pipeline reports real failures
        pass

  def close(self):
    self.done.set()
    self.thread.join()
    if not self.bar.disable:
      self.bar.update(len(list(self.out.glob("*.lengths.npy"))) - self.bar.n)
    self.bar.close()


def _pipeline(beam_args: list[str]) -> beam.Pipeline:
  """The runner the options name; by default the DirectRunner's batch engine (FnApiRunner) with several
  worker processes, called directly: DirectRunner itself first tries to download the Prism runner."""
  args = list(beam_args)
  if any(a.startswith("--runner") for a in args):
    return beam.Pipeline(options=PipelineOptions(args))
  if not any(a.startswith("--direct_num_workers") for a in args):
    args.append(f"--direct_num_workers={min(os.cpu_count() or 1, 8)}")
  if not any(a.startswith("--direct_running_mode") for a in args):
    args.append("--direct_running_mode=multi_processing")
  from apache_beam.runners.portability.fn_api_runner import FnApiRunner
  return beam.Pipeline(runner=FnApiRunner(), options=PipelineOptions(args))


def prepare(config, output: str, beam_args=()) -> dict:
  """Tokenize config.data's corpus into sharded ArrayRecord files under `output`; returns meta.json's dict."""
  if config.data.source == "prepared":
    raise UserError("data.source=prepared is already a prepared corpus; give the raw corpus's data.source")
  if config.data.max_train_bytes:
    raise UserError("prepare tokenizes the whole corpus; drop data.max_train_bytes (set it to 0)")
  out = io.path(output)
  io.check_bucket(out, "--output")
  with io.user_errors(f"--output={output}"):
    if (out / fmt.META).exists() or (out.exists() and any(out.iterdir())):
      raise UserError(f"--output={output} is not empty; give a new directory (prepare never overwrites shards)")
  start = time.time()
  files = corpora.list_files(config.data)
  tok = _tokenizer(config, files)
  kind = "bytes" if isinstance(tok, tokenizer_lib.ByteTokenizer) else "sentencepiece"
  proto = getattr(tok, "proto", b"")
  shards = config.data.prepare_shards
  pipeline = _pipeline(list(beam_args))
  _ = (pipeline
       | "Files" >> beam.Create(files)
       | "Spread" >> beam.Reshuffle()
       | "Tokenize" >> beam.ParDo(_Tokenize(config.data.to_dict(), kind, proto, shards, str(out)))
       | "ByShard" >> beam.GroupByKey()
       | "Write" >> beam.ParDo(_WriteShard(str(out), shards, tok.vocab_size)))
  try:
    return _run(pipeline, config, out, files, tok, kind, proto, shards, start)
  except BaseException:
    _clear(out)
    raise


def _clear(out) -> None:
  """Remove what the run wrote under `out` (it was empty or absent when the run began)."""
  with contextlib.suppress(Exception):
    for child in list(out.iterdir()) if out.exists() else []:
      child.rmtree() if child.is_dir() else child.unlink()


def _listed_shards(out, shards: int) -> dict:
  """split -> {shard: its documents' lengths} for the shards whose lengths file (written last) --output shows."""
  io.forget_listings(out)   # the progress bar's listings, cached by the store's client, predate the last shards
  names = {split: [fmt.shard_name(split, i, shards) for i in range(shards)] for split in fmt.SPLITS}
  return {split: {n: fmt.load_npy(out / fmt.lengths_name(n)) for n in names[split]
                  if (out / fmt.lengths_name(n)).exists()} for split in fmt.SPLITS}


_SHOW_TRIES = 5   # listings of --output, 0.5 s apart and doubling, before a missing shard is an error


def _finished_shards(out, shards: int, written) -> dict:
  """`_listed_shards`, once --output shows all `written` documents the workers wrote (a store may show a new
  object late): never a silently smaller corpus. written None: a runner without committed counters."""
  for attempt in range(_SHOW_TRIES):
    found = _listed_shards(out, shards)
    docs = sum(len(lengths) for split in found.values() for lengths in split.values())
    if written is None or docs == written:
      return found
    time.sleep(0.5 * 2 ** attempt)
  raise UserError(f"the workers wrote {written} documents but --output={out} shows {docs} of them in its shards; "
                  f"the store did not show every shard: run prepare again (nothing was left in --output)")


def _run(pipeline, config, out, files, tok, kind, proto, shards, start) -> dict:
  progress = _ShardProgress(out, 2 * shards)   # shards per split, some perhaps empty
  try:
    result = pipeline.run()
    result.wait_until_finish()
  finally:
    progress.close()
  failed = sorted((out / _FAILED).iterdir()) if (out / _FAILED).exists() else []
  if failed:
    more = f" (and {len(failed) - 1} more files)" if len(failed) > 1 else ""
    raise UserError(f"{failed[0].read_text()}{more}; nothing was left in --output={out}")
  counters = {c.key.metric.name: c.committed for c in result.metrics().query()["counters"]}

  meta = {"format": fmt.FORMAT, "about": "python -m mtp_jax.prepare",
          "tokenizer": {"kind": kind, "identity": tokenizer_lib.identity(tok), "vocab_size": tok.vocab_size,
                        "bos_id": tok.bos_id, "eos_id": tok.eos_id},
          "source": {k: config.data[k] for k in ("source", "path", "text_field", "valid_fraction")},
          "files": len(files), "skipped": counters.get("skipped", 0), "empty": counters.get("empty", 0),
          "bad_records": counters.get("bad_records", 0), "splits": {}}
  found = _finished_shards(out, shards, counters.get("docs_written"))
  for split in fmt.SPLITS:
    names, lengths = list(found[split]), list(found[split].values())
    if not names:
      raise UserError(f"the {split} split of data.source={config.data.source!r} came out empty "
                      f"({len(files)} files); add data or change data.valid_fraction (nothing was left in "
                      f"--output={out})")
    meta["splits"][split] = {"shards": names, "docs": int(sum(len(l) for l in lengths)),
                             "tokens": int(sum(l.sum() for l in lengths))}
    if split == "train":   # the unigram baseline's token frequencies, so training need not read them all
      buf = _BytesIO()
      np.save(buf, sum(fmt.load_npy(out / fmt.counts_name(n)) for n in names))
      io.write_bytes(out / fmt.TRAIN_COUNTS, buf.getvalue())
  if kind == "sentencepiece":
    io.write_bytes(out / fmt.TOKENIZER, proto)
  meta["seconds"] = round(time.time() - start, 2)
  io.write_text(out / fmt.META, json.dumps(meta, indent=1))
  return meta
