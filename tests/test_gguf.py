"""GGUF import: a tiny llama GGUF written here with the `gguf` package's own writer and quantiser, read back.

Equivalences: float32 tensors come back bit-exact in our layout (so llama.cpp's q/k row order is
undone); quantised tensors equal the `gguf` dequantisation of what was written; the rebuilt tokenizer
encodes like the tokenizer the vocabulary came from (byte-level BPE with digits split, as SmolLM2's
`smollm` pre-tokenizer does, and sentencepiece BPE). Bad files: one `error:` line, nothing written.
"""
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import quants  # noqa: E402

from mtp_jax.interop import assemble, mapping  # noqa: E402
from mtp_jax.interop import gguf as gguf_import  # noqa: E402
from mtp_jax.interop.tensors import ConvertError  # noqa: E402
from mtp_jax.model import build_model, init_params  # noqa: E402

from helpers import ROOT
TEXT = ("def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"
        "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n") * 8
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_GGUF_NAME = {v: k for k, v in gguf_import._TOP.items()}
_GGUF_LAYER = {v: k for k, v in gguf_import._LAYER.items()}


def _byte_level_tokenizer():
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator([TEXT], trainer)
  return tok


def _bpe_fields(tok):
  state = json.loads(tok.to_str())["model"]
  vocab = sorted(state["vocab"].items(), key=lambda kv: kv[1])
  tokens = [t for t, _ in vocab]
  merges = [" ".join(m) if isinstance(m, list) else m for m in state["merges"]]
  types = [3 if t in SPECIALS else 1 for t in tokens]
  return tokens, merges, types


def _gguf_name(hf_key: str) -> str:
  if hf_key in _GGUF_NAME:
    return _GGUF_NAME[hf_key]
  rest = hf_key[len(mapping.HF_LAYER_PREFIX):]
  i, name = rest.split(".", 1)
  return f"blk.{i}.{_GGUF_LAYER[name.rsplit('.weight', 1)[0]]}.weight"


def _arch(vocab: int, tie: bool = True) -> assemble.Arch:
  return assemble.Arch(vocab_size=vocab, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=128, norm_eps=1e-5,
                       rope_theta=10000.0, max_seq_len=128, tie_embeddings=tie, bos_id=1, eos_id=2)


