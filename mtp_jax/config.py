"""Every config field in one place, with its default, and the checks that run before any compile.

Recipes in configs/*.py start from `base_config()` and change what they need; a field that is not
here does not exist (configs are locked, so `--config.train.stpes=5` fails).
"""
from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import ml_collections

HEAD_TYPES = ("parallel", "causal", "linear", "sequential")
LOSS_IMPLS = ("scan", "naive")
REMAT_POLICIES = ("none", "full", "dots")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("auto", "xla", "blockwise", "cudnn", "splash")   # mtp_jax/attention.py

# The mesh's axes (sharding.py builds the mesh; attention.py shards its kernels over them).
MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (logical name, mesh axes): the default of config.mesh.rules. Parameter names first, then activation
# names (prefixed act_).
DEFAULT_RULES = (
    ("vocab", "tensor"), ("embed", "fsdp"), ("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"),
    ("kv", None), ("layers", None), ("norm", None),
    ("act_batch", BATCH_AXES), ("act_length", None), ("act_embed", None), ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


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
  m.head_type = "parallel"     # parallel | causal | linear | sequential (DeepSeek-V3 MTP modules)
  m.parity = True              # trunk = n_layers - n_future layers, so params match n=1
  m.tie_embeddings = False
  m.dtype = "float32"          # compute dtype
  m.param_dtype = "float32"
  m.remat = "none"             # trunk layers: none | full | dots
  # RoPE frequency scaling: type none | llama3 (Llama 3.1+, the same formula as transformers)
  m.rope_scaling = ml_collections.ConfigDict(dict(
      type="none", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_len=8192))
  m.attention = "auto"         # auto | xla | blockwise | cudnn (GPU) | splash (TPU); see attention.py

  c.loss = l = ml_collections.ConfigDict()
  l.impl = "scan"              # scan (one head's logits alive at a time) | naive (reference)
  l.chunk_size = -1            # cross-entropy over sequence chunks of this many positions; 0: none;
                               # -1: automatic (whole sequence unless a head's logits pass 64 MiB)
  l.head_weights = "uniform"   # uniform | geometric:R | comma list such as "1,0.5,0.5,0.5"
  # Sequential MTP modules (model.head_type="sequential", D = n_future - 1 modules):
  # L = L_main + lambda / D * sum_k L_k. A number, or a schedule "value@fraction,..." of train.steps,
  # piecewise constant from each fraction on; DeepSeek-V3 trained with 0.3, then 0.1: "0.3@0,0.1@0.7".
  l.mtp_lambda = "0.3"

  c.data = d = ml_collections.ConfigDict()
  # --- corpus (corpora.py) and prepared shards (prepare.py / prepared.py); paths may be gs:// URLs
  d.source = "stdlib"          # stdlib | glob | jsonl | parquet | hf_disk | prepared
  d.path = ""                  # glob / .jsonl[.gz|.zst] / .parquet (file or glob) / save_to_disk dir / prepare output
  d.text_field = "text"        # JSONL field / Parquet or Arrow column holding the text
  d.prepare_shards = 16        # prepare.py: ArrayRecord shards per split
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
  # Which parameters train: all | heads (heads 2..n; trunk, head 1, norm and embeddings frozen, as in
  # Medusa-1) | a regex matched against whole parameter paths such as "heads_[1-9].*|final_norm/.*".
  # Frozen parameters hold no optimizer state.
  t.trainable = "all"
  # "a:b": a jax.profiler trace of steps a..b (inclusive) in W/plugins/profile, for TensorBoard's profile tab or
  # Perfetto; "" = none. Start a few steps in, past compilation and warm-up.
  t.profile_steps = ""

  c.mesh = ms = ml_collections.ConfigDict()
  ms.data = -1                 # -1 = all devices left over by the other axes
  ms.fsdp = 1
  ms.tensor = 1
  # Logical axis -> mesh axes (None = replicated); see sharding.py. Override only to experiment.
  ms.rules = DEFAULT_RULES
  return c


def load(spec: str) -> ml_collections.ConfigDict:
  """A recipe by name or path, with an optional variant: "default:n1", "configs/default.py:n1".

  Names are the recipe files: configs/<name>.py of a clone, installed as `mtp_jax.recipes`. The
  result is locked like the CLI's config (a mistyped field fails) and validated.
  """
  path, _, variant = recipe_file(spec).partition(":")
  path = Path(path)
  module_spec = importlib.util.spec_from_file_location(f"mtp_jax_recipe_{path.stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  try:
    config = module.get_config(variant or None)
  except ValueError as e:   # the recipes' own message for an unknown variant
    raise ConfigError(str(e))
  config.lock()
  validate(config)
  return config


def recipe_file(spec: str) -> str:
  """The file (and variant) a recipe spec names: "tiny:bytes" -> "<recipes>/tiny.py:bytes".

  A name is an installed recipe; a path (it ends in .py or holds a /) is a file. A clone's path such as
  configs/tiny.py that does not exist where the command runs (a pip install used from another directory)
  is the installed recipe of that name, so a clone's commands work after `pip install` too.
  """
  target, sep, variant = spec.partition(":")
  known = f"known recipes: {', '.join(recipe_names())}"
  if target.endswith(".py") or "/" in target:
    path = Path(target).expanduser()
    if not path.is_file() and path.parent.name == "configs" and path.stem in recipe_names():
      path = recipe_dir() / path.name
    if not path.is_file():
      raise ConfigError(f"recipe {spec!r}: no file {path}; give a recipe file or a recipe name ({known})")
  elif target in recipe_names():
    path = recipe_dir() / f"{target}.py"
  else:
    raise ConfigError(f"recipe {spec!r}: no recipe named {target!r}; {known} (or give a recipe file's path)")
  return f"{path}{sep}{variant}"


def resolve_config_flag(argv: list[str]) -> list[str]:
  """argv with `--config=NAME[:variant]` (or `--config NAME`) replaced by the recipe file it names, for
  ml_collections' DEFINE_config_file, which takes only paths. Raises ConfigError for an unknown name."""
  out, i = list(argv), 1
  while i < len(out):
    a = out[i]
    if a in ("--config", "-config") and i + 1 < len(out):
      out[i + 1] = recipe_file(out[i + 1])
      i += 1
    elif a.startswith(("--config=", "-config=")):
      flag, _, value = a.partition("=")
      out[i] = f"{flag}={recipe_file(value)}"
    elif a == "--":
      break
    i += 1
  return out


def parse_cli_flags(argv: list[str], config_flag, known_only: bool = False) -> list[str]:
  """absl's flag parsing for a command with a `--config` recipe flag, every mistake one UserError line.

  `--config=NAME[:variant]` is resolved first (an unknown name lists the known ones); the recipe loads
  here, not lazily later, so a missing or broken one fails now. A mistake in `--config...` names those
  flags; any other (`--dryrun` for `--dry_run`) is absl's own line, with its suggestion.
  """
  from absl import flags
  argv = resolve_config_flag(argv)
  try:
    rest = flags.FLAGS(argv, known_only=known_only)
    if config_flag.value is not None:
      config_flag.value.keys()
    return rest
  except (flags.Error, OSError, AttributeError, KeyError, TypeError, ValueError) as e:
    lines = [line.strip() for line in str(e).replace("\\n", "\n").splitlines() if line.strip()]
    detail = " ".join(lines[-3:] if isinstance(e, OSError) else lines[-1:]).strip("'\"") or type(e).__name__
    about_config = "config" in str(getattr(e, "flagname", None) or (lines[0] if lines else ""))
    if isinstance(e, flags.Error) and not about_config:
      raise UserError(detail)
    bad = [a.split("=")[0] for a in argv[1:] if a.startswith(("--config", "-config"))]
    raise UserError(f"cannot apply {' '.join(bad) or 'the flags'}: {detail}")


def recipe_dir() -> Path:
  """Where the recipes are: the installed mtp_jax.recipes, else the clone's top-level configs/."""
  installed = Path(__file__).parent / "recipes"
  return installed if installed.is_dir() else Path(__file__).parents[1] / "configs"


def recipe_names() -> list[str]:
  return sorted(p.stem for p in recipe_dir().glob("*.py") if not p.stem.startswith("_"))


def head_weights(spec: str, n: int) -> list[float]:
  """Parse `loss.head_weights` into n non-negative weights (normalised later by their sum)."""
  if spec == "uniform":
    return [1.0] * n
  if spec.startswith("geometric:"):
    try:
      r = float(spec.split(":", 1)[1])
    except ValueError:
      raise ConfigError(f"loss.head_weights={spec!r}: expected geometric:R with a number R, e.g. geometric:0.5")
    if not 0 < r < math.inf or not all(math.isfinite(r ** i) and r ** i > 0 for i in range(n)):
      raise ConfigError(f"loss.head_weights={spec!r}: the ratio must be a finite number > 0 (and r**{n - 1} "
                        f"representable)")
    return [r ** i for i in range(n)]
  try:
    w = [float(x) for x in spec.split(",")]
  except ValueError:
    raise ConfigError(f"loss.head_weights={spec!r}: use 'uniform', 'geometric:R' or a comma list of {n} numbers")
  if len(w) != n:
    raise ConfigError(f"loss.head_weights has {len(w)} weights but model.n_future={n}; give one per head")
  if not all(math.isfinite(x) for x in w) or min(w) < 0 or not 0 < sum(w) < math.inf:
    raise ConfigError(f"loss.head_weights={spec!r}: weights must be finite, >= 0, with a positive sum")
  return w


def _finite(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


HEADS_REGEX = r"heads_[1-9][0-9]*/.*"   # heads 2..n (heads_0 is head 1, the next-token head)


def trainable_regex(spec: str) -> str:
  """`train.trainable` as one regex over whole parameter paths ('' = everything trains)."""
  import re
  if spec == "all":
    return ""
  if spec == "heads":
    return HEADS_REGEX
  try:
    re.compile(spec)
  except re.error as e:
    raise ConfigError(f"train.trainable={spec!r} is not a regex ({e}); use all, heads or a regex over "
                      f"parameter paths such as 'heads_[1-9].*'")
  return spec


def profile_range(spec: str) -> tuple[int, int] | None:
  """Parse `train.profile_steps` ("a:b", 1 <= a <= b) into (a, b); None for ""."""
  spec = str(spec).strip()
  if not spec:
    return None
  first, sep, last = spec.partition(":")
  try:
    a, b = int(first), int(last if sep else first)
  except ValueError:
    a = b = 0
  if not 1 <= a <= b:
    raise ConfigError(f"train.profile_steps={spec!r}: give first:last steps, 1 <= first <= last, such as 10:15 "
                      f"(or '' for no profile)")
  return a, b


def mtp_lambda_schedule(spec: str) -> tuple[list[float], list[float]]:
  """Parse `loss.mtp_lambda` into (values, start fractions of train.steps); the first start is 0."""
  spec = str(spec).strip()
  fix = "use a number >= 0 such as 0.3, or value@fraction pairs from 0 up, such as 0.3@0,0.1@0.7"
  values, starts = [], []
  for part in spec.split(","):
    value, _, start = part.partition("@")
    try:
      values.append(float(value))
      starts.append(float(start) if start else 0.0)
    except ValueError:
      raise ConfigError(f"loss.mtp_lambda={spec!r} does not parse; {fix}")
  if len(values) > 1 and "@" not in spec.split(",")[-1]:
    raise ConfigError(f"loss.mtp_lambda={spec!r}: every entry of a schedule needs @fraction; {fix}")
  if min(values) < 0 or not all(v == v and v != float("inf") for v in values):
    raise ConfigError(f"loss.mtp_lambda={spec!r}: lambda must be a finite number >= 0; {fix}")
  if starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])) or starts[-1] >= 1:
    raise ConfigError(f"loss.mtp_lambda={spec!r}: the fractions must start at 0, increase, and stay below 1; {fix}")
  return values, starts


