"""An mtp_jax workdir -> a Hugging Face Llama directory, heads 2..n beside it in Meta's layout.

    DIR/config.json, generation_config.json   LlamaForCausalLM, transformers 4.x field names (5.x reads them)
    DIR/model.safetensors                     the next-token model: trunk + head 1 as L = trunk + 1 layers
    DIR/tokenizer.model | tokenizer.json (+ tokenizer_config.json)
    DIR/extra_heads.safetensors, params.json  heads 2..n as `extra_heads.*` (Meta's names and rotary order)

`transformers.LlamaForCausalLM.from_pretrained(DIR)` loads the first part as it is and ignores the
rest; `convert import --from=DIR` reads both back, bit-exactly.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from mtp_jax.interop import mapping
from mtp_jax.interop.assemble import get_path
from mtp_jax.interop.tensors import ConvertError


def _dims(m):
  return (m.vocab_size, m.d_model, m.n_heads, m.n_kv_heads, m.d_model // m.n_heads, m.d_ff)


def hf_config(config, tokenizer) -> dict:
  m = config.model
  from mtp_jax.model import ModelArgs
  n_layers = ModelArgs.from_config(m).n_trunk_layers + 1
  rs = m.get("rope_scaling")
  scaling = None
  if rs and rs.type == "llama3":
    scaling = {"rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
               "high_freq_factor": rs.high_freq_factor, "original_max_position_embeddings": int(rs.original_max_len)}
  return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": m.vocab_size,
          "hidden_size": m.d_model, "intermediate_size": m.d_ff, "num_hidden_layers": n_layers,
          "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_kv_heads, "head_dim": m.d_model // m.n_heads,
          "hidden_act": "silu", "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps,
          "rope_theta": m.rope_theta, "rope_scaling": scaling, "tie_word_embeddings": bool(m.tie_embeddings),
          "attention_bias": False, "mlp_bias": False, "torch_dtype": m.param_dtype,
          "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}


def hf_tensors(params, config) -> dict:
  """Hugging Face key -> numpy [out, in] tensor of the next-token model."""
  m = config.model
  dims = _dims(m)
  out = {}
  for path, hf_key, _, kind in mapping.TOP_TABLE:
    if path == "unembed/kernel" and m.tie_embeddings:
      continue
    out[hf_key] = mapping.from_ours(np.asarray(get_path(params, path)), kind, dims, meta=False)
  trunk = params.get("trunk", {}).get("layer")
  n_trunk = len(jax.tree.leaves(trunk)[0]) if trunk else 0
  for i in range(n_trunk + 1):
    for path, hf_suffix, _, kind in mapping.LAYER_TABLE:
      leaf = get_path(trunk, path)[i] if i < n_trunk else get_path(params["heads_0"], path)
      out[f"{mapping.HF_LAYER_PREFIX}{i}.{hf_suffix}"] = mapping.from_ours(np.asarray(leaf), kind, dims, meta=False)
  return out


def extra_head_tensors(params, config) -> dict:
  """Meta key (`extra_heads.{j-1}.*`, interleaved rotary rows) -> tensor of heads 2..n."""
  dims, out = _dims(config.model), {}
  for j in range(1, config.model.n_future):
    for path, _, meta_suffix, kind in mapping.LAYER_TABLE:
      leaf = np.asarray(get_path(params[f"heads_{j}"], path))
      out[f"extra_heads.{j - 1}.{meta_suffix}"] = mapping.from_ours(leaf, kind, dims, meta=True)
  return out


def meta_params(config) -> dict:
  m = config.model
  return {"dim": m.d_model, "n_layers": m.n_layers, "n_heads": m.n_heads, "n_kv_heads": m.n_kv_heads,
          "vocab_size": m.vocab_size, "hidden_dim": m.d_ff, "norm_eps": m.norm_eps, "rope_theta": m.rope_theta,
          "max_seq_len": m.max_seq_len, "n_future_tokens": m.n_future}


def _check_exportable(config) -> None:
  m = config.model
  if m.head_type == "linear":
    raise ConvertError("model.head_type=linear: a linear head is not a Llama layer, so the next-token model has no "
                       "Hugging Face form; export models with parallel transformer heads")
  if m.head_type == "sequential":
    raise ConvertError("model.head_type=sequential: heads 2..n are DeepSeek-style MTP modules (eh_proj, enorm, hnorm), "
                       "which neither a Hugging Face Llama nor Meta's extra_heads layout can hold, so sequential heads "
                       "do not export; decode this workdir with python -m mtp_jax.generate, or export a model "
                       "trained with parallel heads")
  if m.head_type == "causal" and m.n_future > 1:
    raise ConvertError("model.head_type=causal: heads 2..n read the previous head, which Meta's extra_heads layout "
                       "cannot say; export models with parallel heads")
  if not m.parity:
    raise ConvertError("model.parity=False: export expects the parity layout (trunk = n_layers - n_future layers)")


def _write_tokenizer(tokenizer, directory: Path) -> None:
  from mtp_jax import tokenizer as tokenizer_lib
  special = {"bos_token": None, "eos_token": None}
  if isinstance(tokenizer, tokenizer_lib.HFTokenizer):
    (directory / "tokenizer.json").write_bytes(tokenizer.proto)
    special = {k: tokenizer.tok.id_to_token(i) for k, i in (("bos_token", tokenizer.bos_id),
                                                             ("eos_token", tokenizer.eos_id))}
    cls = "PreTrainedTokenizerFast"
  elif isinstance(tokenizer, tokenizer_lib.SentencePieceTokenizer):
    (directory / "tokenizer.model").write_bytes(tokenizer.proto)
    special = {"bos_token": tokenizer.sp.id_to_piece(tokenizer.bos_id),
               "eos_token": tokenizer.sp.id_to_piece(tokenizer.eos_id)}
    cls = "LlamaTokenizer"
  else:   # bytes: an equivalent tokenizers file (ids 0..255 = the UTF-8 bytes, 256 <s>, 257 </s>)
    byte_tokenizer_json(directory / "tokenizer.json")
    special, cls = {"bos_token": "<s>", "eos_token": "</s>"}, "PreTrainedTokenizerFast"
  (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": cls, **special,
                                                               "add_bos_token": True, "add_eos_token": False}))


def byte_tokenizer_json(path: Path) -> None:
  """tokenizer.ByteTokenizer as a `tokenizers` file: byte-level BPE without merges, so every id is one byte."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers
  chars = pre_tokenizers.ByteLevel.alphabet()   # the 256 printable stand-ins GPT-2's byte level uses
  byte_char = _bytes_to_unicode()
  assert set(byte_char.values()) == set(chars)
  tok = tokenizers.Tokenizer(models.BPE(vocab={byte_char[b]: b for b in range(256)}, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens(["<s>", "</s>"])
  tok.save(str(path))


def _bytes_to_unicode() -> dict:
  """GPT-2's byte -> printable character table (the one tokenizers' ByteLevel applies)."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
      list(range(ord("\xae"), ord("\xff") + 1))
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return {b: chr(c) for b, c in zip(bs, cs)}


def export(workdir, to) -> Path:
  """Write the Hugging Face directory `to` (new or empty) from the workdir's newest checkpoint (or import)."""
  from safetensors.numpy import save_file
  from mtp_jax import checkpoint, io, tokenizer as tokenizer_lib
  from mtp_jax import workdir as workdir_lib

  to = io.require_new_dir(to, "--to", "export", ConvertError)
  config = workdir_lib.read_config(workdir)
  _check_exportable(config)
  tokenizer = tokenizer_lib.load_tokenizer(workdir)
  params, config = checkpoint.load_params(workdir)
  params = jax.device_get(params)
  with io.new_dir(to, "--to", last="config.json") as tmp:
    (tmp / "config.json").write_text(json.dumps(hf_config(config, tokenizer), indent=2))
    (tmp / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}, indent=2))
    save_file(hf_tensors(params, config), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if config.model.n_future > 1:
      save_file(extra_head_tensors(params, config), str(tmp / "extra_heads.safetensors"), metadata={"format": "pt"})
      (tmp / "params.json").write_text(json.dumps(meta_params(config), indent=2))
    _write_tokenizer(tokenizer, tmp)
  return to
