"""Hugging Face Llama-family checkpoints -> an mtp_jax workdir.

A directory as `save_pretrained` writes it: config.json (transformers 4.x or 5.x field names),
model.safetensors or model-0000k-of-0000m.safetensors + model.safetensors.index.json (float32, bfloat16
or float16), and tokenizer.json (the `tokenizers` library) or tokenizer.model (sentencepiece). If an
mtp_jax export wrote the directory, extra_heads.safetensors + params.json beside it hold heads 2..n.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from mtp_jax.interop.assemble import Arch, build_params, check_vocab, model_config
from mtp_jax.interop.tensors import ConvertError, TensorFiles, safetensors_in

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
EXTRA_HEADS = "extra_heads.safetensors"
# config.json fields that change the computation in ways our model cannot represent, with the value it needs.
_MUST_BE = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "sliding_window": None,
            "use_sliding_window": False, "partial_rotary_factor": 1.0, "quantization_config": None}
_ARCHITECTURES = ("LlamaForCausalLM",)
_POSITIVE = ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
             "intermediate_size", "head_dim", "max_position_embeddings")


def _rope(cfg: dict, where: str):
  """(rope_theta, llama3 scaling dict or None) from 4.x (rope_theta, rope_scaling) or 5.x (rope_parameters)."""
  params = cfg.get("rope_parameters")
  if params is not None:        # transformers 5.x
    field = "rope_parameters"
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = params
  else:                          # transformers 4.x
    field = "rope_scaling"
    theta = cfg.get("rope_theta", 10000.0)
    scaling = cfg.get("rope_scaling")
  if isinstance(scaling, dict) and "full_attention" in scaling and isinstance(scaling["full_attention"], dict):
    raise ConvertError(f"{where}: {field} is given per layer type; mtp_jax supports one rotary setting for all layers")
  kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
  if kind == "default":
    return float(theta), None
  if kind != "llama3":
    raise ConvertError(f"{where}: {field}.rope_type={kind!r} is not supported; mtp_jax implements default and "
                       f"llama3 rotary embeddings")
  try:
    return float(theta), {"factor": float(scaling["factor"]), "low_freq_factor": float(scaling["low_freq_factor"]),
                          "high_freq_factor": float(scaling["high_freq_factor"]),
                          "original_max_len": int(scaling["original_max_position_embeddings"])}
  except KeyError as e:
    raise ConvertError(f"{where}: {field} of type llama3 lacks {e.args[0]}")


def _first_id(v) -> Optional[int]:
  if isinstance(v, list):
    return int(v[0]) if v else None
  return None if v is None else int(v)


def read_config(directory: Path) -> Arch:
  where = directory / "config.json"
  if not where.exists():
    raise ConvertError(f"{directory} has no config.json: not a Hugging Face model directory (give the folder "
                       f"save_pretrained wrote, with config.json and *.safetensors)")
  cfg = _json_object(where, "download it again")
  if cfg.get("model_type") != "llama":
    raise ConvertError(f"{where}: model_type={cfg.get('model_type')!r} is not supported; mtp_jax converts "
                       f"Llama-architecture models (model_type 'llama')")
  archs = cfg.get("architectures") or list(_ARCHITECTURES)
  if any(a not in _ARCHITECTURES for a in archs):
    raise ConvertError(f"{where}: architectures={archs} is not supported; mtp_jax converts LlamaForCausalLM")
  for field, want in _MUST_BE.items():
    if cfg.get(field, want) != want:
      raise ConvertError(f"{where}: {field}={cfg[field]!r} cannot be represented (mtp_jax needs {want!r})")
  for field in _POSITIVE:
    v = cfg.get(field)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
      raise ConvertError(f"{where}: {field}={v!r} must be a positive integer")
  try:
    d, h = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or d // h
    if head_dim * h != d:
      raise ConvertError(f"{where}: head_dim={head_dim} is not hidden_size/num_attention_heads={d // h}; mtp_jax "
                         f"derives the head size from hidden_size")
    theta, scaling = _rope(cfg, str(where))
    arch = Arch(vocab_size=int(cfg["vocab_size"]), d_model=d, n_layers=int(cfg["num_hidden_layers"]), n_heads=h,
                n_kv_heads=int(cfg.get("num_key_value_heads") or h), d_ff=int(cfg["intermediate_size"]),
                norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta,
                max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), rope_scaling=scaling,
                bos_id=_first_id(cfg.get("bos_token_id")), eos_id=_first_id(cfg.get("eos_token_id")))
  except KeyError as e:
    raise ConvertError(f"{where} lacks the field {e.args[0]}")
  gen = directory / "generation_config.json"
  if gen.exists():   # generation_config.json states the ids generation uses; prefer it
    g = _json_object(gen, "delete it to use config.json's bos_token_id / eos_token_id")
    arch.bos_id = _first_id(g.get("bos_token_id", arch.bos_id))
    arch.eos_id = _first_id(g.get("eos_token_id", arch.eos_id))
  extra = directory / "params.json"
  if (directory / EXTRA_HEADS).exists() and extra.exists():
    n = _json_object(extra, "export the model again").get("n_future_tokens", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
      raise ConvertError(f"{extra}: n_future_tokens={n!r} must be a positive integer")
    arch.n_extra_heads = n - 1
  return arch


def _json_object(path: Path, fix: str) -> dict:
  try:
    value = json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise ConvertError(f"{path} is not JSON ({e}); {fix}")
  if not isinstance(value, dict):
    raise ConvertError(f"{path} is not a JSON object; {fix}")
  return value


def load_tokenizer(directory: Path, arch: Arch):
  """tokenizer.json (preferred: what fast tokenizers load) or tokenizer.model, with the config's BOS/EOS."""
  from mtp_jax import tokenizer as tokenizer_lib
  tj, sp = directory / "tokenizer.json", directory / "tokenizer.model"
  if tj.exists():
    if arch.bos_id is None or arch.eos_id is None:
      raise ConvertError(f"{directory}/config.json sets no bos_token_id / eos_token_id, which {tj.name} needs "
                         f"beside it; add them to config.json")
    try:
      tok = tokenizer_lib.HFTokenizer(tj.read_bytes(), arch.bos_id, arch.eos_id, origin=str(tj))
    except Exception as e:
      raise ConvertError(f"{tj} is not a tokenizers file ({str(e).splitlines()[0][:160]})")
  elif sp.exists():
    try:
      tok = tokenizer_lib.SentencePieceTokenizer(sp.read_bytes(), origin=str(sp))
    except RuntimeError:
      raise ConvertError(f"{sp} is not a sentencepiece model")
  else:
    raise ConvertError(f"{directory} has no tokenizer.json or tokenizer.model; copy the model's tokenizer files "
                       f"into it")
  check_vocab(tok, arch, str(tok.origin))
  return tok