def mtp_lambda_at(values, starts, step, total_steps: int, xp=None):
  """The scheduled lambda at `step` (xp=jax.numpy for a traced step; plain numbers otherwise)."""
  bounds = [round(f * total_steps) for f in starts]
  if xp is None:
    return values[sum(step >= b for b in bounds) - 1]
  return xp.asarray(values, xp.float32)[xp.sum(step >= xp.asarray(bounds)) - 1]


def loss_weights(c: ml_collections.ConfigDict, step=0, xp=None):
  """Per-head weights whose plain dot with the per-head losses is the total loss, at `step`.

  Parallel / causal / linear heads: loss.head_weights normalised to sum 1 (the paper's average).
  Sequential modules: [1, lambda/D, ..., lambda/D] (DeepSeek-V3: the main loss plus lambda times
  the modules' mean), lambda scheduled by loss.mtp_lambda.
  """
  n = c.model.n_future
  if c.model.head_type != "sequential":
    w = head_weights(c.loss.head_weights, n)
    w = [x / sum(w) for x in w]
    return w if xp is None else xp.asarray(w, xp.float32)
  values, starts = mtp_lambda_schedule(c.loss.mtp_lambda)
  lam = mtp_lambda_at(values, starts, step, c.train.steps, xp)
  if xp is None:
    return [1.0] + [lam / (n - 1)] * (n - 1)
  return xp.concatenate([xp.ones((1,), xp.float32), xp.full((n - 1,), lam / (n - 1), xp.float32)])


