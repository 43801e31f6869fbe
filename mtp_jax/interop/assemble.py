"""A checkpoint's architecture -> our config, and its tensors -> our parameter tree, by the tables in mapping.py.

Layout: a checkpoint of L layers (Hugging Face: `model.layers.0..L-1`; Meta: `layers.0..L-1`) is the
n=1 model, trunk = its first L-1 layers and head 1 = its last; Meta's `extra_heads.0..k-1` (also what
our export writes beside a Hugging Face directory) are heads 2..k+1. Asking for more heads adds them,
each a copy of head 1 (`copy`, a warm start) or freshly initialised (`random`).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from mtp_jax.config import base_config, validate
from mtp_jax.interop import mapping
from mtp_jax.interop.tensors import ConvertError, numpy_dtype


@dataclasses.dataclass
class Arch:
  """What a checkpoint's config says, in our terms."""
  vocab_size: int
  d_model: int
  n_layers: int            # layers in the checkpoint's `layers.*` (trunk + head 1)
  n_heads: int
  n_kv_heads: int
  d_ff: int
  norm_eps: float
  rope_theta: float
  max_seq_len: int
  tie_embeddings: bool
  rope_scaling: Optional[dict] = None   # llama3: factor, low_freq_factor, high_freq_factor, original_max_len
  n_extra_heads: int = 0   # `extra_heads.*` in the checkpoint
  bos_id: Optional[int] = None
  eos_id: Optional[int] = None

  @property
  def dims(self):
    dh = self.d_model // self.n_heads
    return (self.vocab_size, self.d_model, self.n_heads, self.n_kv_heads, dh, self.d_ff)


def model_config(arch: Arch, n_future: int, param_dtype: str = "float32", head_type: str = "parallel"):
  """Our full config for the checkpoint with n_future heads of head_type (data and train fields stay at their
  defaults)."""
  c = base_config()
  m = c.model
  m.vocab_size, m.d_model, m.n_heads, m.n_kv_heads = arch.vocab_size, arch.d_model, arch.n_heads, arch.n_kv_heads
  m.d_ff, m.norm_eps, m.rope_theta, m.max_seq_len = arch.d_ff, arch.norm_eps, arch.rope_theta, arch.max_seq_len
  m.n_future, m.head_type, m.parity = n_future, head_type, True
  m.n_layers = arch.n_layers - 1 + n_future       # parity: the trunk keeps the checkpoint's first L-1 layers
  m.tie_embeddings = arch.tie_embeddings
  m.param_dtype = param_dtype
  if arch.rope_scaling:
    m.rope_scaling.update(dict(type="llama3", **arch.rope_scaling))
  c.data.seq_len = min(c.data.seq_len, arch.max_seq_len)
  validate(c)
  return c


def expected_keys(arch: Arch, meta: bool) -> dict:
  """checkpoint key -> (destination, our path inside it, kind, Meta rotary order?).

  Destination: ('trunk', i), ('heads_j',) or () for the top level.
  """
  out = {}
  for path, hf_key, meta_key, kind in mapping.TOP_TABLE:
    if path == "unembed/kernel" and arch.tie_embeddings:
      continue
    out[meta_key if meta else hf_key] = ((), path, kind, meta)
  layer_prefix = "layers." if meta else mapping.HF_LAYER_PREFIX
  for i in range(arch.n_layers):
    dest = ("trunk", i) if i < arch.n_layers - 1 else ("heads_0",)
    for path, hf_suffix, meta_suffix, kind in mapping.LAYER_TABLE:
      out[f"{layer_prefix}{i}.{meta_suffix if meta else hf_suffix}"] = (dest, path, kind, meta)
  for j in range(arch.n_extra_heads):   # always Meta names (our export writes them so too)
    for path, _, meta_suffix, kind in mapping.LAYER_TABLE:
      out[f"extra_heads.{j}.{meta_suffix}"] = ((f"heads_{j + 1}",), path, kind, True)
  return out


def _first(names, n=3) -> str:
  names = sorted(names, key=lambda k: [int(p) if p.isdigit() else p for p in k.split(".")])
  return ", ".join(names[:n]) + (f" (and {len(names) - n} more)" if len(names) > n else "")


