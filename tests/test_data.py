"""The data pipeline: head i's targets are the input shifted by i and never cross documents; the
iterator state restores exactly; bad corpora fail with one clear line."""
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from configs.tiny import get_config
from mtp_jax import corpora, data
from mtp_jax.errors import UserError
from mtp_jax.loss import shifted_targets

from helpers import ROOT


def _short_docs_config(tmp_path, n_docs=300):
  """Many short files (so windows straddle documents), byte tokenizer, 3 heads."""
  rng = np.random.default_rng(0)
  for i in range(n_docs):
    (tmp_path / f"doc{i:03d}.txt").write_text("".join(chr(97 + j) for j in rng.integers(0, 26, rng.integers(1, 60))))
  (tmp_path / "bad.txt").write_bytes(b"\xff\xfe not utf-8 \xc3")
  (tmp_path / "empty.txt").write_text("")
  c = get_config("bytes")
  c.data.source, c.data.path = "glob", str(tmp_path / "*.txt")
  c.data.cache_dir = str(tmp_path / "cache")
  c.data.seq_len, c.model.n_future, c.model.n_layers = 16, 3, 4
  c.train.batch_size = 8
  return c


def test_targets_are_shifted_inputs_within_documents(tmp_path):
  c = _short_docs_config(tmp_path)
  d = data.build(c)
  split, S, n = d.train, c.data.seq_len, c.model.n_future
  # Ground truth: every window's global offset, found from its content.
  by_content = {data.window(split, S, n, k)["tokens"].tobytes(): k for k in range(data.num_windows(split, S))}
  it = iter(data.train_dataset(split, c))
  crossings = 0
  for _ in range(20):
    batch = next(it)
    assert batch["tokens"].shape == (c.train.batch_size, S + n) and batch["tokens"].dtype == np.int32
    for i in range(1, n + 1):
      targets, mask = (np.asarray(x) for x in shifted_targets({k: jnp.asarray(v) for k, v in batch.items()}, S, i, n))
      for row in range(c.train.batch_size):
        start = by_content[batch["tokens"][row].tobytes()] * S
        pos = start + np.arange(S)
        doc = np.searchsorted(split.starts, np.minimum(pos, len(split) - 1), side="right")
        doc_ahead = np.searchsorted(split.starts, np.minimum(pos + i, len(split) - 1), side="right")
        expected = (doc == doc_ahead) & (pos + i < len(split))
        np.testing.assert_array_equal(mask[row], expected)
        np.testing.assert_array_equal(targets[row][expected], np.asarray(split.tokens)[pos[expected] + i])
        crossings += int((~expected).sum())
  assert crossings > 0    # the check saw document boundaries


def test_documents_are_bos_text_eos_and_bad_files_counted(tmp_path, capsys):
  c = _short_docs_config(tmp_path)
  d = data.build(c)
  out = capsys.readouterr().out
  assert "skipped: unreadable or not UTF-8" in out
  corpus = data.Corpus(c.data)
  for split in ("train", "valid"):
    list(corpus.texts(split))
  assert corpus.stats["train_skipped"] + corpus.stats["valid_skipped"] == 1       # bad.txt
  assert corpus.stats["train_empty"] + corpus.stats["valid_empty"] == 1           # empty.txt
  tok, toks = d.tokenizer, np.asarray(d.train.tokens)
  ends = list(d.train.starts[1:]) + [len(toks)]
  for s, e in zip(d.train.starts, ends):
    assert toks[s] == tok.bos_id and toks[e - 1] == tok.eos_id
    assert tok.decode(toks[s:e]).isalpha()


