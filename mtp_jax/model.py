"""The MTP transformer: a Llama-style trunk feeding n head layers through one shared norm and unembedding.

Parameters are a plain pytree:
    embed/embedding            [V, d]
    trunk/layers/...           every trunk leaf stacked on a leading layer axis (one nn.scan)
    heads_0 .. heads_{n-1}     one separate subtree per head (never stacked, never vmapped)
    final_norm/scale, unembed/kernel [d, V] (absent when embeddings are tied)

Every method is pure, and takes an optional KV cache so decoding reuses these very layers.
Attention masking is by positions (key position <= query position) and, in training, by segment
ids (documents packed in one window never attend to each other).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtp_jax import attention

Array = jax.Array
# A layer's KV cache: (keys, values), each [batch, n_kv_heads, max_len, head_dim]. The trunk's and
# the heads' caches are each stacked on a leading layer axis. `cache_index` [batch] says where each row writes next.
KVCache = tuple[Array, Array]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_REMAT = {"full": jax.checkpoint_policies.nothing_saveable,
          "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


@dataclasses.dataclass(frozen=True)
class ModelArgs:
  """The hashable, typed view of `config.model` that modules hold."""
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  d_ff: int
  max_seq_len: int
  rope_theta: float
  norm_eps: float
  n_future: int
  head_type: str
  parity: bool
  tie_embeddings: bool
  dtype: Any
  param_dtype: Any
  remat: str
  attention: str = "auto"      # attention.py: auto | xla | blockwise | cudnn | splash

  @classmethod
  def from_config(cls, model_cfg) -> "ModelArgs":
    # A field with a default may be missing from an older run's config.json.
    kw = {f.name: model_cfg[f.name] for f in dataclasses.fields(cls)
          if f.name in model_cfg or f.default is dataclasses.MISSING}
    kw["dtype"], kw["param_dtype"] = _DTYPES[kw["dtype"]], _DTYPES[kw["param_dtype"]]
    return cls(**kw)

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def n_trunk_layers(self) -> int:
    # Parity: each transformer head is one of the n_layers layers. Linear heads are not layers.
    if self.parity and self.head_type != "linear":
      return self.n_layers - self.n_future
    return self.n_layers

  @property
  def heads_have_cache(self) -> bool:
    return self.head_type != "linear"


class Projection(nn.Module):
  """A bias-free linear map contracting the last `n_in` axes of x into `features` axes.

  The kernel is created at its full rank ([*in_dims, *features]) with logical axis names, so
  the sharding rules see every axis (DenseGeneral initialises a flattened 2-D kernel).
  """
  features: tuple
  axes: tuple
  n_in: int
  dtype: Any
  param_dtype: Any
  init: Any = None

  @nn.compact
  def __call__(self, x):
    shape = x.shape[x.ndim - self.n_in:] + self.features
    in_axes = tuple(range(self.n_in))
    init = self.init or nn.initializers.lecun_normal(in_axis=in_axes, out_axis=tuple(range(self.n_in, len(shape))))
    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes), shape, self.param_dtype)
    contract = (tuple(range(x.ndim - self.n_in, x.ndim)), in_axes)
    return jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))


def _dense(features, axes, args, name, n_in=1, init=None):
  features = features if isinstance(features, tuple) else (features,)
  return Projection(features, axes, n_in, args.dtype, args.param_dtype, init, name=name)


class RMSNorm(nn.Module):
  eps: float
  param_dtype: Any

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def rotary(x: Array, positions: Array, theta: float) -> Array:
  """Rotary embedding, Hugging Face Llama convention (rotate halves). x [B, T, H, D], positions [B, T]."""
  half = x.shape[-1] // 2
  freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions[..., None].astype(jnp.float32) * freqs          # [B, T, half]
  cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _write_rows(cache: Array, new: Array, index: Array) -> Array:
  """cache[b, :, index[b]:index[b]+k] = new[b]; each row writes at its own offset."""
  return jax.vmap(lambda c, u, i: jax.lax.dynamic_update_slice_in_dim(c, u, i, axis=1))(cache, new, index)


class Attention(nn.Module):
  args: ModelArgs

  @nn.compact
  def __call__(self, x, positions, segment_ids, cache: Optional[KVCache], cache_index, prefill=False):
    a = self.args
    b, t, _ = x.shape
    q = _dense((a.n_heads, a.head_dim), ("embed", "heads", "kv"), a, "q")(x)
    k = _dense((a.n_kv_heads, a.head_dim), ("embed", "kv_heads", "kv"), a, "k")(x)
    v = _dense((a.n_kv_heads, a.head_dim), ("embed", "kv_heads", "kv"), a, "v")(x)
    q, k = rotary(q, positions, a.rope_theta), rotary(k, positions, a.rope_theta)
    # Keys and values head-major [B, kv_heads, S, D]: the layout both attention products read
    # without a transpose, which matters for the cache (read whole at every decode step).
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)

    new_cache = None
    if cache is not None:  # decoding: write this block into the cache
      new_cache = (_write_rows(cache[0], k.astype(cache[0].dtype), cache_index),
                   _write_rows(cache[1], v.astype(cache[1].dtype), cache_index))
    if cache is None or prefill:
      # Keys are this block, documents kept apart: training, and a prefill (the cache held nothing
      # before the prompt, so attending to its max_len slots would only add masked-out work).
      k_pos, segments = positions, (segment_ids, segment_ids)
    else:                  # a decode step: attend to every cached slot up to our position
      k, v = new_cache[0].astype(a.dtype), new_cache[1].astype(a.dtype)
      k_pos = jnp.broadcast_to(jnp.arange(k.shape[2]), (b, k.shape[2]))   # stale slots lie past every query
      segments = (None, None)

    out = attention.attend(q, k, v, positions, k_pos, *segments, impl=a.attention,
                           self_attention=cache is None or prefill)
    out = _dense(a.d_model, ("heads", "kv", "embed"), a, "o", n_in=2)(out)
    return out, new_cache


class Block(nn.Module):
  """Pre-norm Llama layer: x + attn(norm(x)), then x + SwiGLU(norm(x))."""
  args: ModelArgs

  @nn.compact
  def __call__(self, x, positions, segment_ids, cache=None, cache_index=None, prefill=False):
    a = self.args
    x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
    h, new_cache = Attention(a, name="attn")(RMSNorm(a.norm_eps, a.param_dtype, name="attn_norm")(x),
                                             positions, segment_ids, cache, cache_index, prefill)
    x = x + h
    y = RMSNorm(a.norm_eps, a.param_dtype, name="mlp_norm")(x)
    gate = _dense(a.d_ff, ("embed", "mlp"), a, "gate")(y)
    up = _dense(a.d_ff, ("embed", "mlp"), a, "up")(y)
    hidden = nn.with_logical_constraint(nn.silu(gate) * up, ("act_batch", "act_length", "act_mlp"))
    x = x + _dense(a.d_model, ("mlp", "embed"), a, "down")(hidden)
    return x, new_cache


class LinearHead(nn.Module):
  """The paper's linear head: one d x d map (identity at init, so every head starts from z)."""
  args: ModelArgs

  @nn.compact
  def __call__(self, x, positions, segment_ids, cache=None, cache_index=None, prefill=False):
    a = self.args
    eye = lambda key, shape, dtype: jnp.eye(*shape, dtype=dtype)
    return _dense(a.d_model, ("embed", "mlp"), a, "proj", init=eye)(x), None


