"""Every config field in one place, with its default, and the checks that run before any compile.

Recipes in configs/*.py start from `base_config()` and change what they need; a field that is not
here does not exist (configs are locked, so `--config.train.stpes=5` fails).
"""
from __future__ import annotations

import ml_collections

HEAD_TYPES = ("parallel", "causal", "linear")
LOSS_IMPLS = ("scan", "naive")
REMAT_POLICIES = ("none", "full", "dots")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("auto", "xla", "blockwise", "cudnn", "splash")   # mtp_jax/attention.py


from mtp_jax.errors import UserError


class ConfigError(UserError, ValueError):
  """A config that cannot work; the message names the field and the fix."""


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = m = ml_collections.ConfigDict()
  m.vocab_size = 4096          # must equal the tokenizer's vocabulary size
  m.d_model = 256
  m.n_layers = 6               # total depth L (trunk + one layer per head under parity)
  m.n_heads = 8                # attention heads
  m.n_kv_heads = 4             # grouped-query attention: must divide n_heads
  m.d_ff = 704                 # SwiGLU hidden size
  m.max_seq_len = 2048         # longest sequence decoding may reach (RoPE has no table to size)
  m.rope_theta = 10000.0
  m.norm_eps = 1e-5
  m.n_future = 4               # n: head i predicts token t+i
  m.head_type = "parallel"     # parallel | causal | linear
  m.parity = True              # trunk = n_layers - n_future layers, so params match n=1
  m.tie_embeddings = False
  m.dtype = "float32"          # compute dtype
  m.param_dtype = "float32"
  m.remat = "none"             # trunk layers: none | full | dots
  m.attention = "auto"         # auto | xla | blockwise | cudnn (GPU) | splash (TPU); see attention.py

  c.loss = l = ml_collections.ConfigDict()
  l.impl = "scan"              # scan (one head's logits alive at a time) | naive (reference)
  l.chunk_size = 0             # >0: cross-entropy over sequence chunks of this many positions; 0: none; -1: auto
  l.head_weights = "uniform"   # uniform | geometric:R | comma list such as "1,0.5,0.5,0.5"

  c.data = d = ml_collections.ConfigDict()
  d.source = "stdlib"          # stdlib | glob | jsonl
  d.path = ""                  # glob pattern or .jsonl file for source=glob/jsonl
  d.text_field = "text"        # JSONL field holding the text
  d.valid_fraction = 0.05      # share of whole files held out for validation
  d.tokenizer = "sentencepiece"  # sentencepiece | bytes | path to a .model file
  d.seq_len = 256              # positions scored per window (windows hold seq_len + n_future)
  d.cache_dir = ""             # tokenizer and token cache; default: ~/.cache/mtp_jax
  d.max_train_bytes = 0        # 0 = whole corpus; else cap (for fast tests)

  c.train = t = ml_collections.ConfigDict()
  t.steps = 1000
  t.batch_size = 16
  t.learning_rate = 1e-3
  t.warmup_steps = 100
  t.min_lr_ratio = 0.1         # cosine decays to learning_rate * min_lr_ratio
  t.weight_decay = 0.1
  t.b1 = 0.9
  t.b2 = 0.95
  t.grad_clip = 1.0
  t.log_every = 50
  t.eval_every = 250
  t.eval_batches = 16
  t.checkpoint_every = 250
  t.keep_checkpoints = 3

  c.mesh = ms = ml_collections.ConfigDict()
  ms.data = -1                 # -1 = all devices left over by the other axes
  ms.fsdp = 1
  ms.tensor = 1
  # Logical axis -> mesh axes (None = replicated); see sharding.py. Override only to experiment.
  from mtp_jax.sharding import DEFAULT_RULES
  ms.rules = DEFAULT_RULES
  return c


def head_weights(spec: str, n: int) -> list[float]:
  """Parse `loss.head_weights` into n non-negative weights (normalised later by their sum)."""
  if spec == "uniform":
    return [1.0] * n
  if spec.startswith("geometric:"):
    try:
      r = float(spec.split(":", 1)[1])
    except ValueError:
      raise ConfigError(f"loss.head_weights={spec!r}: expected geometric:R with a number R, e.g. geometric:0.5")
    if r <= 0:
      raise ConfigError(f"loss.head_weights={spec!r}: the ratio must be > 0")
    return [r ** i for i in range(n)]
  try:
    w = [float(x) for x in spec.split(",")]
  except ValueError:
    raise ConfigError(f"loss.head_weights={spec!r}: use 'uniform', 'geometric:R' or a comma list of {n} numbers")
  if len(w) != n:
    raise ConfigError(f"loss.head_weights has {len(w)} weights but model.n_future={n}; give one per head")
  if min(w) < 0 or sum(w) <= 0:
    raise ConfigError(f"loss.head_weights={spec!r}: weights must be >= 0 with a positive sum")
  return w


