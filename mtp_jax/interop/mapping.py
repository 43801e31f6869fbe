"""The name tables: Hugging Face and Meta checkpoint keys <-> our parameter paths, transposes spelled out.

One transformer layer (a trunk layer or a head) in our tree (model.Block):

    ours                 shape             Hugging Face (LlamaForCausalLM)      Meta (llama / MTP release)
    attn_norm/scale      [d]               input_layernorm.weight [d]           attention_norm.weight
    attn/q/kernel        [d, H, Dh]        self_attn.q_proj.weight [H*Dh, d]    attention.wq.weight (*)
    attn/k/kernel        [d, KV, Dh]       self_attn.k_proj.weight [KV*Dh, d]   attention.wk.weight (*)
    attn/v/kernel        [d, KV, Dh]       self_attn.v_proj.weight [KV*Dh, d]   attention.wv.weight
    attn/o/kernel        [H, Dh, d]        self_attn.o_proj.weight [d, H*Dh]    attention.wo.weight
    mlp_norm/scale       [d]               post_attention_layernorm.weight      ffn_norm.weight
    gate/kernel          [d, F]            mlp.gate_proj.weight [F, d]          feed_forward.w1.weight
    up/kernel            [d, F]            mlp.up_proj.weight [F, d]            feed_forward.w3.weight
    down/kernel          [F, d]            mlp.down_proj.weight [d, F]          feed_forward.w2.weight

A torch Linear weight is [out, in]; our kernels are [in, ..., out], so every matrix is transposed, then
its flat H*Dh side split into (heads, head_dim). (*) Meta rotates interleaved pairs (x0, x1), (x2, x3), ...;
we and Hugging Face rotate halves (x_i, x_{i+Dh/2}). The same attention results when q's and k's rows
are reordered within each head: Meta row 2i -> row i, row 2i+1 -> row i + Dh/2 (transformers'
convert_llama_weights_to_hf.py `permute`, applied here before the transpose).

Outside the layers: embed/embedding [V, d] = model.embed_tokens.weight = tok_embeddings.weight (no
transpose: both are lookup tables); final_norm/scale = model.norm.weight = norm.weight;
unembed/kernel [d, V] = lm_head.weight.T = output.weight.T (absent when embeddings are tied).
"""
from __future__ import annotations

import numpy as np

# (our path inside a layer, Hugging Face suffix, Meta suffix, kind)
LAYER_TABLE = (
    ("attn_norm/scale", "input_layernorm.weight", "attention_norm.weight", "vector"),
    ("attn/q/kernel", "self_attn.q_proj.weight", "attention.wq.weight", "q"),
    ("attn/k/kernel", "self_attn.k_proj.weight", "attention.wk.weight", "kv_rotated"),
    ("attn/v/kernel", "self_attn.v_proj.weight", "attention.wv.weight", "kv"),
    ("attn/o/kernel", "self_attn.o_proj.weight", "attention.wo.weight", "o"),
    ("mlp_norm/scale", "post_attention_layernorm.weight", "ffn_norm.weight", "vector"),
    ("gate/kernel", "mlp.gate_proj.weight", "feed_forward.w1.weight", "matrix"),
    ("up/kernel", "mlp.up_proj.weight", "feed_forward.w3.weight", "matrix"),
    ("down/kernel", "mlp.down_proj.weight", "feed_forward.w2.weight", "matrix"),
)
# (our path, Hugging Face key, Meta key, kind)
TOP_TABLE = (
    ("embed/embedding", "model.embed_tokens.weight", "tok_embeddings.weight", "table"),
    ("final_norm/scale", "model.norm.weight", "norm.weight", "vector"),
    ("unembed/kernel", "lm_head.weight", "output.weight", "matrix"),
)
HF_LAYER_PREFIX = "model.layers."


def meta_to_halves(w, n_heads: int):
  """Meta's interleaved rotary rows -> rotate-half rows, per head: [H*Dh, d] -> [H*Dh, d]."""
  out_dim, d = w.shape
  dh = out_dim // n_heads
  return w.reshape(n_heads, dh // 2, 2, d).transpose(0, 2, 1, 3).reshape(out_dim, d)


def halves_to_meta(w, n_heads: int):
  out_dim, d = w.shape
  dh = out_dim // n_heads
  return w.reshape(n_heads, 2, dh // 2, d).transpose(0, 2, 1, 3).reshape(out_dim, d)


def checkpoint_shape(path: str, dims) -> tuple:
  """The checkpoint's [out, in] shape of the tensor for our `path`. dims: (V, d, H, KV, Dh, F)."""
  v, d, h, kv, dh, f = dims
  return {"attn_norm/scale": (d,), "mlp_norm/scale": (d,), "final_norm/scale": (d,),
          "attn/q/kernel": (h * dh, d), "attn/k/kernel": (kv * dh, d), "attn/v/kernel": (kv * dh, d),
          "attn/o/kernel": (d, h * dh), "gate/kernel": (f, d), "up/kernel": (f, d), "down/kernel": (d, f),
          "embed/embedding": (v, d), "unembed/kernel": (v, d)}[path]


def to_ours(w, kind: str, dims, meta: bool):
  """One checkpoint tensor (numpy, [out, in]) -> our leaf."""
  v, d, h, kv, dh, f = dims
  if kind in ("vector", "table"):
    return w
  if meta and kind in ("q", "kv_rotated"):
    w = meta_to_halves(w, h if kind == "q" else kv)
  w = w.T
  if kind == "q":
    return w.reshape(d, h, dh)
  if kind in ("kv", "kv_rotated"):
    return w.reshape(d, kv, dh)
  if kind == "o":
    return w.reshape(h, dh, d)
  return w   # matrix


def from_ours(x, kind: str, dims, meta: bool):
  """Our leaf (numpy) -> the checkpoint's [out, in] tensor; the exact inverse of `to_ours`."""
  v, d, h, kv, dh, f = dims
  if kind in ("vector", "table"):
    return x
  if kind in ("q", "kv", "kv_rotated"):
    w = x.reshape(d, -1).T
  elif kind == "o":
    w = x.reshape(h * dh, d).T
  else:
    w = x.T
  if meta and kind in ("q", "kv_rotated"):
    w = halves_to_meta(w, h if kind == "q" else kv)
  return np.ascontiguousarray(w)
