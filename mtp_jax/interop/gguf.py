"""GGUF files (llama.cpp's format) -> an mtp_jax workdir, read with the `gguf` package.

    python -m mtp_jax.convert import --from=model.gguf --workdir=W [--n_future=N]

`gguf` (llama.cpp's own Python reader) parses the header and dequantises every block format it knows
(F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the K-quants); nothing of the format is hand-written
here. The `llama` architecture only: its tensor names map onto the Hugging Face keys of mapping.py
(`blk.i.attn_q.weight` -> `model.layers.i.self_attn.q_proj.weight`, ...), so the same key checks,
transposes and head layout apply as for a safetensors import. Two GGUF-specific steps:

- llama.cpp's converter reorders q's and k's rows per head from rotate-half to interleaved pairs
  (convert_hf_to_gguf.py `permute`); `_GGUFTensors.items` undoes it, so rows arrive in Hugging Face order.
- The tokenizer is rebuilt from the metadata with the `tokenizers` library: byte-level BPE (`gpt2`
  model: tokens + merges + the pre-tokenizer that `tokenizer.ggml.pre` names) or a sentencepiece-style
  `llama` vocabulary (tokens + scores, byte fallback). BOS/EOS, whether BOS is prepended, and the chat
  template travel with it into the workdir.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from mtp_jax.interop import mapping
from mtp_jax.interop.assemble import Arch, build_params, check_vocab, model_config
from mtp_jax.interop.tensors import ConvertError

ARCHITECTURE = "llama"
# Block formats imported (all dequantised by `gguf` itself); anything else is refused by name.
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                "Q6_K")
_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_LAYER = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}

# Pre-tokenizers by `tokenizer.ggml.pre`, as llama.cpp's llama-vocab.cpp splits text before BPE.
_GPT2_PRE = ("default", "gpt2", "mpt", "olmo", "jais")
_DIGITS_PRE = ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva")
_LLAMA3_PRE = ("llama-bpe", "llama3")
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
_CONTROL, _USER_DEFINED = 3, 4   # llama.cpp token types that are never split (special tokens)


def hf_key(name: str) -> Optional[str]:
  """The Hugging Face key of a GGUF tensor name, or None for a name the llama architecture does not have."""
  if name in _TOP:
    return _TOP[name]
  parts = name.split(".")
  if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] == "weight" and parts[2] in _LAYER:
    return f"{mapping.HF_LAYER_PREFIX}{parts[1]}.{_LAYER[parts[2]]}.weight"
  return None


def open_reader(path: Path):
  """gguf.GGUFReader over `path`; a truncated or foreign file is one ConvertError."""
  try:
    import gguf
  except ImportError:
    raise ConvertError(f"{path} is a GGUF file and reading it needs the gguf package: pip install gguf")
  try:
    return gguf.GGUFReader(str(path))
  except Exception as e:   # bad magic, short read, offsets past the end of a truncated file
    detail = str(e).splitlines()[0][:160] if str(e) else ""
    raise ConvertError(f"{path} is not a readable GGUF file ({type(e).__name__}: {detail}); it is truncated or "
                       f"damaged: download it again")


def _field(reader, key: str, default=None):
  f = reader.fields.get(key)
  if f is None:
    return default
  v = f.contents()
  return v


def _required(reader, key: str, where: str):
  v = _field(reader, key)
  if v is None:
    raise ConvertError(f"{where}: the metadata lacks {key}; the file is not a complete llama GGUF")
  return v


def read_arch(reader, where: str) -> Arch:
  """The model's shape from the GGUF metadata, in our terms; refuses what our model cannot represent."""
  arch = _field(reader, "general.architecture")
  if arch != ARCHITECTURE:
    raise ConvertError(f"{where}: general.architecture={arch!r} is not supported; mtp_jax imports GGUF files of "
                       f"the {ARCHITECTURE!r} architecture (Llama, SmolLM, Mistral-style dense models)")
  p = ARCHITECTURE + "."
  d = int(_required(reader, p + "embedding_length", where))
  h = int(_required(reader, p + "attention.head_count", where))
  if h < 1 or d % h:
    raise ConvertError(f"{where}: {p}attention.head_count={h} does not divide {p}embedding_length={d}")
  rope_dim = _field(reader, p + "rope.dimension_count")
  if rope_dim is not None and int(rope_dim) != d // h:
    raise ConvertError(f"{where}: {p}rope.dimension_count={rope_dim} rotates part of each head; mtp_jax rotates "
                       f"whole heads ({d // h})")
  scaling = _field(reader, p + "rope.scaling.type")
  if scaling not in (None, "none") or any(t.name == "rope_freqs.weight" for t in reader.tensors):
    raise ConvertError(f"{where}: scaled rotary embeddings ({scaling or 'rope_freqs.weight'}) are not supported in "
                       f"GGUF imports; convert the Hugging Face checkpoint instead")
  names = {t.name for t in reader.tensors}
  embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
  if embed is None:
    raise ConvertError(f"{where} has no token_embd.weight tensor; the file is not a complete llama GGUF")
  bos, eos = _field(reader, "tokenizer.ggml.bos_token_id"), _field(reader, "tokenizer.ggml.eos_token_id")
  return Arch(vocab_size=int(embed.shape[-1]), d_model=d, n_layers=int(_required(reader, p + "block_count", where)),
              n_heads=h, n_kv_heads=int(_field(reader, p + "attention.head_count_kv", h)),
              d_ff=int(_required(reader, p + "feed_forward_length", where)),
              norm_eps=float(_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-5)),
              rope_theta=float(_field(reader, p + "rope.freq_base", 10000.0)),
              max_seq_len=int(_field(reader, p + "context_length", 2048)),
              tie_embeddings="output.weight" not in names,
              bos_id=None if bos is None else int(bos), eos_id=None if eos is None else int(eos))