class _TrunkLayer(nn.Module):
  """One trunk layer in the (carry, xs) -> (carry, ys) form that nn.scan wants; the cache is xs/ys."""
  args: ModelArgs

  @nn.compact
  def __call__(self, x, layer_cache, positions, segment_ids, cache_index):
    block = Block
    if self.args.remat != "none":
      block = nn.remat(Block, policy=_REMAT[self.args.remat], prevent_cse=False)
    return block(self.args, name="layer")(x, positions, segment_ids, layer_cache, cache_index)


class MTPTransformer(nn.Module):
  args: ModelArgs

  def setup(self):
    a = self.args
    self.embed = nn.Embed(a.vocab_size, a.d_model, dtype=a.dtype, param_dtype=a.param_dtype,
                          embedding_init=nn.with_logical_partitioning(
                              nn.initializers.normal(a.d_model ** -0.5), ("vocab", "embed")))
    if a.n_trunk_layers:
      self.trunk = nn.scan(_TrunkLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                           in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=a.n_trunk_layers,
                           metadata_params={nn.PARTITION_NAME: "layers"})(a)
    head_cls = LinearHead if a.head_type == "linear" else Block
    self.heads = [head_cls(a) for _ in range(a.n_future)]   # separate subtrees heads_0 .. heads_{n-1}
    self.final_norm = RMSNorm(a.norm_eps, a.param_dtype)
    if not a.tie_embeddings:
      self.unembed = _dense(a.vocab_size, ("embed", "vocab"), a, "unembed")

  def embed_tokens(self, tokens):
    return self.embed(tokens)

  def run_trunk(self, tokens, positions, segment_ids, cache=None, cache_index=None):
    """tokens [B, T] -> trunk output z [B, T, d] (and the trunk's updated KV cache)."""
    z = self.embed(tokens)
    if not self.args.n_trunk_layers:
      return z, cache
    return self.trunk(z, cache, positions, segment_ids, cache_index)

  def run_head(self, i: int, z, prev, positions, segment_ids, cache=None, cache_index=None):
    """Head i's layer (0-based: head i predicts token t+i+1). Causal heads read head i-1's output."""
    x = prev if (self.args.head_type == "causal" and i > 0) else z
    return self.heads[i](x, positions, segment_ids, cache, cache_index)

  def logits(self, h):
    """The shared final norm and unembedding: hidden [..., d] -> logits [..., V]."""
    h = self.final_norm(h)
    out = self.embed.attend(h) if self.args.tie_embeddings else self.unembed(h)
    return nn.with_logical_constraint(out, ("act_batch", "act_length", "act_vocab"))

  def __call__(self, tokens, positions=None, segment_ids=None, cache=None, cache_index=None):
    """Every head's logits [n, B, T, V] (the plain reference forward, also used by decoding)."""
    positions, segment_ids = default_positions(tokens, positions, segment_ids)
    z, trunk_cache = self.run_trunk(tokens, positions, segment_ids, cache and cache["trunk"], cache_index)
    outs, head_caches, h = [], [], z
    for i in range(self.args.n_future):   # n is a small static number; the loss uses a scan instead
      c = None if cache is None else jax.tree.map(lambda x: x[i], cache["heads"])
      h, c = self.run_head(i, z, h, positions, segment_ids, c, cache_index)
      outs.append(self.logits(h))
      head_caches.append(c)
    new_cache = None
    if cache is not None:
      new_cache = {"trunk": trunk_cache, "heads": jax.tree.map(lambda *xs: jnp.stack(xs), *head_caches)}
    return jnp.stack(outs), new_cache


