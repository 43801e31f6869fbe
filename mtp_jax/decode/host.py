"""The host side of decoding: a caller's options, checked once where they enter; prompts padded into fixed
shapes; the compiled programs, cached by their static settings and shapes.

Each entry checks what it is given once: the command line builds a `Request` from its flags before it loads
a model, generate() and `run` build one from their keywords, and `check_request` adds what needs the model
and the prompts. `execute` runs a checked request and checks nothing again.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from mtp_jax import row_products
from mtp_jax.decode.costs import clear_costs, step_costs
from mtp_jax.decode.forward import decode_weights
from mtp_jax.decode.loop import decode
from mtp_jax.decode.types import BEST_FIRST_TOP, MODES, DecodeError, SamplingParams, Settings, Tree
from mtp_jax.model import MTPTransformer, ModelArgs

MIN_TEMPERATURE = 1e-5   # as vLLM's sampling epsilon: sampling below it is argmax in effect, and far below
# it logits / temperature overflows float32 (temperature=1e-45 gave NaN probabilities, all token 0)
SPECULATIVE_MODES = ("speculative", "speculative_sample")
DRAFTS = ("chain", "auto", "tree", "bestfirst")
MAX_TREE_TOP = 32     # --tree_top: a head's choices (the candidate paths grow as top ** depths)
MAX_TREE_NODES = 256  # --tree_nodes: a verify step's tokens, past which no CPU or accelerator gains


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class Request:
  """A caller's decoding options, checked when built; `check_model` adds what needs the model.

  The sampling settings are checked in every mode: a value that cannot work is a mistake even where the mode
  does not use it. `flag` is how messages name a field: "" for keywords, "--" for command-line flags.
  """
  mode: str = "greedy"
  max_new_tokens: int = 64
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  draft_heads: Optional[int] = None   # speculative modes: the block k, 2..n_future (None: n_future)
  draft: Optional[str] = None   # speculative modes: chain, auto or tree (None: auto where the heads allow, `draft_kind`)
  tree_nodes: Optional[int] = None   # draft=tree / bestfirst: the tree's nodes (None: the static tree's count);
  # draft=auto (mode=speculative): the static tree of that many nodes is one more budget (0: chains only; None: the
  # whole static tree on an accelerator, chains only on a CPU, where no tree has paid: docs/decoding.md)
  tree_top: Optional[int] = None     # draft=bestfirst: each head's top choices a tree chooses among (None: 4)
  flag: str = dataclasses.field(default="", compare=False)

  def __post_init__(self):
    f = self.flag
    if self.mode not in MODES:
      raise DecodeError(f"{f}mode={self.mode!r}: choose one of {', '.join(MODES)}")
    if not _is_int(self.max_new_tokens) or self.max_new_tokens <= 0:
      raise DecodeError(f"{f}max_new_tokens={self.max_new_tokens}: must be a positive integer")
    # logits / temperature must stay finite in float32: below MIN_TEMPERATURE sampling is argmax anyway
    if not MIN_TEMPERATURE <= self.temperature < math.inf:
      use = "use mode=greedy for argmax" if self.sampling else f"{f}mode={self.mode} does not use it; leave it unset"
      raise DecodeError(f"{f}temperature={self.temperature}: must be a finite number >= {MIN_TEMPERATURE} ({use})")
    if not _is_int(self.top_k) or self.top_k < 0:
      raise DecodeError(f"{f}top_k={self.top_k}: must be an integer >= 0 (0 = off)")
    if not 0 < self.top_p <= 1:
      raise DecodeError(f"{f}top_p={self.top_p}: must be in (0, 1] (1 = off)")
    if self.draft_heads is not None and self.mode not in SPECULATIVE_MODES:
      raise DecodeError(f"{f}draft_heads={self.draft_heads} sets the speculative block, but {f}mode={self.mode} "
                        f"drafts nothing; use {f}mode=speculative or speculative_sample, or leave {f}draft_heads unset")
    if self.draft_heads is not None and not _is_int(self.draft_heads):
      raise DecodeError(f"{f}draft_heads={self.draft_heads!r}: must be an integer")
    if self.draft is not None and self.draft not in DRAFTS:
      raise DecodeError(f"{f}draft={self.draft!r}: choose one of {', '.join(DRAFTS)}")
    if self.draft is not None and self.mode not in SPECULATIVE_MODES:
      raise DecodeError(f"{f}draft={self.draft} chooses how speculative modes draft, but {f}mode={self.mode} drafts "
                        f"nothing; use {f}mode=speculative or speculative_sample, or leave {f}draft unset")

    for name, value, drafts in (("tree_nodes", self.tree_nodes, ("tree", "bestfirst", "auto")),
                                ("tree_top", self.tree_top, ("bestfirst",))):
      if value is None:
        continue
      if self.draft not in drafts:
        given = f"{f}draft is unset" if self.draft is None else f"{f}draft={self.draft}"
        raise DecodeError(f"{f}{name}={value} sizes a tree, but {given}: use "
                          f"{' or '.join(f'{f}draft={d}' for d in drafts)}, or leave {f}{name} unset")
      if self.draft == "auto" and (not _is_int(value) or value < 0):
        raise DecodeError(f"{f}{name}={value!r}: must be an integer >= 0 (the nodes of the tree {f}draft=auto may "
                          f"choose; 0: chains only)")
      if self.draft != "auto" and (not _is_int(value) or value < 1):
        raise DecodeError(f"{f}{name}={value!r}: must be a positive integer")
    if self.draft == "auto" and self.tree_nodes and self.mode != "speculative":
      raise DecodeError(f"{f}tree_nodes={self.tree_nodes} with {f}draft=auto gives auto a tree to verify greedily, "
                        f"but {f}mode={self.mode} samples its drafts: auto chooses chains there; use "
                        f"{f}draft=tree for a sampled tree, or leave {f}tree_nodes unset")

  @property
  def sampling(self) -> bool:
    return self.mode in ("sample", "speculative_sample")

  def check_model(self, args: ModelArgs) -> None:
    k = self.draft_heads
    if k is not None and not 2 <= k <= args.n_future:
      raise DecodeError(f"{self.flag}draft_heads={k}: the speculative block is 2..n_future={args.n_future} tokens "
                        f"(this model has {args.n_future} heads); leave it unset to use them all")
    f, d = self.flag, self.draft
    if d in ("auto", "tree", "bestfirst") and args.n_future < 2:
      raise DecodeError(f"{f}draft={d} chooses how many draft heads draft, but this model has none "
                        f"(n_future={args.n_future}); leave {f}draft unset or use {f}draft=chain")
    if d in ("auto", "tree", "bestfirst") and args.heads.reads_ahead:
      raise DecodeError(f"{f}draft={d}: sequential modules (head_type={args.head_type}) draft one after "
                        f"another after the verify pass, in a chain only; use {f}draft=chain")

    self._check_tree(args)

  def _check_tree(self, args: ModelArgs) -> None:
    """--tree_nodes and --tree_top within what this model's heads can draft."""
    f, depths = self.flag, (self.draft_heads or args.n_future) - 1
    if self.tree_top is not None and self.tree_top > min(args.vocab_size, MAX_TREE_TOP):
      raise DecodeError(f"{f}tree_top={self.tree_top}: at most {min(args.vocab_size, MAX_TREE_TOP)} choices per head "
                        f"(the vocabulary has {args.vocab_size} tokens)")
    if self.tree_nodes is None:
      return
    if self.draft in ("tree", "auto"):
      most = len(Tree.of(depths).depth) - 1
      if self.tree_nodes > most:
        raise DecodeError(f"{f}tree_nodes={self.tree_nodes}: the static tree has {most} nodes at {depths} draft "
                          f"depths; use {f}draft=bestfirst for a larger tree")
    else:
      top = self.tree_top or BEST_FIRST_TOP
      most = min(sum(top ** d for d in range(1, depths + 1)), MAX_TREE_NODES)
      if self.tree_nodes > most:
        raise DecodeError(f"{f}tree_nodes={self.tree_nodes}: at most {most} nodes (the paths of 1..{depths} choices "
                          f"among each head's top {top}, and no more than {MAX_TREE_NODES})")

  def draft_kind(self, args: ModelArgs) -> str:
    """The drafting scheme this request runs on this model: auto by default where the heads draft in the
    verify pass (parallel, causal, linear), else chain."""
    if self.draft is not None:
      return self.draft
    auto = self.mode in SPECULATIVE_MODES and args.n_future > 1 and not args.heads.reads_ahead
    return "auto" if auto else "chain"

  def tree_nodes_for(self, args: ModelArgs) -> int:
    """Settings.tree_nodes: as given; unset with draft=auto (mode=speculative), the whole static tree on an
    accelerator, where a tree's verify step costs about a chain's, and none on a CPU, whose verify step grows
    with the tokens fed so that no tree has paid there (experiments/speed/results/decode_profile_trees.md)."""
    if self.tree_nodes is not None:
      return int(self.tree_nodes)
    if self.draft_kind(args) == "auto" and self.mode == "speculative" and jax.default_backend() != "cpu":
      return len(Tree.of((self.draft_heads or args.n_future) - 1).depth) - 1
    return 0

  def settings(self, args: ModelArgs, batch_shards: int = 1, slots: int = 0) -> Settings:
    return Settings(self.mode, int(self.max_new_tokens), self.draft_heads or args.n_future,
                    batch_shards=batch_shards, slots=slots, draft=self.draft_kind(args),
                    tree_nodes=self.tree_nodes_for(args), tree_top=self.tree_top or 0)

  def sampling_params(self, eos_id: Optional[int] = None) -> SamplingParams:
    return SamplingParams.of(self.temperature, self.top_k, self.top_p, eos_id)


