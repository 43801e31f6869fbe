"""The MTP transformer: a Llama-style trunk feeding n head layers through one shared norm and unembedding.

Parameters are a plain pytree:
    embed/embedding            [V, d]
    trunk/layer/...            every trunk leaf stacked on a leading layer axis (one nn.scan), e.g.
                               trunk/layer/attn/q/kernel [L_trunk, d, n_heads, head_dim]
    heads_0 .. heads_{n-1}     one separate subtree per head (never stacked, never vmapped)
    final_norm/scale, unembed/kernel [d, V] (absent when embeddings are tied)

Head topologies (`HEAD_TYPES`) are one table of classes and traits; the loss scan and the decode
loop read the traits, never the name. `sequential` is DeepSeek-V3's MTP modules (`MTPModule`):
head 0 is the main model's last layer, heads_k (k = 1..n-1) is module k with the Hugging Face
DeepSeek-V3 / GLM-4.5 names `enorm`, `hnorm`, `eh_proj`, `layer` (a Block, named as the trunk's)
and `shared_head/norm`.

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

from mtp_jax import attention, row_products
from mtp_jax.lean_ops import rms_norm, rms_norm_lean, swiglu_project

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
  # Llama 3.x frequency scaling: (factor, low_freq_factor, high_freq_factor, original_max_len), or None.
  rope_scaling: Optional[tuple] = None
  attention: str = "auto"      # attention.py: auto | xla | blockwise | cudnn | splash

  @classmethod
  def from_config(cls, model_cfg) -> "ModelArgs":
    # A field with a default may be missing from an older run's config.json.
    kw = {f.name: model_cfg[f.name] for f in dataclasses.fields(cls)
          if f.name != "rope_scaling" and (f.name in model_cfg or f.default is dataclasses.MISSING)}
    kw["dtype"], kw["param_dtype"] = _DTYPES[kw["dtype"]], _DTYPES[kw["param_dtype"]]
    rs = model_cfg.get("rope_scaling")   # absent in configs written before the field existed
    if rs and rs["type"] == "llama3":
      kw["rope_scaling"] = (float(rs["factor"]), float(rs["low_freq_factor"]), float(rs["high_freq_factor"]),
                            float(rs["original_max_len"]))
    return cls(**kw)

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def heads(self) -> "HeadType":
    return HEAD_TYPES[self.head_type]

  @property
  def n_trunk_layers(self) -> int:
    # Parity: each transformer head (and each sequential module's layer) is one of the n_layers
    # layers. Linear heads are not layers.
    if self.parity and self.heads.is_layer:
      return self.n_layers - self.n_future
    return self.n_layers

  @property
  def heads_have_cache(self) -> bool:
    return self.heads.is_layer


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
  swiglu_input: bool = False   # x is (gate, up): project silu(gate) * up (lean_ops.swiglu_project)

  @nn.compact
  def __call__(self, x):
    if self.swiglu_input:
      gate, up = x
      x = gate
    shape = x.shape[x.ndim - self.n_in:] + self.features
    in_axes = tuple(range(self.n_in))
    init = self.init or nn.initializers.lecun_normal(in_axis=in_axes, out_axis=tuple(range(self.n_in, len(shape))))
    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes), shape, self.param_dtype)
    if self.swiglu_input:
      return swiglu_project(gate.astype(self.dtype), up.astype(self.dtype), kernel.astype(self.dtype))
    return row_products.project(x.astype(self.dtype), kernel.astype(self.dtype), self.n_in)


def _dense(features, axes, args, name, n_in=1, init=None, swiglu_input=False):
  features = features if isinstance(features, tuple) else (features,)
  return Projection(features, axes, n_in, args.dtype, args.param_dtype, init, swiglu_input, name=name)


class RMSNorm(nn.Module):
  eps: float
  param_dtype: Any
  lean: bool = False   # a hand-written backward that keeps x and 1/rms (lean_ops.py): for layers not rematerialised

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), self.param_dtype)
    return (rms_norm_lean if self.lean else rms_norm)(x, scale, self.eps)


def rope_frequencies(head_dim: int, theta: float, scaling: Optional[tuple] = None) -> Array:
  """Inverse frequencies [head_dim // 2]; `scaling` applies Llama 3.x's rule exactly as transformers does.

  Llama 3: wavelengths longer than original_max_len / low_freq_factor are slowed by `factor`, shorter
  than original_max_len / high_freq_factor kept, and the band between interpolated smoothly.
  """
  half = head_dim // 2
  freqs = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
  if scaling is None:
    return freqs
  factor, low, high, old_len = scaling
  wavelen = 2 * jnp.pi / freqs
  scaled = jnp.where(wavelen > old_len / low, freqs / factor, freqs)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
  return jnp.where(medium, smoothed, scaled)


def rotary(x: Array, positions: Array, theta: float, scaling: Optional[tuple] = None) -> Array:
  """Rotary embedding, Hugging Face Llama convention (rotate halves). x [B, T, H, D], positions [B, T]."""
  freqs = rope_frequencies(x.shape[-1], theta, scaling)
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
  def __call__(self, x, positions, segment_ids, cache: Optional[KVCache], cache_index, prefill=False, tree=None):
    a = self.args
    b, t, _ = x.shape
    q = _dense((a.n_heads, a.head_dim), ("embed", "heads", "kv"), a, "q")(x)
    k = _dense((a.n_kv_heads, a.head_dim), ("embed", "kv_heads", "kv"), a, "k")(x)
    v = _dense((a.n_kv_heads, a.head_dim), ("embed", "kv_heads", "kv"), a, "v")(x)
    q, k = rotary(q, positions, a.rope_theta, a.rope_scaling), rotary(k, positions, a.rope_theta, a.rope_scaling)
    # Keys and values head-major [B, kv_heads, S, D]: the layout both attention products read
    # without a transpose, which matters for the cache (read at every decode step).
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)

    new_cache = None
    if cache is not None:  # decoding: write this block into the cache
      new_cache = (_write_rows(cache[0], k.astype(cache[0].dtype), cache_index),
                   _write_rows(cache[1], v.astype(cache[1].dtype), cache_index))
    if cache is None or prefill:
      # Keys are this block, documents kept apart: training, and a prefill (the cache held nothing
      # before the prompt, so attending to its max_len slots would only add masked-out work).
      out = attention.attend(q, k, v, positions, positions, segment_ids, segment_ids, impl=a.attention)
    else:                  # a decode step: the cached slots up to our position (stale ones lie past it)
      out = attention.attend_cache(q, new_cache[0], new_cache[1], positions, impl=a.attention, tree=tree)
    out = _dense(a.d_model, ("heads", "kv", "embed"), a, "o", n_in=2)(out)
    return out, new_cache


class Block(nn.Module):
  """Pre-norm Llama layer: x + attn(norm(x)), then x + SwiGLU(norm(x))."""
  args: ModelArgs

  @nn.compact
  def __call__(self, x, positions, segment_ids, cache=None, cache_index=None, prefill=False, tree=None):
    """tree: decoding a tree of candidates (`attention.attend_cache`)."""
    a = self.args
    x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
    lean = a.remat == "none"
    h, new_cache = Attention(a, name="attn")(RMSNorm(a.norm_eps, a.param_dtype, lean, name="attn_norm")(x),
                                             positions, segment_ids, cache, cache_index, prefill, tree)
    x = x + h
    y = RMSNorm(a.norm_eps, a.param_dtype, lean, name="mlp_norm")(x)
    gate, up = (nn.with_logical_constraint(_dense(a.d_ff, ("embed", "mlp"), a, name)(y),
                                           ("act_batch", "act_length", "act_mlp")) for name in ("gate", "up"))
    # down(silu(gate) * up) as one op that keeps gate and up for its backward, not their product (lean_ops.py)
    x = x + _dense(a.d_model, ("mlp", "embed"), a, "down", swiglu_input=True)((gate, up))
    return x, new_cache


class LinearHead(nn.Module):
  """The paper's linear head: one d x d map (identity at init, so every head starts from z)."""
  args: ModelArgs

  @nn.compact
  def __call__(self, x, positions, segment_ids, cache=None, cache_index=None, prefill=False, tree=None):
    a = self.args
    eye = lambda key, shape, dtype: jnp.eye(*shape, dtype=dtype)
    return _dense(a.d_model, ("embed", "mlp"), a, "proj", init=eye)(x), None


class _SharedHead(nn.Module):
  """A module's own output norm, HF `shared_head.norm` (the unembedding, HF `shared_head.head`, is the model's)."""
  args: ModelArgs

  @nn.compact
  def __call__(self, h):
    return RMSNorm(self.args.norm_eps, self.args.param_dtype, name="norm")(h)


class MTPModule(nn.Module):
  """DeepSeek-V3 MTP module k (technical report section 2.2), one transformer layer deep:

      h'_t = eh_proj([enorm(Emb(x_{t+k})); hnorm(h^{k-1}_t)]),   h^k_t = Block(h')_t

  and its logits are unembed(shared_head.norm(h^k_t)), predicting x_{t+k+1}. The concatenation is
  [embedding; hidden], the order of the released checkpoints' `eh_proj` ([d, 2d] in HF: its first d
  input columns read the embedding; DeepSeek's and vLLM's code concatenate so), although the
  report's equation (21) writes [hidden; embedding]. The carry h^k is taken before the norm.
  """
  args: ModelArgs

  def setup(self):
    a = self.args
    self.enorm = RMSNorm(a.norm_eps, a.param_dtype)
    self.hnorm = RMSNorm(a.norm_eps, a.param_dtype)
    self.eh_proj = Projection((a.d_model,), ("mlp", "embed"), 1, a.dtype, a.param_dtype)
    self.layer = Block(a)
    self.shared_head = _SharedHead(a)

  def __call__(self, prev, ahead_emb, positions, segment_ids, cache=None, cache_index=None, prefill=False):
    # Pin the activations' layout: left to itself, the partitioner lays out the embedding gather
    # so that the train step's forward is wrong on a data x fsdp x tensor mesh (2, 2, 2).
    act = lambda x: nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
    x = jnp.concatenate([self.enorm(act(ahead_emb)), self.hnorm(act(prev)).astype(ahead_emb.dtype)], axis=-1)
    return self.layer(act(self.eh_proj(act(x))), positions, segment_ids, cache, cache_index, prefill)

  def output_norm(self, h):
    return self.shared_head(h)


@dataclasses.dataclass(frozen=True)
class HeadType:
  """What the loss scan and the decode loop need to know of a head topology."""
  first: type          # head 0's class (it predicts t+1)
  rest: type           # the class of heads 1..n-1
  chained: bool        # head i reads head i-1's hidden state: the loss scan carries it
  reads_ahead: bool    # head i also reads Emb(x_{t+i}): it drafts only after verification, in turn
  is_layer: bool       # a transformer layer: has a KV cache and takes a layer under parity


HEAD_TYPES = {
    "parallel": HeadType(Block, Block, chained=False, reads_ahead=False, is_layer=True),
    "causal": HeadType(Block, Block, chained=True, reads_ahead=False, is_layer=True),
    "linear": HeadType(LinearHead, LinearHead, chained=False, reads_ahead=False, is_layer=False),
    "sequential": HeadType(Block, MTPModule, chained=True, reads_ahead=True, is_layer=True),
}


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
    ht = a.heads
    self.heads = [(ht.rest if i else ht.first)(a) for i in range(a.n_future)]   # subtrees heads_0 .. heads_{n-1}
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

  def run_head(self, i: int, z, prev, positions, segment_ids, cache=None, cache_index=None, ahead=None,
               prefill=False):
    """Head i's layer (0-based: head i predicts token t+i+1) on trunk output z [B, T, d].

    Chained heads (i > 0) read prev, head i-1's output; heads that read ahead (sequential modules)
    also read ahead [B, T], the tokens x_{t+i}.
    """
    ht = self.args.heads
    x = prev if (ht.chained and i > 0) else z
    if ht.reads_ahead and i > 0:
      return self.heads[i](x, self.embed(ahead), positions, segment_ids, cache, cache_index, prefill)
    return self.heads[i](x, positions, segment_ids, cache, cache_index, prefill)

  def output_norm(self, i: int, h):
    """Head i's norm before the unembedding: the shared final norm, or a sequential module's own."""
    if self.args.heads.reads_ahead and i > 0:
      return self.heads[i].output_norm(h)
    return self.final_norm(h)

  def unembed_normed(self, h):
    """The shared unembedding of normed hidden states [..., d] -> logits [..., V]."""
    out = self.embed.attend(h) if self.args.tie_embeddings else self.unembed(h)
    return nn.with_logical_constraint(out, ("act_batch", "act_length", "act_vocab"))

  def logits(self, h, i: int = 0):
    """Head i's norm and the shared unembedding: hidden [..., d] -> logits [..., V]."""
    return self.unembed_normed(self.output_norm(i, h))

  def __call__(self, tokens, positions=None, segment_ids=None, cache=None, cache_index=None, lookahead=None):
    """Every head's logits [n, B, T, V] (the plain reference forward, also used by decoding).

    lookahead [B, n-1]: the tokens after `tokens`, read by sequential modules near the end (module
    i at position t reads x_{t+i}); default 0, which only ever feeds predictions of targets past the end.
    """
    positions, segment_ids = default_positions(tokens, positions, segment_ids)
    z, trunk_cache = self.run_trunk(tokens, positions, segment_ids, cache and cache["trunk"], cache_index)
    n, t = self.args.n_future, tokens.shape[1]
    if lookahead is None:
      lookahead = jnp.zeros((tokens.shape[0], n - 1), tokens.dtype)
    extended = jnp.concatenate([tokens, lookahead.astype(tokens.dtype)], axis=1)
    outs, head_caches, h = [], [], z
    for i in range(n):   # n is a small static number; the loss uses a scan instead
      c = None if cache is None else jax.tree.map(lambda x: x[i], cache["heads"])
      h, c = self.run_head(i, z, h, positions, segment_ids, c, cache_index, ahead=extended[:, i:i + t])
      outs.append(self.logits(h, i))
      head_caches.append(c)
    new_cache = None
    if cache is not None:
      new_cache = {"trunk": trunk_cache, "heads": jax.tree.map(lambda *xs: jnp.stack(xs), *head_caches)}
    return jnp.stack(outs), new_cache


def unembedding_rows(args: ModelArgs, params, ids):
  """The unembedding's rows [N, d] of token ids [N]: what a head's logits over those tokens only read
  (a draft vocabulary)."""
  return params["embed"]["embedding"][ids] if args.tie_embeddings else params["unembed"]["kernel"][:, ids].T


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


def shard_params(params, model: MTPTransformer, mesh, config):
  """Place parameters on the mesh as training lays them out (for decoding or evaluation on a mesh)."""
  from mtp_jax import sharding
  _, logical = abstract_params(model)
  return jax.device_put(params, sharding.logical_to_shardings(logical, mesh, config))
