"""Meta's MTP release layout (Gloeckle et al.'s 7B models) -> an mtp_jax workdir.

A directory with params.json, consolidated.pth (or consolidated.safetensors: the same keys, readable
without torch) and tokenizer.model. params.json's n_layers is the total depth: `layers.0..L-n`
hold the trunk and head 1 (its last), `extra_heads.0..n-2` heads 2..n, n = n_future_tokens.
Meta rotates interleaved pairs; mapping.py reorders q and k rows into our rotate-half layout.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from mtp_jax.interop.assemble import Arch, build_params, check_vocab, model_config
from mtp_jax.interop.tensors import ConvertError, TensorFiles, TorchFile

PARAMS = "params.json"


def ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
  """Meta's SwiGLU width rule (llama/model.py FeedForward)."""
  hidden = int(2 * (4 * dim) / 3)
  if ffn_dim_multiplier is not None:
    hidden = int(ffn_dim_multiplier * hidden)
  return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def arch_from_params(p: dict, where: str, vocab_size: Optional[int] = None) -> Arch:
  if not isinstance(p, dict):
    raise ConvertError(f"{where} is not a JSON object")
  for field in ("dim", "n_heads", "n_kv_heads", "n_layers", "n_future_tokens", "hidden_dim", "multiple_of",
                "max_seq_len"):
    v = p.get(field)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
      raise ConvertError(f"{where}: {field}={v!r} must be a positive integer")
  if int(p.get("n_future_tokens", 1)) > int(p.get("n_layers", 1)):
    raise ConvertError(f"{where}: n_future_tokens={p['n_future_tokens']} exceeds n_layers={p['n_layers']} (the "
                       f"total depth, head layers included)")
  try:
    dim, n_heads = int(p["dim"]), int(p["n_heads"])
    n_future = int(p.get("n_future_tokens", 1))
    d_ff = int(p["hidden_dim"]) if "hidden_dim" in p else ffn_dim(dim, int(p.get("multiple_of", 256)),
                                                                    p.get("ffn_dim_multiplier"))
    vocab = int(p["vocab_size"]) if int(p.get("vocab_size", -1)) > 0 else vocab_size
    scaling = None
    if p.get("use_scaled_rope"):   # Llama 3.1's fixed rule
      scaling = {"factor": float(p.get("rope_scale_factor", 8.0)), "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_len": 8192}
    return Arch(vocab_size=vocab, d_model=dim, n_layers=int(p["n_layers"]) - n_future + 1, n_heads=n_heads,
                n_kv_heads=int(p.get("n_kv_heads") or n_heads), d_ff=d_ff, norm_eps=float(p.get("norm_eps", 1e-5)),
                rope_theta=float(p.get("rope_theta", 10000.0)), max_seq_len=int(p.get("max_seq_len", 2048)),
                tie_embeddings=False, rope_scaling=scaling, n_extra_heads=n_future - 1)
  except KeyError as e:
    raise ConvertError(f"{where} lacks the field {e.args[0]}")


def read(directory, n_future: Optional[int] = None, head_init: str = "copy", param_dtype: str = "float32",
         seed: int = 0, head_type: str = "parallel"):
  """(config, numpy params, tokenizer) of a Meta-layout directory with n_future heads (default: what it holds)."""
  from mtp_jax import tokenizer as tokenizer_lib
  directory = Path(directory)
  where = directory / PARAMS
  try:
    p = json.loads(where.read_text())
  except ValueError as e:
    raise ConvertError(f"{where} is not JSON ({e})")
  shards = sorted(directory.glob("consolidated.*.pth"))
  if len(shards) > 1:
    raise ConvertError(f"{directory} holds {len(shards)} model-parallel shards ({shards[0].name}, ...); merge "
                       f"them into one consolidated.pth first")
  if (directory / "consolidated.safetensors").exists():
    src = TensorFiles([directory / "consolidated.safetensors"])
  elif (directory / "consolidated.pth").exists() or shards:
    src = TorchFile(shards[0] if shards else directory / "consolidated.pth")
  else:
    raise ConvertError(f"{directory} has params.json but no consolidated.pth or consolidated.safetensors")
  vocab = src.shapes.get("tok_embeddings.weight", (None,))[0]
  arch = arch_from_params(p, str(where), vocab)
  n_ckpt = 1 + arch.n_extra_heads
  n_future = n_ckpt if n_future is None else n_future
  if n_future < n_ckpt:
    raise ConvertError(f"--n_future={n_future} but {directory} holds {n_ckpt} heads; pass at least {n_ckpt}")
  sp = directory / "tokenizer.model"
  if not sp.exists():
    raise ConvertError(f"{directory} has no tokenizer.model; copy the model's tokenizer into it")
  try:
    tok = tokenizer_lib.SentencePieceTokenizer(sp.read_bytes(), origin=str(sp))
  except RuntimeError:
    raise ConvertError(f"{sp} is not a sentencepiece model (Llama 3's tiktoken files are not supported)")
  check_vocab(tok, arch, str(sp))
  config = model_config(arch, n_future, param_dtype, head_type)
  layers = f"params.json's n_layers={p['n_layers']} with n_future_tokens={n_ckpt}"
  params = build_params(arch, config, [src], meta=True, head_init=head_init, seed=seed, layers_field=layers,
                        heads_field=f"params.json's n_future_tokens={n_ckpt}")
  return config, params, tok