def check_keys(sources, expected: dict, ignorable=lambda k: False) -> None:
  """Refuse unexpected, missing or misshapen tensors by name, before reading any weights."""
  present = {}
  for src in sources:
    for k in src.keys():
      present[k] = src
  unexpected = [k for k in present if k not in expected and not ignorable(k)]
  if unexpected:
    raise ConvertError(f"the checkpoint has tensors this model has no place for: {_first(unexpected)}; "
                       f"mtp_jax converts bias-free Llama-architecture layers only")
  missing = [k for k in expected if k not in present]
  if missing:
    raise ConvertError(f"the checkpoint lacks tensors its config implies: {_first(missing)}; the download is "
                       f"incomplete or the config does not describe these weights")


def check_shapes(sources, expected: dict, dims) -> None:
  for src in sources:
    for k in src.keys():
      if k in expected:
        want = mapping.checkpoint_shape(expected[k][1], dims)
        if tuple(src.shapes[k]) != want:
          raise ConvertError(f"tensor {k} has shape {list(src.shapes[k])} but the config implies {list(want)}; "
                             f"the config.json does not match these weights")


def get_path(tree: dict, path: str):
  """tree['a']['b'] for path 'a/b'."""
  for p in path.split("/"):
    tree = tree[p]
  return tree


def check_depth(sources, arch: Arch, meta: bool, layers_field: str, heads_field: str) -> None:
  """Refuse weights with more layers (or extra heads) than the config says, naming the config's field."""
  for prefix, have, field in (("layers." if meta else mapping.HF_LAYER_PREFIX, arch.n_layers, layers_field),
                              ("extra_heads.", arch.n_extra_heads, heads_field)):
    found = [int(i) for src in sources for k in src.keys() if k.startswith(prefix)
             for i in [k[len(prefix):].split(".")[0]] if i.isdigit()]
    if found and max(found) >= have:
      raise ConvertError(f"the weights hold {max(found) + 1} {prefix}* ({prefix}0..{max(found)}) but {field} "
                         f"implies {have}: the config does not describe these weights (use the config that came "
                         f"with them)")


def _our_path(dest, path: str) -> str:
  if dest and dest[0] == "trunk":
    return f"trunk/layer/{path}[{dest[1]}]"
  return f"{dest[0]}/{path}" if dest else path


def _refuse_nonfinite(what: str, w, hint: str = "") -> None:
  bad = int(np.size(w) - np.count_nonzero(np.isfinite(w)))
  if bad:
    raise ConvertError(f"{what} holds {bad} NaN/inf value{'s' if bad > 1 else ''} (of {np.size(w)}): the "
                       f"checkpoint is damaged{hint}; nothing was written (download or export it again)")