def test_iterator_state_restores_exactly_and_epochs_reshuffle(tmp_path):
  c = _short_docs_config(tmp_path)
  d = data.build(c)
  ds = data.train_dataset(d.train, c)
  it = iter(ds)
  first_epoch = [next(it) for _ in range(3)]
  state = it.get_state()
  following = [next(it)["tokens"] for _ in range(3)]
  resumed = iter(ds)
  resumed.set_state(state)
  for expected in following:
    np.testing.assert_array_equal(next(resumed)["tokens"], expected)
  # Deterministic in the seed; each epoch visits every window once, in a new order.
  again = iter(data.train_dataset(d.train, c))
  np.testing.assert_array_equal(next(again)["tokens"], first_epoch[0]["tokens"])
  S, n = c.data.seq_len, data.num_windows(d.train, c.data.seq_len)
  by_content = {data.window(d.train, S, c.model.n_future, k)["tokens"].tobytes(): k for k in range(n)}
  order = [by_content[row.tobytes()] for _ in range(2 * n // c.train.batch_size + 1) for row in next(again)["tokens"]]
  order = [by_content[row.tobytes()] for row in first_epoch[0]["tokens"]] + order
  assert sorted(order[:n]) == list(range(n)) == sorted(order[n:2 * n])
  assert order[:n] != order[n:2 * n]


def test_valid_batches_fixed_and_padded(tmp_path):
  c = _short_docs_config(tmp_path)
  c.train.eval_batches = 1000        # more than the split holds: fewer batches, the last one padded
  d = data.build(c)
  batches = data.valid_batches(d.valid, c)
  n = data.num_windows(d.valid, c.data.seq_len)
  assert len(batches) == -(-n // c.train.batch_size)
  assert (batches[-1]["segment_ids"].any(axis=1)).sum() == n - (len(batches) - 1) * c.train.batch_size
  again = data.valid_batches(d.valid, c)
  for a, b in zip(batches, again):
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
  assert np.isfinite(data.unigram_baseline(d.train, batches, c.data.seq_len, c.model.vocab_size))


def test_split_is_by_whole_document_and_never_empty(tmp_path):
  docs = [corpora.Doc(f"f{i}.py", lambda: "x") for i in range(200)]
  train, valid = corpora.split_documents(docs, 0.1)
  assert 5 < len(valid) < 40 and len(train) + len(valid) == 200
  assert corpora.split_documents(list(reversed(docs)), 0.1)[1] == valid
  train, valid = corpora.split_documents(docs[:2], 0.01)
  assert len(train) == len(valid) == 1
  (one,) = [corpora.Doc("only", lambda: "abcdefghij")]
  train, valid = corpora.split_documents([one], 0.2)
  assert train[0].read() + valid[0].read() == "abcdefghij" and valid[0].read() == "ij"


def _main(*flags):
  return subprocess.run([sys.executable, "-m", "mtp_jax.main", "--config=configs/tiny.py", *flags], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("case, words", [
    ("missing", "matches no files"),
    ("empty", "no text in the training split"),
    ("jsonl_missing", "no such file"),
    ("parquet_no_column", "has no column 'text' (its columns: body)"),
])
def test_bad_corpus_exits_2_with_one_line(tmp_path, case, words):
  if case == "empty":
    for i in range(3):
      (tmp_path / f"e{i}.txt").write_text("")
  if case == "parquet_no_column":
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"body": ["some text"] * 3}), tmp_path / "c.parquet")
  flags = {"missing": ["--config.data.source=glob", f"--config.data.path={tmp_path}/nothing/*.txt"],
           "empty": ["--config.data.source=glob", f"--config.data.path={tmp_path}/*.txt"],
           "jsonl_missing": ["--config.data.source=jsonl", f"--config.data.path={tmp_path}/x.jsonl"],
           "parquet_no_column": ["--config.data.source=parquet", f"--config.data.path={tmp_path}/c.parquet"]}[case]
  workdir = tmp_path / "run"
  r = _main(f"--workdir={workdir}", f"--config.data.cache_dir={tmp_path}/cache", *flags)
  assert r.returncode == 2, r.stderr
  errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and words in errors[0], r.stderr
  assert "Traceback" not in r.stderr
  assert not workdir.exists()


def test_jsonl_source(tmp_path):
  lines = ['{"text": "alpha beta"}', '{"text": 3}', "not json", '{"body": "x"}'] + \
          [f'{{"text": "document number {i}"}}' for i in range(30)]
  (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
  c = get_config("bytes")
  c.data.source, c.data.path, c.data.cache_dir = "jsonl", str(tmp_path / "c.jsonl"), str(tmp_path / "cache")
  corpus = data.Corpus(c.data)
  assert corpus.stats["bad_lines"] == 3
  assert len(corpus.splits["train"]) + len(corpus.splits["valid"]) == 31
  c.data.text_field = "nope"
  with pytest.raises(UserError, match="data.text_field"):
    data.Corpus(c.data)