class _GGUFTensors:
  """The `TensorFiles` interface over one GGUF file: Hugging Face keys, [out, in] shapes, dequantised rows."""

  def __init__(self, reader, where: str, arch: Arch):
    self.reader, self.arch = reader, arch
    self.by_key, self.shapes = {}, {}
    for t in reader.tensors:
      key = hf_key(t.name)
      if key is None:
        raise ConvertError(f"{where}: tensor {t.name} has no place in a llama model; mtp_jax imports bias-free "
                           f"llama layers only")
      if t.tensor_type.name not in TENSOR_TYPES:
        raise ConvertError(f"{where}: tensor {t.name} is stored as {t.tensor_type.name}, which the importer does "
                           f"not read; supported: {', '.join(TENSOR_TYPES)}")
      self.by_key[key] = t
      self.shapes[key] = tuple(int(s) for s in reversed(t.shape))   # ggml lists dimensions innermost first

  def keys(self) -> set:
    return set(self.by_key)

  def items(self, keys, dtype):
    from gguf import quants
    for key in keys:
      t = self.by_key[key]
      try:
        w = quants.dequantize(t.data, t.tensor_type).reshape(self.shapes[key])
      except Exception as e:   # a block past the end of a truncated file
        raise ConvertError(f"tensor {t.name} cannot be read ({type(e).__name__}); the file is truncated or "
                           f"damaged: download it again")
      if key.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
        heads = self.arch.n_heads if "q_proj" in key else self.arch.n_kv_heads
        w = mapping.meta_to_halves(w, heads)   # undo llama.cpp's interleaved rotary row order
      yield key, w.astype(dtype)


def _pre_tokenizer(pre: str, where: str):
  from tokenizers import Regex, pre_tokenizers
  if pre in _GPT2_PRE:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre in _DIGITS_PRE:
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  if pre in _LLAMA3_PRE:
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_REGEX), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  known = ", ".join(_GPT2_PRE + _DIGITS_PRE + _LLAMA3_PRE)
  raise ConvertError(f"{where}: tokenizer.ggml.pre={pre!r} is a pre-tokenizer the importer does not know; "
                     f"known: {known}")


def _special_tokens(tokens, types):
  from tokenizers import AddedToken
  return [AddedToken(tokens[i], special=True, normalized=False) for i in range(len(tokens))
          if types is not None and int(types[i]) in (_CONTROL, _USER_DEFINED)]