def _ignorable(arch: Arch):
  # Old checkpoints store the rotary table as a buffer (computed from the config here), and some tied
  # models keep a copy of the embedding as lm_head.weight.
  return lambda k: k.endswith("rotary_emb.inv_freq") or (arch.tie_embeddings and k == "lm_head.weight")


def read(directory, n_future: Optional[int] = None, head_init: str = "copy", param_dtype: str = "float32",
         seed: int = 0, head_type: str = "parallel"):
  """(config, numpy params, tokenizer) of a Hugging Face directory with n_future heads (default: what it holds)."""
  directory = Path(directory)
  if not directory.is_dir():
    raise ConvertError(f"--from={directory}: no such directory")
  arch = read_config(directory)
  n_ckpt = 1 + arch.n_extra_heads
  n_future = n_ckpt if n_future is None else n_future
  if n_future < n_ckpt:
    raise ConvertError(f"--n_future={n_future} but {directory} holds {n_ckpt} heads; pass at least {n_ckpt}")
  tok = load_tokenizer(directory, arch)
  sources = [safetensors_in(directory, SINGLE, INDEX)]
  if arch.n_extra_heads:
    sources.append(TensorFiles([directory / EXTRA_HEADS]))
  config = model_config(arch, n_future, param_dtype, head_type)
  if tok.kind == "huggingface":
    config.data.tokenizer = "huggingface"
  params = build_params(arch, config, sources, meta=False, head_init=head_init, seed=seed,
                        ignorable=_ignorable(arch), layers_field=f"config.json's num_hidden_layers={arch.n_layers}",
                        heads_field=f"params.json's n_future_tokens={n_ckpt}")
  return config, params, tok
