"""Tokenizers round-trip any text; a trained sentencepiece model is cached and reused; vocab mismatches fail clearly."""
import pytest

from configs.tiny import get_config
from mtp_jax import data, tokenizer
from mtp_jax.errors import UserError

TEXTS = ["def f(x):\n    return x + 1\n", "  héllo\n\twörld 🙂 \r\n", "", "\x00\x7f ünïcode ∑ 中文"]


def test_bytes_round_trip():
  tok = tokenizer.ByteTokenizer()
  assert tok.vocab_size == 258 and {tok.bos_id, tok.eos_id} == {256, 257}
  for text in TEXTS:
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
  assert tok.decode([tok.bos_id, *tok.encode("ab"), tok.eos_id]) == "ab"


@pytest.fixture(scope="module")
def corpus_config(tmp_path_factory):
  c = get_config()
  c.data.cache_dir = str(tmp_path_factory.mktemp("cache"))
  c.data.max_train_bytes = 100_000
  return c


def test_sentencepiece_round_trip_and_cache_reuse(corpus_config):
  c = corpus_config
  tok = data.build_tokenizer(c)
  assert tok.vocab_size == c.model.vocab_size
  assert (tok.bos_id, tok.eos_id) == (1, 2)
  for text in TEXTS:   # byte fallback: characters never seen in training still round-trip
    assert tok.decode(tok.encode(text)) == text
  cached = list(tokenizer.cache_dir(c).glob("tokenizer-*.model"))
  assert len(cached) == 1

  def must_not_train():
    raise AssertionError("the cached tokenizer should have been reused")

  corpus = data.Corpus(c.data)
  again = tokenizer.for_config(c, must_not_train, corpus.fingerprint)
  assert again.proto == tok.proto
  c2 = c.copy_and_resolve_references()   # another vocabulary is another model
  c2.model.vocab_size = 400
  assert tokenizer.for_config(c2, lambda: corpus.texts("train"), corpus.fingerprint).vocab_size == 400
  assert len(list(tokenizer.cache_dir(c).glob("tokenizer-*.model"))) == 2


def test_workdir_copy_and_vocab_mismatch(corpus_config, tmp_path):
  c = corpus_config
  tok = data.build_tokenizer(c)
  tokenizer.save_to_workdir(tok, tmp_path)
  (tmp_path / "config.json").write_text('{"data": {"tokenizer": "sentencepiece"}}')
  assert tokenizer.load_tokenizer(tmp_path).proto == tok.proto
  c2 = c.copy_and_resolve_references()
  c2.data.tokenizer = str(tmp_path / "tokenizer.model")     # a user-supplied .model file
  c2.model.vocab_size = 1000
  with pytest.raises(UserError, match=r"has 512 ids but model.vocab_size=1000.*vocab_size=512"):
    tokenizer.for_config(c2)
  c2.data.tokenizer = str(tmp_path / "missing.model")
  with pytest.raises(UserError, match="missing.model"):
    tokenizer.for_config(c2)