def validate(c: ml_collections.ConfigDict) -> None:
  """Raise ConfigError for the first field that cannot work. Cheap: no JAX, no compile.

  Every field of base_config() has a check here (tests/test_faults.py walks them all)."""
  _need(isinstance(c.seed, int) and -2 ** 63 <= c.seed < 2 ** 63, f"seed={c.seed}: must fit a signed 64-bit integer")
  _check_model(c.model)
  _check_loss(c.loss, c.model, c.data)
  _check_train(c.train, c.model)
  _check_data(c.data)
  _check_mesh(c.mesh)


def _need(ok, msg: str) -> None:
  if not ok:
    raise ConfigError(msg)


def _check_model(m) -> None:
  for k in ("d_model", "d_ff", "max_seq_len"):
    _need(m[k] >= 1, f"model.{k}={m[k]}: must be >= 1")
  _need(_finite(m.rope_theta) and m.rope_theta > 0,
       f"model.rope_theta={m.rope_theta}: must be a finite number > 0 (10000 is usual)")
  _need(_finite(m.norm_eps) and 0 < m.norm_eps < 1, f"model.norm_eps={m.norm_eps}: must be in (0, 1) (1e-5 is usual)")
  _need(isinstance(m.parity, bool) and isinstance(m.tie_embeddings, bool),
       "model.parity and model.tie_embeddings are True or False")

  _need(m.n_future >= 1, f"model.n_future={m.n_future}: need at least 1 head (1 = plain next-token model)")
  _need(m.head_type in HEAD_TYPES, f"model.head_type={m.head_type!r}: choose one of {', '.join(HEAD_TYPES)}")
  _need(m.n_layers >= 1, f"model.n_layers={m.n_layers}: need at least 1 layer")
  _need(m.d_model >= 1 and m.n_heads >= 1, "model.d_model and model.n_heads must be positive")
  _need(m.d_model % m.n_heads == 0,
       f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; pick d_model a multiple of n_heads")
  _need((m.d_model // m.n_heads) % 2 == 0,
       f"head size d_model/n_heads={m.d_model // m.n_heads} must be even for rotary embeddings")
  _need(m.n_kv_heads >= 1 and m.n_heads % m.n_kv_heads == 0,
       f"model.n_kv_heads={m.n_kv_heads} does not divide model.n_heads={m.n_heads}; use a divisor of n_heads")
  if m.parity and m.head_type != "linear":
    _need(m.n_future <= m.n_layers,
         f"model.parity with n_future={m.n_future} > n_layers={m.n_layers}: each head takes one of the "
         f"n_layers layers; raise model.n_layers or set model.parity=False")
  _need(2 <= m.vocab_size < 2 ** 31, f"model.vocab_size={m.vocab_size}: must be in [2, 2**31)")
  _need(m.dtype in DTYPES and m.param_dtype in DTYPES,
       f"model.dtype={m.dtype!r}, model.param_dtype={m.param_dtype!r}: choose from {', '.join(DTYPES)}")
  rs = m.rope_scaling
  _need(rs.type in ("none", "llama3"), f"model.rope_scaling.type={rs.type!r}: choose none or llama3")
  if rs.type == "llama3":
    for k in ("factor", "low_freq_factor", "original_max_len"):
      _need(_finite(rs[k]) and rs[k] > 0, f"model.rope_scaling.{k}={rs[k]}: must be > 0 (llama3 scaling)")
    _need(_finite(rs.high_freq_factor) and rs.high_freq_factor > rs.low_freq_factor,
         f"model.rope_scaling.high_freq_factor={rs.high_freq_factor}: must exceed low_freq_factor="
         f"{rs.low_freq_factor} (llama3 scaling)")
  _need(m.remat in REMAT_POLICIES, f"model.remat={m.remat!r}: choose one of {', '.join(REMAT_POLICIES)}")
  _need(m.attention in ATTENTION_IMPLS,
       f"model.attention={m.attention!r}: choose one of {', '.join(ATTENTION_IMPLS)}")


def _check_loss(l, m, d) -> None:
  _need(l.impl in LOSS_IMPLS, f"loss.impl={l.impl!r}: choose one of {', '.join(LOSS_IMPLS)}")
  _need(l.chunk_size >= -1, f"loss.chunk_size={l.chunk_size}: must be >= -1 (0 = no chunking, -1 = automatic)")
  _need(d.seq_len >= 1, f"data.seq_len={d.seq_len}: must be positive")
  _need(d.seq_len <= m.max_seq_len, f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
  if l.chunk_size > 0:
    _need(d.seq_len % l.chunk_size == 0,
         f"loss.chunk_size={l.chunk_size} does not divide data.seq_len={d.seq_len}; pick a divisor")
  head_weights(l.head_weights, m.n_future)
  if m.head_type == "sequential":
    _need(m.n_future >= 2, f"model.head_type='sequential' with model.n_future={m.n_future}: D = n_future - 1 MTP "
                          f"modules must be >= 1; set model.n_future >= 2")
    _need(l.head_weights == "uniform", f"loss.head_weights={l.head_weights!r} with model.head_type='sequential': "
                                      f"modules are weighted by loss.mtp_lambda; leave head_weights='uniform'")
    mtp_lambda_schedule(l.mtp_lambda)


def _check_train(t, m) -> None:
  _need(t.steps >= 1, f"train.steps={t.steps}: must be >= 1")
  _need(t.batch_size >= 1, f"train.batch_size={t.batch_size}: must be >= 1")
  _need(_finite(t.learning_rate) and t.learning_rate > 0, f"train.learning_rate={t.learning_rate}: must be a finite "
       f"number > 0")
  _need(0 <= t.warmup_steps, f"train.warmup_steps={t.warmup_steps}: must be >= 0")
  _need(_finite(t.min_lr_ratio) and 0 <= t.min_lr_ratio <= 1,
       f"train.min_lr_ratio={t.min_lr_ratio}: must be in [0, 1] (the final learning rate over the peak)")
  _need(_finite(t.weight_decay) and t.weight_decay >= 0, f"train.weight_decay={t.weight_decay}: must be >= 0")
  for k in ("b1", "b2"):
    _need(_finite(t[k]) and 0 <= t[k] < 1, f"train.{k}={t[k]}: Adam's decay rates must be in [0, 1)")
  _need(_finite(t.grad_clip) and t.grad_clip > 0,
       f"train.grad_clip={t.grad_clip}: must be a finite global-norm bound > 0 (1.0 is usual)")
  for k in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "eval_batches"):
    _need(t[k] >= 1, f"train.{k}={t[k]}: must be >= 1")
  trainable_regex(t.trainable)
  profile_range(t.profile_steps)
  _need(t.trainable != "heads" or m.n_future >= 2,
       "train.trainable=heads trains heads 2..n but model.n_future=1; add heads (model.n_future) or use "
       "train.trainable=all")


def _check_data(d) -> None:
  sources = ("stdlib", "glob", "jsonl", "parquet", "hf_disk", "prepared")
  _need(d.source in sources, f"data.source={d.source!r}: choose one of {', '.join(sources)}")
  _need(d.source == "stdlib" or d.path, f"data.source={d.source!r} needs data.path (a local path or a gs:// URL: "
       f"a glob, a .jsonl/.parquet file, a save_to_disk directory, or a prepare output directory)")
  _need(d.prepare_shards >= 1, f"data.prepare_shards={d.prepare_shards}: must be >= 1")
  _need(0 < d.valid_fraction < 1, f"data.valid_fraction={d.valid_fraction}: must be between 0 and 1")
  _need(isinstance(d.text_field, str) and d.text_field.strip(), "data.text_field: name the JSONL field holding the "
       "text (default 'text')")
  _need(isinstance(d.tokenizer, str) and d.tokenizer.strip(),
       "data.tokenizer: give 'sentencepiece', 'bytes' or the path of a .model file")
  _need(isinstance(d.cache_dir, str) and not os.path.isfile(os.path.expanduser(d.cache_dir)),
       f"data.cache_dir={d.cache_dir!r}: must be a directory (new or existing), or '' for ~/.cache/mtp_jax")
  _need(d.max_train_bytes >= 0, f"data.max_train_bytes={d.max_train_bytes}: must be >= 0 (0 = the whole corpus)")


def _check_mesh(mesh) -> None:
  axes = tuple(k for k in mesh if k != "rules")
  for ax in axes:
    _need(mesh[ax] == -1 or mesh[ax] >= 1, f"mesh.{ax}={mesh[ax]}: use a positive size or -1 (the rest)")
  for rule in mesh.rules:
    ok = isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
    targets = () if not ok or rule[1] is None else (rule[1],) if isinstance(rule[1], str) else rule[1]
    _need(ok and isinstance(targets, (tuple, list)) and all(a in axes for a in targets),
         f"mesh.rules entry {rule!r}: each rule is (logical axis name, mesh axis, a tuple of them, or None) with "
         f"mesh axes from {', '.join(axes)}")
