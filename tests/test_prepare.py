"""prepare (Beam, DirectRunner engine, 2 worker processes) writes the same tokens per document as the
single-process cache; training reads its shards; damaged shards are one line."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader

from configs.tiny import get_config
from helpers import ROOT
from mtp_jax import data
from mtp_jax.errors import UserError
from mtp_jax.shards import format as fmt


def _corpus(tmp_path, n=150):
  """Many small files: ASCII, accented text, code-like lines, an empty and a non-UTF-8 one."""
  rng = np.random.default_rng(1)
  words = ["def", "return", "x", "café", "naïve", "  ", "\n", "(", ")", "ü", "42", "self", "日本"]
  root = tmp_path / "corpus"
  for i in range(n):
    (root / f"d{i % 7}").mkdir(parents=True, exist_ok=True)
    (root / f"d{i % 7}" / f"f{i:03d}.txt").write_text(" ".join(rng.choice(words, rng.integers(1, 80))))
  (root / "empty.txt").write_text("")
  (root / "bad.txt").write_bytes(b"\xff\xfe not utf-8")
  return str(root / "**" / "*.txt")


def _config(tmp_path, pattern, tokenizer):
  c = get_config("bytes")
  c.data.source, c.data.path, c.data.tokenizer = "glob", pattern, tokenizer
  c.data.cache_dir, c.data.max_train_bytes, c.data.prepare_shards = str(tmp_path / "cache"), 0, 5
  c.data.valid_fraction = 0.1
  if tokenizer != "bytes":
    c.model.vocab_size = 300
  return c


def _prepared_docs(out):
  meta = json.loads((out / fmt.META).read_text())
  docs = {}
  for split in fmt.SPLITS:
    for shard in meta["splits"][split]["shards"]:
      reader = ArrayRecordReader(str(out / shard))
      records = reader.read_all()
      reader.close()
      assert list(fmt.load_npy(out / fmt.lengths_name(shard))) == [len(fmt.decode(r)[1]) for r in records]
      for r in records:
        name, tokens = fmt.decode(r)
        docs[name] = (split, tokens.tolist())
  return meta, docs


def _cache_docs(c):
  corpus = data.Corpus(c.data)
  tok = data.build_tokenizer(c, corpus)
  splits, _ = data.tokenize_corpus(corpus, tok, c)
  docs = {}
  for split in fmt.SPLITS:
    names = [d.name for d in corpus.splits[split] if d.read()]
    s = splits[split]
    bounds = list(s.starts) + [len(s)]
    assert len(names) == len(s.starts)
    for k, name in enumerate(names):
      docs[name] = (split, np.asarray(s.tokens[bounds[k]:bounds[k + 1]]).tolist())
  return tok, docs


def test_prepare_two_workers_matches_single_process(tmp_path):
  pattern = _corpus(tmp_path)
  c = _config(tmp_path, pattern, "sentencepiece")
  tok, expected = _cache_docs(c)      # the single-process path (and its trained tokenizer)
  model = tmp_path / "sp.model"
  model.write_bytes(tok.proto)
  out = tmp_path / "prepared"
  r = subprocess.run([sys.executable, "-m", "mtp_jax.prepare", "--config=configs/tiny.py:bytes",
                      "--config.data.source=glob", f"--config.data.path={pattern}", f"--config.data.tokenizer={model}",
                      "--config.model.vocab_size=300", "--config.data.max_train_bytes=0",
                      "--config.data.valid_fraction=0.1", "--config.data.prepare_shards=5", f"--output={out}",
                      "--direct_num_workers=2", "--direct_running_mode=multi_processing"],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  meta, got = _prepared_docs(out)
  assert got == expected              # every document: same split, bit-identical token ids
  assert meta["empty"] == 1 and meta["skipped"] == 1 and meta["files"] == 152
  assert meta["tokenizer"]["identity"] == __import__("mtp_jax.tokenizer").tokenizer.identity(tok)
  # Training reads the shards as one flat token stream per split with the same documents.
  c2 = _config(tmp_path, str(out), "sentencepiece")
  c2.data.source = "prepared"
  d = data.build(c2)
  for split in fmt.SPLITS:
    s = getattr(d, split)
    assert len(s) == sum(len(t) for sp, t in expected.values() if sp == split)
    assert s.tokens[0:len(s)].tolist() == [x for n in sorted(got, key=lambda n: (fmt.shard_of(n, 5), n))
                                             if got[n][0] == split for x in got[n][1]]
  counts = np.bincount(np.concatenate([t for sp, t in got.values() if sp == "train"]), minlength=300)
  np.testing.assert_array_equal(d.train.counts, counts)


def test_damaged_shard_is_one_line(tmp_path):
  pattern = _corpus(tmp_path, n=30)
  c = _config(tmp_path, pattern, "bytes")
  # Documents are named by their paths under tmp_path, so the split differs per run: at 0.1, 30 files
  # leave the valid split empty 4% of the time (0.9**30); at 0.3, 2e-5.
  c.data.valid_fraction = 0.3
  from mtp_jax.shards.pipeline import prepare
  out = tmp_path / "prepared"
  prepare(c, str(out), ["--direct_num_workers=1", "--direct_running_mode=in_memory"])
  with pytest.raises(UserError, match="not empty"):
    prepare(c, str(out), ["--direct_running_mode=in_memory"])
  c.data.source, c.data.path = "prepared", str(out)
  data.build(c)
  shard = out / json.loads((out / fmt.META).read_text())["splits"]["train"]["shards"][0]
  shard.write_bytes(shard.read_bytes()[:-40])       # cut short, as by a failed copy
  with pytest.raises(UserError, match="run prepare again"):
    data.build(c)
  c.data.path = str(tmp_path / "nothing")
  with pytest.raises(UserError, match="not a finished prepare output"):
    data.build(c)


def test_a_shard_the_store_does_not_show_is_an_error_not_a_smaller_corpus(tmp_path, monkeypatch):
  """The workers count the documents they write; if --output shows fewer (a shard hidden by a stale
  listing), prepare says so, exits with an error and leaves nothing, instead of writing a smaller corpus."""
  from mtp_jax.shards import pipeline
  c = _config(tmp_path, _corpus(tmp_path, n=30), "bytes")
  c.data.valid_fraction = 0.3
  listed = pipeline._listed_shards

  def hiding_one(out, shards):
    found = listed(out, shards)
    found["train"].pop(next(iter(found["train"])))
    return found

  monkeypatch.setattr(pipeline, "_listed_shards", hiding_one)
  monkeypatch.setattr(pipeline, "_SHOW_TRIES", 2)
  out = tmp_path / "prepared"
  with pytest.raises(UserError, match=r"the workers wrote \d+ documents but --output=.* shows \d+ of them"):
    pipeline.prepare(c, str(out), ["--direct_num_workers=1", "--direct_running_mode=in_memory"])
  assert not out.exists() or not any(out.iterdir())


def _records(workdir):
  return [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]


def test_two_processes_train_from_shards_like_one(tmp_path):
  """jax.distributed on a loopback coordinator, CPU, one device per process, both reading the shards:
  together they read every window once per epoch, and log the losses of one process with two devices
  fed the same global batches."""
  from gcs_emulator import free_port
  c = _config(tmp_path, _corpus(tmp_path, n=120), "bytes")
  from mtp_jax.shards.pipeline import prepare
  prepare(c, str(tmp_path / "prepared"), ["--direct_running_mode=in_memory"])
  script = os.path.join(ROOT, "tests", "multiprocess_train.py")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  port = free_port()

  def start(pid, count, workdir, extra_env):
    return subprocess.Popen([sys.executable, script, str(pid), str(count), str(port), str(tmp_path / "prepared"),
                             str(workdir), str(tmp_path / "cache"), str(tmp_path / f"seen{count}_{pid}.json")],
                            cwd=ROOT, env={**env, **extra_env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)

  procs = [start(pid, 2, tmp_path / "two", {}) for pid in (0, 1)]
  one = start(0, 1, tmp_path / "one", {"XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"})
  outs = [p.communicate(timeout=240)[0] for p in procs + [one]]
  for p, out in zip(procs + [one], outs):
    assert p.returncode == 0, "\n=====\n".join(o[-2500:] for o in outs)
  seen = [json.load(open(tmp_path / f"seen2_{pid}.json")) for pid in (0, 1)]
  assert all(s["processes"] == 2 and s["devices"] == 2 for s in seen)
  n = seen[0]["windows"]
  both = seen[0]["seen"] + seen[1]["seen"]
  assert len(both) == len(set(both)) == n // 4 * 4 and set(both) <= set(range(n))   # each window once
  assert not set(seen[0]["seen"]) & set(seen[1]["seen"])
  reference = json.load(open(tmp_path / "seen1_0.json"))["seen"]
  assert sorted(both) == sorted(reference)
  a, b = _records(tmp_path / "one"), _records(tmp_path / "two")
  assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) >= 7
  for x, y in zip(a, b):
    assert (x.get("loss"), x.get("head_losses"), x.get("grad_norm")) == \
        (y.get("loss"), y.get("head_losses"), y.get("grad_norm"))
  assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["6"]


def test_prepare_bucket_to_bucket_and_train_reads_it(gcs, tmp_path, monkeypatch):
  """Corpus and output on the bucket (2 worker processes); training copies the shards into its cache. The
  progress bar lists --output while the workers write (every 10 ms here): that listing, which the store
  client caches, must not hide from the final count the shards written after it."""
  from mtp_jax import io
  from mtp_jax.shards import pipeline
  from mtp_jax.shards.pipeline import prepare
  monkeypatch.setattr(pipeline._ShardProgress, "POLL_S", 0.01)
  for i in range(40):
    io.write_text(f"gs://bkt/prep/corpus/f{i:02d}.txt", f"text number {i} " * (i + 1))
  c = _config(tmp_path, "gs://bkt/prep/corpus/*.txt", "bytes")
  local = _cache_docs(c)[1]
  meta = prepare(c, "gs://bkt/prep/out", ["--direct_num_workers=2", "--direct_running_mode=multi_processing"])
  assert meta["splits"]["train"]["docs"] + meta["splits"]["valid"]["docs"] == 40
  c.data.source, c.data.path = "prepared", "gs://bkt/prep/out"
  d = data.build(c)
  assert len(d.train) + len(d.valid) == sum(len(t) for _, t in local.values())
  assert any(p.name.startswith("prepared-") for p in (tmp_path / "cache").iterdir())
