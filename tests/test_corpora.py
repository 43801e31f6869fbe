"""corpora.py: JSONL (plain, .gz, .zst), Parquet, save_to_disk directories and gs:// globs list the
same documents; a missing text column is one line naming the columns present."""
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from configs.tiny import get_config
from mtp_jax import corpora, data
from mtp_jax.errors import UserError

TEXTS = [f"document {i}: " + "abc " * (i % 7) for i in range(40)]


def _cfg(source, path, tmp_path):
  c = get_config("bytes")
  c.data.source, c.data.path, c.data.cache_dir = source, str(path), str(tmp_path / "cache")
  return c


def _texts(c):
  corpus = data.Corpus(c.data)
  return sorted(t for s in ("train", "valid") for t in corpus.texts(s))


def _jsonl(texts):
  return "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)).encode()


def test_jsonl_compressed_and_globbed(tmp_path):
  (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(_jsonl(TEXTS[:20])))
  (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(_jsonl(TEXTS[20:])))
  assert _texts(_cfg("jsonl", tmp_path / "*.jsonl.*", tmp_path)) == sorted(TEXTS)


def test_parquet_row_groups_and_missing_column(tmp_path):
  table = pa.table({"id": list(range(40)), "content": TEXTS})
  pq.write_table(table, tmp_path / "c.parquet", row_group_size=7)   # several row groups
  c = _cfg("parquet", tmp_path / "c.parquet", tmp_path)
  c.data.text_field = "content"
  assert _texts(c) == sorted(TEXTS)
  c.data.text_field = "text"
  with pytest.raises(UserError, match=r"has no column 'text' \(its columns: id, content\)"):
    data.Corpus(c.data)


def test_hf_save_to_disk_read_with_pyarrow(tmp_path):
  import datasets
  ds = datasets.Dataset.from_dict({"text": TEXTS, "n": list(range(40))})
  ds.save_to_disk(str(tmp_path / "ds"), num_shards=3)
  datasets.DatasetDict({"train": ds, "test": ds.select(range(3))}).save_to_disk(str(tmp_path / "dd"))
  assert _texts(_cfg("hf_disk", tmp_path / "ds", tmp_path)) == sorted(TEXTS)
  assert _texts(_cfg("hf_disk", tmp_path / "dd", tmp_path)) == sorted(TEXTS)   # the train split
  with pytest.raises(UserError, match="save_to_disk"):
    data.Corpus(_cfg("hf_disk", tmp_path, tmp_path).data)


def test_bucket_glob_lists_the_same_documents(gcs, tmp_path):
  from mtp_jax import io
  for i, t in enumerate(TEXTS[:12]):
    io.write_text(f"gs://bkt/corpora/txt/sub{i % 2}/d{i:02d}.txt", t)
  io.write_bytes("gs://bkt/corpora/c.jsonl.gz", gzip.compress(_jsonl(TEXTS)))
  assert _texts(_cfg("glob", "gs://bkt/corpora/txt/**/*.txt", tmp_path)) == sorted(TEXTS[:12])
  assert _texts(_cfg("jsonl", "gs://bkt/corpora/c.jsonl.gz", tmp_path)) == sorted(TEXTS)
  files = corpora.list_files(_cfg("glob", "gs://bkt/corpora/txt/**/*.txt", tmp_path).data)
  assert all(f.version for f in files)   # the cache key sees a rewrite of any object