def check_finite(params: dict) -> None:
  """Refuse a parameter tree with a NaN or inf anywhere, naming the first such leaf by our path."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    _refuse_nonfinite("parameter " + "/".join(str(getattr(p, "key", p)) for p in path), np.asarray(leaf))


def build_params(arch: Arch, config, sources, meta: bool, head_init: str = "copy", seed: int = 0,
                 ignorable=lambda k: False, layers_field: str = "the config's layer count",
                 heads_field: str = "the config's head count") -> dict:
  """Our parameter tree (numpy, config.model.param_dtype) from the checkpoint's tensors, file by file; a
  tensor holding NaN/inf is refused by its checkpoint key and our path."""
  from mtp_jax.model import abstract_params, build_model

  expected = expected_keys(arch, meta)
  check_depth(sources, arch, meta, layers_field, heads_field)
  check_keys(sources, expected, ignorable)
  check_shapes(sources, expected, arch.dims)
  dtype = numpy_dtype(config.model.param_dtype)
  overflow = (" or its values overflow float16 (import with --param_dtype=bfloat16)"
              if config.model.param_dtype == "float16" else "")   # checked after the cast
  model = build_model(config.model)
  abstract, _ = abstract_params(model)
  params = jax.tree.map(lambda a: np.empty(a.shape, dtype), abstract)
  n_ckpt_heads = 1 + arch.n_extra_heads
  if arch.n_extra_heads and config.model.head_type != "parallel":
    raise ConvertError(f"--head_type={config.model.head_type}: the checkpoint holds {arch.n_extra_heads} extra heads, "
                       f"which are parallel heads; import it with --head_type=parallel")
  for src in sources:
    keys = [k for k in src.keys() if k in expected]
    for key, w in src.items(keys, dtype):
      dest, path, kind, meta_order = expected[key]
      _refuse_nonfinite(f"tensor {key} (our {_our_path(dest, path)})", w, overflow)
      leaf = mapping.to_ours(w, kind, arch.dims, meta_order)
      target = get_path(params["trunk"]["layer"], path)[dest[1]] if dest and dest[0] == "trunk" else (
          get_path(params[dest[0]], path) if dest else get_path(params, path))
      target[...] = leaf
      del w, leaf
  scale = (_hidden_rms(model, params, range(n_ckpt_heads, config.model.n_future))
           if model.args.heads.reads_ahead and head_init == "copy" and config.model.n_future > n_ckpt_heads else 1.0)
  for j in range(n_ckpt_heads, config.model.n_future):
    key = jax.random.fold_in(jax.random.key(seed), j)
    layer = _new_layer(model, params["heads_0"], head_init, key, dtype)
    params[f"heads_{j}"] = (_new_module(model, layer, params["final_norm"], head_init, key, dtype, scale)
                            if model.args.heads.reads_ahead else layer)
  return params


# Token ids spread evenly over the vocabulary: a probe of the residual stream's scale that needs no text.
_PROBE_TOKENS = 64


def _hidden_rms(model, params: dict, unbuilt) -> float:
  """The median RMS of head 1's hidden state (what module 1 reads) over a probe of token ids; `unbuilt`: the
  indices of the heads not filled in yet.

  A pretrained residual stream is far from RMS 1 (SmolLM2-135M's: about 40). A module's norms put
  their input at RMS `scale`, so a copied layer reads the scale it was trained on; at scale 1 its own
  attention and MLP outputs swamp the carried state, and Adam moves a norm's scale by about the learning
  rate per step, far too slowly to recover it."""
  from mtp_jax.model import MTPTransformer, default_positions
  vocab = model.args.vocab_size
  tokens = jnp.asarray(np.linspace(0, vocab - 1, min(_PROBE_TOKENS, vocab)).astype(np.int32))[None]
  pos, seg = default_positions(tokens)
  skip = {f"heads_{j}" for j in unbuilt}            # the added heads' leaves are still uninitialised
  ready = {k: p for k, p in params.items() if k not in skip}
  variables = {"params": jax.tree.map(jnp.asarray, ready)}
  z, _ = model.apply(variables, tokens, pos, seg, method=MTPTransformer.run_trunk)
  h, _ = model.apply(variables, 0, z, None, pos, seg, method=MTPTransformer.run_head)
  return float(np.median(np.sqrt(np.mean(np.square(np.asarray(h, np.float32)), axis=-1))))


def _new_layer(model, head_1: dict, head_init: str, key, dtype) -> dict:
  if head_init == "copy":
    return copy.deepcopy(head_1)
  from flax import linen as nn
  from mtp_jax.model import Block
  x = jnp.zeros((1, 1, model.args.d_model), model.args.dtype)
  pos = jnp.zeros((1, 1), jnp.int32)
  fresh = nn.unbox(Block(model.args).init(key, x, pos, jnp.ones((1, 1), jnp.int32))["params"])
  return jax.tree.map(lambda a: np.asarray(a).astype(dtype), fresh)


def _new_module(model, layer: dict, final_norm: dict, head_init: str, key, dtype, scale: float = 1.0) -> dict:
  """A sequential (DeepSeek-V3) MTP module around `layer`. copy: eh_proj passes the hidden state through
  at its own scale (both norms' scales are `scale`, head 1's typical RMS) and reads nothing of the
  embedding yet (its half starts at zero; training opens it), and the module's output norm is the
  model's; random: eh_proj drawn as the model draws it, norms at one."""
  d = model.args.d_model
  ones = np.ones((d,), dtype)
  if head_init == "copy":
    eh = np.concatenate([np.zeros((d, d)), np.eye(d)]).astype(dtype)
    out_norm = np.asarray(final_norm["scale"]).astype(dtype).copy()
    in_norm = np.full((d,), scale, dtype)
  else:
    eh = np.asarray(jax.nn.initializers.lecun_normal()(key, (2 * d, d), jnp.float32)).astype(dtype)
    out_norm, in_norm = ones, ones
  return {"enorm": {"scale": in_norm}, "hnorm": {"scale": in_norm.copy()}, "eh_proj": {"kernel": eh},
          "layer": layer, "shared_head": {"norm": {"scale": out_norm}}}


def check_vocab(tok, arch: Arch, where: str) -> None:
  if tok.vocab_size != arch.vocab_size:
    raise ConvertError(f"{where} has {tok.vocab_size} ids but the model's vocabulary has {arch.vocab_size}; "
                       f"use the tokenizer that came with these weights")