def _byte_level_bpe(reader, tokens, where: str):
  from tokenizers import Tokenizer, decoders, models
  merges = _field(reader, "tokenizer.ggml.merges")
  if merges is None:
    raise ConvertError(f"{where}: a gpt2 (byte-level BPE) vocabulary without tokenizer.ggml.merges")
  bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ", 1)) for m in merges],
                   fuse_unk=False, byte_fallback=False)
  tok = Tokenizer(bpe)
  tok.pre_tokenizer = _pre_tokenizer(str(_field(reader, "tokenizer.ggml.pre", "default")), where)
  tok.decoder = decoders.ByteLevel()
  return tok


def _sentencepiece_bpe(reader, tokens, where: str):
  """A sentencepiece BPE vocabulary (Llama 1/2, Mistral): merges ordered by the merged piece's score."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  scores = _field(reader, "tokenizer.ggml.scores")
  if scores is None:
    raise ConvertError(f"{where}: a llama (sentencepiece) vocabulary without tokenizer.ggml.scores")
  vocab = {t: i for i, t in enumerate(tokens)}
  merges = []
  for piece, i in vocab.items():
    for k in range(1, len(piece)):
      a, b = piece[:k], piece[k:]
      if a in vocab and b in vocab:
        merges.append((-float(scores[i]), vocab[a], vocab[b], a, b))
  merges.sort()
  unk = _field(reader, "tokenizer.ggml.unknown_token_id", 0)
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], unk_token=tokens[int(unk)],
                             fuse_unk=True, byte_fallback=True))
  prefix = "first" if _field(reader, "tokenizer.ggml.add_space_prefix", True) else "never"
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=prefix, split=False)
  strip = [decoders.Strip(content=" ", left=1, right=0)] if prefix == "first" else []
  tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()] + strip)
  return tok


def read_tokenizer(reader, arch: Arch, where: str):
  """Our HFTokenizer rebuilt from tokenizer.ggml.* with the `tokenizers` library, chat template included."""
  from mtp_jax import tokenizer as tokenizer_lib
  model = _field(reader, "tokenizer.ggml.model")
  tokens = _field(reader, "tokenizer.ggml.tokens")
  if tokens is None or model is None:
    raise ConvertError(f"{where} carries no tokenizer (tokenizer.ggml.model / tokens); mtp_jax needs the "
                       f"vocabulary to encode prompts")
  types = _field(reader, "tokenizer.ggml.token_type")
  if model == "gpt2":
    tok = _byte_level_bpe(reader, tokens, where)
  elif model == "llama":
    tok = _sentencepiece_bpe(reader, tokens, where)
  else:
    raise ConvertError(f"{where}: tokenizer.ggml.model={model!r} is not supported; the importer rebuilds gpt2 "
                       f"(byte-level BPE) and llama (sentencepiece BPE) vocabularies")
  tok.add_special_tokens(_special_tokens(tokens, types))
  if arch.bos_id is None or arch.eos_id is None:
    raise ConvertError(f"{where}: the metadata names no tokenizer.ggml.bos_token_id / eos_token_id")
  out = tokenizer_lib.HFTokenizer(tok.to_str().encode("utf-8"), arch.bos_id, arch.eos_id, origin=where,
                                  add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", True)),
                                  chat_template=_field(reader, "tokenizer.chat_template"),
                                  eot_id=_field(reader, "tokenizer.ggml.eot_token_id"))
  check_vocab(out, arch, where)
  return out


def read(path, n_future: Optional[int] = None, head_init: str = "copy", param_dtype: str = "float32",
         seed: int = 0, head_type: str = "parallel"):
  """(config, numpy params, tokenizer) of a llama GGUF file with n_future heads (default 1)."""
  path = Path(path)
  if not path.is_file():
    raise ConvertError(f"--from={path}: no such file")
  where = str(path)
  reader = open_reader(path)
  arch = read_arch(reader, where)
  source = _GGUFTensors(reader, where, arch)   # names and block formats refused before any weight is read
  tok = read_tokenizer(reader, arch, where)
  config = model_config(arch, n_future or 1, param_dtype, head_type)
  config.data.tokenizer = "huggingface"
  params = build_params(arch, config, [source], meta=False, head_init=head_init, seed=seed)
  return config, params, tok