def check_request(args: ModelArgs, prompts, request: Request) -> None:
  """Raise DecodeError for the first thing about the model and prompts that cannot work, before any compile."""
  request.check_model(args)
  if not len(prompts):
    raise DecodeError("no prompts given")
  max_new_tokens = request.max_new_tokens
  room = max_prompt_len(args, max_new_tokens)
  for i, p in enumerate(prompts):
    if not len(p):
      raise DecodeError(f"prompt {i} is empty: give at least one token")
    if len(p) > room:
      raise DecodeError(
          f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} and n_future={args.n_future} "
          f"decoding needs {len(p) + max_new_tokens + args.n_future} positions but model.max_seq_len="
          f"{args.max_seq_len}; shorten the prompt to <= {max(room, 0)} tokens or lower max_new_tokens")
    bad = [t for t in p if not 0 <= int(t) < args.vocab_size]
    if bad:
      raise DecodeError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {args.vocab_size})")


def check_slots(mode: str, slots: Optional[int], n_prompts: int) -> None:
  if slots is None:
    return
  if not _is_int(slots) or slots < 1:
    raise DecodeError(f"slots={slots}: must be a positive integer (rows decoded at once)")
  if slots < n_prompts and mode in ("sample", "speculative_sample"):
    raise DecodeError(f"slots={slots} with {n_prompts} prompts: refilling rows is for the argmax modes (greedy, "
                      f"speculative); for mode={mode} decode the prompts in batches of {slots} instead")