def default_positions(tokens, positions=None, segment_ids=None):
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  if segment_ids is None:
    segment_ids = jnp.ones_like(tokens)
  return positions, segment_ids


def init_cache(args: ModelArgs, batch: int, max_len: int, n_heads: Optional[int] = None, dtype=None) -> dict:
  """Zeroed KV caches: every trunk layer stacked, and the first n_heads heads (default all) stacked.

  Heads share one stacked cache so that decoding can run parallel heads as one batched layer.
  """
  dtype = dtype or args.dtype
  n_heads = args.n_future if n_heads is None else n_heads
  shape = (batch, args.n_kv_heads, max_len, args.head_dim)
  layers = lambda n: (jnp.zeros((n,) + shape, dtype), jnp.zeros((n,) + shape, dtype))
  return {"trunk": layers(args.n_trunk_layers) if args.n_trunk_layers else None,
          "heads": layers(n_heads) if args.heads_have_cache else None}


def build_model(model_cfg) -> MTPTransformer:
  """The model of `config.model`; refuses an attention implementation this backend lacks, before any compile."""
  args = ModelArgs.from_config(model_cfg)
  attention.check_available(args.attention)
  return MTPTransformer(args)


def init_params(model: MTPTransformer, rng, seq_len: int = 8):
  """Plain (unboxed) parameters; see `abstract_params` for shapes and logical axes without allocation."""
  return nn.unbox(model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"])


def abstract_params(model: MTPTransformer, seq_len: int = 8):
  """(ShapeDtypeStruct pytree, logical PartitionSpec pytree) without allocating any parameter."""
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, seq_len), jnp.int32))["params"])
  return nn.unbox(boxed), nn.get_partition_spec(boxed)