def write_gguf(path, arch: assemble.Arch, qtype=Q.F32, architecture="llama", tokenizer="bpe", extra_tensor=None,
               seed=0):
  """A GGUF of a random model with `arch`; returns (our params written, the HF-layout tensors written)."""
  config = assemble.model_config(arch, 1)
  params = jax.tree.map(np.asarray, init_params(build_model(config.model), jax.random.key(seed)))
  expected = assemble.expected_keys(arch, meta=False)
  w = gguf.GGUFWriter(str(path), architecture)
  p = architecture + "."
  w.add_uint32(p + "block_count", arch.n_layers)
  w.add_uint32(p + "context_length", arch.max_seq_len)
  w.add_uint32(p + "embedding_length", arch.d_model)
  w.add_uint32(p + "feed_forward_length", arch.d_ff)
  w.add_uint32(p + "attention.head_count", arch.n_heads)
  w.add_uint32(p + "attention.head_count_kv", arch.n_kv_heads)
  w.add_float32(p + "rope.freq_base", arch.rope_theta)
  w.add_float32(p + "attention.layer_norm_rms_epsilon", arch.norm_eps)
  w.add_uint32(p + "rope.dimension_count", arch.d_model // arch.n_heads)
  if tokenizer == "bpe":
    tokens, merges, types = _bpe_fields(_byte_level_tokenizer())
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_merges(merges)
  else:
    tokens, scores, types = tokenizer
    w.add_tokenizer_model("llama")
    w.add_token_scores(scores)
  w.add_token_list(tokens)
  w.add_token_types(types)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_add_bos_token(False)
  w.add_chat_template(TEMPLATE)
  written = {}
  for key, (dest, path_, kind, _) in expected.items():
    leaf = assemble.get_path(params["trunk"]["layer"], path_)[dest[1]] if dest and dest[0] == "trunk" else (
        assemble.get_path(params[dest[0]], path_) if dest else assemble.get_path(params, path_))
    hf = mapping.from_ours(np.asarray(leaf, np.float32), kind, arch.dims, meta=False)
    stored = hf
    if kind in ("q", "kv_rotated"):   # llama.cpp's converter interleaves q/k rows
      stored = mapping.halves_to_meta(hf, arch.n_heads if kind == "q" else arch.n_kv_heads)
    t = qtype if hf.ndim == 2 else Q.F32
    if t == Q.F32:
      w.add_tensor(_gguf_name(key), np.ascontiguousarray(stored))
      written[key] = hf
    else:
      data = quants.quantize(np.ascontiguousarray(stored), t)
      w.add_tensor(_gguf_name(key), data, raw_dtype=t)
      back = quants.dequantize(data, t).reshape(stored.shape)
      if kind in ("q", "kv_rotated"):
        back = mapping.meta_to_halves(back, arch.n_heads if kind == "q" else arch.n_kv_heads)
      written[key] = back
  if extra_tensor:
    w.add_tensor(*extra_tensor)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return params, written


@pytest.fixture(scope="module")
def vocab():
  return _byte_level_tokenizer().get_vocab_size()


def test_float32_gguf_is_bit_exact(tmp_path, vocab):
  params, _ = write_gguf(tmp_path / "m.gguf", _arch(vocab))
  config, got, tok = gguf_import.read(tmp_path / "m.gguf")
  assert config.model.tie_embeddings and config.model.n_layers == 3 and config.data.tokenizer == "huggingface"
  flat, other = jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(got)
  assert len(flat) == len(other)
  for (path, a), b in zip(flat, other):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_quantised_gguf_equals_gguf_dequantisation(tmp_path, vocab, qtype):
  arch = _arch(vocab, tie=False)
  _, written = write_gguf(tmp_path / "m.gguf", arch, qtype)
  _, got, _ = gguf_import.read(tmp_path / "m.gguf")
  for key, (dest, path_, kind, _) in assemble.expected_keys(arch, meta=False).items():
    ours = assemble.get_path(got["trunk"]["layer"], path_)[dest[1]] if dest and dest[0] == "trunk" else (
        assemble.get_path(got[dest[0]], path_) if dest else assemble.get_path(got, path_))
    np.testing.assert_array_equal(mapping.from_ours(np.asarray(ours), kind, arch.dims, False), written[key],
                                  err_msg=key)


def test_byte_level_tokenizer_and_chat_template_rebuilt(tmp_path, vocab):
  write_gguf(tmp_path / "m.gguf", _arch(vocab))
  _, _, tok = gguf_import.read(tmp_path / "m.gguf")
  ref = _byte_level_tokenizer()
  for text in [TEXT[:200], "x = 12345 + 6 # digits split one by one\n", "ünïcödé 🙂 and <|im_end|> kept whole"]:
    assert tok.encode(text) == ref.encode(text).ids
    assert tok.decode(tok.encode(text)) == text
  assert tok.encode("<|im_start|>")[0] == 1 and len(tok.encode("a<|im_end|>")) == 2
  assert not tok.add_bos and tok.chat_template == TEMPLATE and (tok.bos_id, tok.eos_id) == (1, 2)


def test_sentencepiece_vocabulary_rebuilt(tmp_path):
  spm = pytest.importorskip("sentencepiece")
  import io as _io
  model = _io.BytesIO()
  # as Llama's tokenizer was trained: whitespace kept, no NFKC
  spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT.splitlines() * 4), model_writer=model, vocab_size=360,
                                 model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                 remove_extra_whitespaces=False, normalization_rule_name="identity", minloglevel=2)
  sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
  pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
  scores = [sp.get_score(i) for i in range(sp.get_piece_size())]
  types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
           for i in range(sp.get_piece_size())]
  write_gguf(tmp_path / "m.gguf", _arch(len(pieces)), tokenizer=(pieces, scores, types))
  _, _, tok = gguf_import.read(tmp_path / "m.gguf")
  # Texts that do not start with a space: there llama.cpp always prepends the dummy-prefix space, as we do,
  # while this sentencepiece build leaves a leading space run alone.
  for text in ["def fibonacci(n):", "return fibonacci(n - 1)    # spaces inside", "class Point: x, y"]:
    assert tok.encode(text) == sp.encode(text), text
    assert tok.decode(tok.encode(text)) == text


def _cli_import(src, workdir):
  return subprocess.run([sys.executable, "-m", "mtp_jax.convert", "import", f"--from={src}", f"--workdir={workdir}"],
                        capture_output=True, text=True, cwd=ROOT, timeout=300)


def _one_error_line(proc, *words):
  lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")]
  assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  for w in words:
    assert w in lines[0], lines[0]


def test_bad_gguf_files_are_one_error_line_and_write_nothing(tmp_path, vocab):
  good = tmp_path / "good.gguf"
  write_gguf(good, _arch(vocab))
  cases = {}
  other = tmp_path / "other_arch.gguf"
  write_gguf(other, _arch(vocab), architecture="gpt2")
  cases[other] = ("general.architecture='gpt2'",)
  truncated = tmp_path / "truncated.gguf"
  truncated.write_bytes(good.read_bytes()[:len(good.read_bytes()) * 2 // 3])
  cases[truncated] = ("truncated",)
  odd = tmp_path / "odd_type.gguf"
  write_gguf(odd, _arch(vocab), extra_tensor=("blk.0.ffn_extra.weight", np.zeros((4, 4), np.int8)))
  cases[odd] = ("blk.0.ffn_extra.weight",)
  for src, words in cases.items():
    out = tmp_path / f"w_{src.stem}"
    _one_error_line(_cli_import(src, out), *words)
    assert not out.exists()


def test_unknown_tensor_type_is_named(tmp_path, vocab):
  src = tmp_path / "i8.gguf"
  write_gguf(src, _arch(vocab), extra_tensor=("output.weight", np.zeros((vocab, 64), np.int8)))
  with pytest.raises(ConvertError, match="stored as I8"):
    gguf_import.read(src)