def max_prompt_len(args: ModelArgs, max_new_tokens: int) -> int:
  """Longest prompt that fits: the cache holds prompt + max_new_tokens + n_future (the drafted block)."""
  return args.max_seq_len - max_new_tokens - args.n_future


def prompt_bucket(longest: int, limit: int) -> int:
  """Pad prompts to a power of two (>= 16) so that similar lengths share one compiled program."""
  return min(max(16, 1 << (max(longest, 1) - 1).bit_length()), max(limit, longest))


def pad_prompts(prompts, bucket: int) -> tuple[np.ndarray, np.ndarray]:
  """Right-pad token lists into tokens [B, bucket] (pad id 0) and lengths [B]."""
  tokens = np.zeros((len(prompts), bucket), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  return tokens, np.array([len(p) for p in prompts], np.int32)


def _batch_shards(tokens) -> int:
  """Over how many devices the prompts' batch is split (1 for a host array or one device)."""
  sharding = getattr(tokens, "sharding", None)
  if sharding is None:
    return 1
  return tokens.shape[0] // sharding.shard_shape(tokens.shape)[0]


_COMPILED: dict = {}


def compiled_decode(params, args: ModelArgs, settings: Settings, tokens, lengths, key, sp):
  """The compiled program for these static settings and shapes (compiled on first use): (fn, seconds)."""
  # Shardings are part of the signature: the same shapes on a mesh are another program.
  sig = tuple((x.shape, str(x.dtype), str(getattr(x, "sharding", None))) for x in jax.tree.leaves(params))
  sig += (str(getattr(tokens, "sharding", None)),)
  # The trace reads row_products' threshold: a program per setting (experiments/speed/row_products.py sets both).
  cache_key = (args, settings, tokens.shape, jax.tree.structure(params), sig, row_products.ROWS_UP_TO)
  if cache_key in _COMPILED:
    return _COMPILED[cache_key], 0.0
  start = time.perf_counter()
  weights = jax.jit(lambda p: decode_weights(p, args, settings.heads_run, settings.per_head)).lower(params).compile()
  loop = jax.jit(lambda *xs: decode(*xs, model=MTPTransformer(args), settings=settings))
  loop = loop.lower(weights(params), tokens, lengths, key, sp, settings.budget()).compile()
  _COMPILED[cache_key] = lambda params, *rest: loop(weights(params), *rest)
  return _COMPILED[cache_key], time.perf_counter() - start


def clear_compiled() -> None:
  """Drop every cached program (they hold device memory for their code only, but a long session may want it)."""
  _COMPILED.clear()
  clear_costs()


def run(params, args: ModelArgs, tokens, lengths, *, mode="greedy", max_new_tokens=64, seed=0, key=None,
        temperature=1.0, top_k=0, top_p=1.0, eos_id: Optional[int] = None, slots: Optional[int] = None,
        draft_heads: Optional[int] = None, draft: Optional[str] = None, draft_costs=None, draft_prior=None,
        draft_decay: Optional[float] = None, draft_explore: Optional[int] = None, draft_counts=None,
        tree_nodes: Optional[int] = None, tree_top: Optional[int] = None):
  """Decode padded prompts: (DecodeOutput of numpy arrays, {'compile_s', 'wall_s'}).

  `tokens` [N, P] / `lengths` [N] come from `pad_prompts`; the prompts' own checks are `check_request`'s.
  slots: rows decoded at once (argmax modes; default all N): as a row finishes, the next prompt takes it.
  draft_heads: the speculative block, k = 2..n_future (default n_future): heads 2..k draft, so a verify
  step costs k tokens' forward; where a step is bound by arithmetic (a CPU, large batches) a shorter
  block can pay more than the last heads' rarely accepted drafts (experiments/speed/results/speculative.md).
  draft: "chain" (every step drafts draft_heads-1 tokens) or "auto" (the default where the heads allow:
  each step picks 0..draft_heads-1 drafts) or "tree" (a static tree of the heads' top
  choices in one verify pass) or "bestfirst" (as many nodes, the most probable per row and step; docs/decoding.md);
  tree_nodes: a tree's nodes (tree: the first of its paths; bestfirst: default the static tree's count) and
  tree_top: each head's choices a best-first tree chooses among (default 4); draft_costs [cap+1] / draft_prior
  [2, cap] replace auto's timed cost table and its prior (reached, accepted) counts per depth; draft_decay
  (the running counts' factor per step) and draft_explore (steps after which an undrafted depth forgets its
  counts, so the budget may grow back; 0: never) replace `types.DECAY` and `types.EXPLORE`; draft_counts
  [2, cap]: an earlier call's `out.draft_counts` (same model and draft cap), to go on from what it saw: no
  start probe, and no draft heads in the prefill where those counts say drafting does not pay.
  wall_s is the decode alone (compile and auto's one-off cost timing, costs_s, excluded), measured until the
  results are on the host; draft_costs: the cost table auto used.
  """
  request = Request(mode, max_new_tokens, temperature, top_k, top_p, draft_heads, draft, tree_nodes, tree_top)
  request.check_model(args)
  check_slots(mode, slots, len(lengths))
  return execute(params, args, tokens, lengths, request, seed=seed, key=key, eos_id=eos_id, slots=slots,
                 draft_costs=draft_costs, draft_prior=draft_prior, draft_decay=draft_decay, draft_explore=draft_explore,
                 draft_counts=draft_counts)


def execute(params, args: ModelArgs, tokens, lengths, request: Request, *, seed=0, key=None,
            eos_id: Optional[int] = None, slots: Optional[int] = None, draft_costs=None, draft_prior=None,
            draft_decay: Optional[float] = None, draft_explore: Optional[int] = None, draft_counts=None):
  """`run` for a request its caller has checked (generate() does, once): nothing is checked again but
  draft_counts, which is not part of the request, before anything compiles."""
  settings = request.settings(args, batch_shards=_batch_shards(tokens),
                              slots=0 if slots is None or slots >= len(lengths) else int(slots))
  cap = settings.depths
  if draft_counts is not None and settings.draft != "auto":
    raise DecodeError(f"draft_counts carries --draft=auto's acceptance counts; this call drafts with "
                      f"draft={settings.draft!r}: leave draft_counts out or use draft='auto'")
  if draft_costs is not None and np.shape(draft_costs) != (settings.options,):
    tree = f" and one for its tree of {settings.auto_tree} nodes" if settings.auto_tree else ""
    raise DecodeError(f"draft_costs has shape {np.shape(draft_costs)}: this program's budgets are chains of 0..{cap} "
                      f"drafts{tree}, so it takes {settings.options} costs (a greedy step's first, 1.0)")
  if draft_counts is not None and np.shape(draft_counts) != (2, cap):
    raise DecodeError(f"draft_counts has shape {np.shape(draft_counts)}, this program drafts up to {cap} tokens: pass "
                      f"`out.draft_counts` of a call with the same model and draft_heads (shape (2, {cap}))")
  key = jax.random.key(seed) if key is None else key
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):   # a raw uint32 PRNGKey: one compiled signature
    key = jax.random.wrap_key_data(key)
  sp = request.sampling_params(eos_id)
  tokens, lengths = jnp.asarray(tokens, jnp.int32), jnp.asarray(lengths, jnp.int32)
  fn, compile_s = compiled_decode(params, args, settings, tokens, lengths, key, sp)
  costs_s, timing = 0.0, {}
  if settings.draft == "auto":
    if draft_costs is None:
      draft_costs, costs_s = step_costs(fn, params, tokens, lengths, key, sp, settings)
    timing = {"costs_s": costs_s, "draft_costs": [round(float(c), 3) for c in np.asarray(draft_costs)]}
  budget = settings.budget(draft_costs, draft_prior, **({} if draft_decay is None else {"decay": draft_decay}),
                     **({} if draft_explore is None else {"explore": draft_explore}), counts=draft_counts)
  start = time.perf_counter()
  out = jax.device_get(fn(params, tokens, lengths, key, sp, budget))
  return out, {"compile_s": compile_s, "wall_s": time.perf_counter() - start, **timing}