def validate(c: ml_collections.ConfigDict) -> None:
  """Raise ConfigError for the first field that cannot work. Cheap: no JAX, no compile."""
  m, l, t, d = c.model, c.loss, c.train, c.data

  def need(ok, msg):
    if not ok:
      raise ConfigError(msg)

  need(m.n_future >= 1, f"model.n_future={m.n_future}: need at least 1 head (1 = plain next-token model)")
  need(m.head_type in HEAD_TYPES, f"model.head_type={m.head_type!r}: choose one of {', '.join(HEAD_TYPES)}")
  need(m.n_layers >= 1, f"model.n_layers={m.n_layers}: need at least 1 layer")
  need(m.d_model >= 1 and m.n_heads >= 1, "model.d_model and model.n_heads must be positive")
  need(m.d_model % m.n_heads == 0,
       f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; pick d_model a multiple of n_heads")
  need((m.d_model // m.n_heads) % 2 == 0,
       f"head size d_model/n_heads={m.d_model // m.n_heads} must be even for rotary embeddings")
  need(m.n_kv_heads >= 1 and m.n_heads % m.n_kv_heads == 0,
       f"model.n_kv_heads={m.n_kv_heads} does not divide model.n_heads={m.n_heads}; use a divisor of n_heads")
  if m.parity and m.head_type != "linear":
    need(m.n_future <= m.n_layers,
         f"model.parity with n_future={m.n_future} > n_layers={m.n_layers}: each head takes one of the "
         f"n_layers layers; raise model.n_layers or set model.parity=False")
  need(m.vocab_size >= 2, f"model.vocab_size={m.vocab_size}: too small")
  need(m.dtype in DTYPES and m.param_dtype in DTYPES,
       f"model.dtype={m.dtype!r}, model.param_dtype={m.param_dtype!r}: choose from {', '.join(DTYPES)}")
  need(m.remat in REMAT_POLICIES, f"model.remat={m.remat!r}: choose one of {', '.join(REMAT_POLICIES)}")
  need(m.attention in ATTENTION_IMPLS,
       f"model.attention={m.attention!r}: choose one of {', '.join(ATTENTION_IMPLS)}")
  need(l.impl in LOSS_IMPLS, f"loss.impl={l.impl!r}: choose one of {', '.join(LOSS_IMPLS)}")
  need(l.chunk_size >= -1, f"loss.chunk_size={l.chunk_size}: must be >= -1 (0 = no chunking, -1 = automatic)")
  need(d.seq_len >= 1, f"data.seq_len={d.seq_len}: must be positive")
  need(d.seq_len <= m.max_seq_len, f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
  if l.chunk_size > 0:
    need(d.seq_len % l.chunk_size == 0,
         f"loss.chunk_size={l.chunk_size} does not divide data.seq_len={d.seq_len}; pick a divisor")
  head_weights(l.head_weights, m.n_future)
  need(t.steps >= 1, f"train.steps={t.steps}: must be >= 1")
  need(t.batch_size >= 1, f"train.batch_size={t.batch_size}: must be >= 1")
  need(t.learning_rate > 0, f"train.learning_rate={t.learning_rate}: must be > 0")
  need(0 <= t.warmup_steps, f"train.warmup_steps={t.warmup_steps}: must be >= 0")
  for k in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "eval_batches"):
    need(t[k] >= 1, f"train.{k}={t[k]}: must be >= 1")
  need(d.source in ("stdlib", "glob", "jsonl"), f"data.source={d.source!r}: choose stdlib, glob or jsonl")
  need(d.source == "stdlib" or d.path, f"data.source={d.source!r} needs data.path (a glob or a .jsonl file)")
  need(0 < d.valid_fraction < 1, f"data.valid_fraction={d.valid_fraction}: must be between 0 and 1")
  for ax in ("data", "fsdp", "tensor"):
    need(c.mesh[ax] == -1 or c.mesh[ax] >= 1, f"mesh.{ax}={c.mesh[ax]}: use a positive size or -1 (the rest)")
