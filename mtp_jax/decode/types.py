"""The decode loop's data: what is static about a decode (Settings), the traced sampling scalars, the
loop's carried state and its output. Changing a Settings field compiles a new program; nothing else does.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mtp_jax.errors import UserError

Array = jax.Array
MODES = ("greedy", "speculative", "sample", "speculative_sample")
PAD = -1          # marks output slots past a row's end
# --draft=auto's defaults (`Budget`): a prior of one draft reached and half of one accepted at every depth
# (a conditional acceptance of 0.5, as weak as a prior can be and still draft where drafts are cheap); observed
# counts that fade by DECAY per step (a running estimate over about 64 steps); and a depth not drafted for
# EXPLORE steps forgets what it saw, so the budget grows back where the heads have come to pay.
PRIOR_REACHED, PRIOR_ACCEPTED = 1.0, 0.5
DECAY = 63.0 / 64.0
EXPLORE = 128
CATCH_UP = 32     # positions per chunk when heads that stopped drafting catch their caches up (loop._grow)
STALE_NEVER = 2 ** 30   # `DecodeState.stale` of a head whose cache is current


class DecodeError(UserError):
  """A decoding request that cannot run (bad prompt, length, mode or sampling setting)."""


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything static about a decode: changing any of it compiles a new program."""
  mode: str
  max_new_tokens: int
  draft_block: int        # speculative modes: tokens a step feeds, k = 2..model n_future (last token + k-1
                          # drafts from heads 2..k); 1 drafts nothing
  batch_shards: int = 1   # the batch's split over devices: compaction keeps every stage a multiple of it
  slots: int = 0          # rows decoded at once; fewer than the prompts: finished rows take the next prompt
                          # (argmax modes). 0: every prompt at once
  draft: str = "chain"    # speculative modes: "chain" drafts draft_block-1 tokens every step; "auto" chooses
                          # 0..draft_block-1 per step (`choose_budget`), one while_loop per length, and
                          # grows the budget back by catching the stopped heads' caches up (loop._grow);
                          # "tree" verifies a static tree of the heads' top choices (tree.py); "bestfirst" a tree
                          # of as many nodes built per row and step from the heads' probabilities
  tree_nodes: int = 0     # tree and bestfirst: the tree's nodes, its verify step feeds 1 + tree_nodes tokens
                          # (0: the static tree's count at this depth, `Tree.of`); auto (mode=speculative): the
                          # static tree of that many nodes is one more budget auto may choose (0: chains only)
  tree_top: int = 0       # bestfirst: each head's top choices its trees choose among (0: BEST_FIRST_TOP)

  def stages(self, batch: int) -> tuple:
    """Batch sizes the loop runs at, in turn (see `decode`): halving while the half is >= 2 rows and
    splits over the batch's shards. Sampling modes run at one size, so that their draws do not
    depend on how the batch was compacted."""
    sizes = [batch]
    while (not self.sampling and sizes[-1] // 2 >= max(2, self.batch_shards)
           and sizes[-1] // 2 % self.batch_shards == 0):
      sizes.append(sizes[-1] // 2)
    return tuple(sizes)

  def batch(self, n_prompts: int) -> int:
    """Rows the loop decodes at once for n_prompts prompts."""
    return min(self.slots, n_prompts) if self.slots else n_prompts

  @property
  def speculative(self) -> bool:
    return self.mode in ("speculative", "speculative_sample") and self.draft_block > 1

  @property
  def sampling(self) -> bool:
    return self.mode in ("sample", "speculative_sample")

  @property
  def depths(self) -> int:      # draft depths: heads 2..k draft the tokens 1..k-1 after the next one
    return self.draft_block - 1 if self.speculative else 0

  @property
  def tree(self) -> bool:       # a tree of candidates per step (static or best-first), not a chain
    return self.draft in ("tree", "bestfirst") and self.speculative

  @property
  def per_head(self) -> bool:   # the heads' weights and caches as tuples, one per head (auto runs a prefix of
    return self.draft != "chain"   # them, and taking the first j of a tuple copies nothing); a chain stacks them

  @property
  def block(self) -> int:       # tokens fed per step: last token + k-1 drafts (a tree: + its nodes)
    return 1 + self.nodes if self.tree else self.depths + 1

  @property
  def auto_tree(self) -> int:   # --draft=auto: the nodes of the static tree it may verify instead of a chain (0: none)
    auto = self.draft == "auto" and self.speculative and not self.sampling
    return self.tree_nodes if auto else 0

  @property
  def options(self) -> int:     # --draft=auto's budgets: chains of 0..depths drafts, then the tree where it has one
    return self.depths + 1 + (1 if self.auto_tree else 0)

  @property
  def span(self) -> int:        # the most tokens a step feeds (the cache's room past the generation)
    return max(self.block, 1 + self.auto_tree)

  def budget(self, costs=None, prior=None, **kw) -> "Budget":
    """`Budget.of` for this program's draft depths and budgets."""
    return Budget.of(self.depths, costs, prior, options=self.options, **kw)

  @property
  def nodes(self) -> int:       # a tree's nodes: tree_nodes, or the static tree's count at this depth
    return self.tree_nodes or len(Tree.of(self.depths).depth) - 1

  def static_tree(self) -> "Tree":
    """--draft=tree's tree."""
    return Tree.of(self.depths, self.tree_nodes)

  def candidates(self) -> "Candidates":
    """--draft=bestfirst's candidate paths."""
    return Candidates.of(self.depths, self.tree_top or BEST_FIRST_TOP)

  @property
  def heads_run(self) -> int:   # greedy and sample need head 0 only
    return self.depths + 1


# --draft=tree's static tree (Medusa-style): each path names, per depth d, which of head d+1's top choices
# (0: its argmax) the node drafts. Chosen by hand for heads whose acceptance falls with depth: three choices
# at depth 1, the top two paths extended at depth 2, the top three at depth 3. Parents precede children.
TREE_PATHS = ((0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 0, 0, 0), (0, 0, 0, 1),
              (0, 0, 1, 0), (0, 0, 0, 0, 0), (0, 0, 0, 0, 0, 0), (0, 0, 0, 0, 0, 0, 0))
TREE_TOP = 3     # the most choices per head a path uses
BEST_FIRST_TOP = 4   # --draft=bestfirst: each head's top choices its trees choose among


class Tree(NamedTuple):
  """A static tree of T = 1 + nodes block slots (slot 0: the last token, the root), as numpy arrays."""
  depth: np.ndarray      # [T] the slot's depth (root 0): its position is the block's start + depth
  choice: np.ndarray     # [T] which of head depth's top choices it drafts (root: 0)
  ancestors: np.ndarray  # [T, T] bool: slot j is slot i or one of its ancestors
  path: np.ndarray       # [T, D+1] the slots on the path to slot i, by depth (past its depth: i again)
  argmax: np.ndarray     # [T] the slot is on the argmax path (every choice on its way 0): a chain's draft

  @classmethod
  def of(cls, depths: int, nodes: int = 0) -> "Tree":
    """The tree of TREE_PATHS up to `depths`, its first `nodes` paths (0: all; parents come first, so any prefix
    is a tree)."""
    paths = [p for p in TREE_PATHS if len(p) <= depths]
    paths = [()] + (paths[:nodes] if nodes else paths)
    index = {p: i for i, p in enumerate(paths)}
    t = len(paths)
    anc = np.zeros((t, t), bool)
    path = np.zeros((t, depths + 1), np.int32)
    for i, p in enumerate(paths):
      for d in range(depths + 1):
        path[i, d] = index[p[:d]] if d <= len(p) else i
        if d <= len(p):
          anc[i, index[p[:d]]] = True
    return cls(np.array([len(p) for p in paths], np.int32), np.array([p[-1] if p else 0 for p in paths], np.int32),
               anc, path, np.array([not any(p) for p in paths]))


class Candidates(NamedTuple):
  """--draft=bestfirst's candidate nodes, static: every path of 1..D choices among each head's top K, parents
  before children (breadth first). A step's tree is the N most probable of them (`tree.best_first_drafts`)."""
  depth: np.ndarray      # [C] the candidate's depth (1..D)
  choice: np.ndarray     # [C] which of head depth's top K choices it drafts
  path: np.ndarray       # [C, D] the candidates on its path by depth 1..D (past its depth: itself)
  picks: np.ndarray      # [C, D*K] 1 where the path takes choice c of head d (column d*K + c): its log-probability
                         # is picks @ the heads' top-K log-probabilities

  @property
  def top(self) -> int:         # K, each head's choices
    return self.picks.shape[1] // self.path.shape[1]

  @classmethod
  def of(cls, depths: int, top: int = BEST_FIRST_TOP) -> "Candidates":
    paths, level = [], [()]
    for _ in range(depths):
      level = [p + (c,) for p in level for c in range(top)]
      paths += level
    index = {p: i for i, p in enumerate(paths)}
    path = np.array([[index[p[:e + 1]] if e < len(p) else index[p] for e in range(depths)] for p in paths], np.int32)
    picks = np.zeros((len(paths), depths * top), np.float32)
    for i, p in enumerate(paths):
      for d, c in enumerate(p):
        picks[i, d * top + c] = 1.0
    return cls(np.array([len(p) for p in paths], np.int32), np.array([p[-1] for p in paths], np.int32), path, picks)


class Budget(NamedTuple):
  """Traced inputs of --draft=auto (`choose_budget`): new values never recompile.

  costs [options]: C(j), the time of a step verifying j drafts over a greedy step's (C(0) = 1), j = 0..cap, then
  where auto has a tree (`Settings.auto_tree`) the tree's step, C(cap+1);
  prior [2, cap]: pseudo-counts (reached, accepted) per draft depth, added to the observed counts;
  limit []: stop after this many steps (the host's timing runs; otherwise max int);
  decay []: the observed counts' factor per step (1: never forget);
  explore []: a depth not drafted for this many steps forgets its counts (the prior alone remains), so the
  budget can grow back, and the first depth left that long gets a probe (a step of every draft), as does the
  first step; 0: never (no probes either);
  timing []: the host's cost timing runs: every draft is counted rejected (the output is not greedy's), so a
  run of any draft length advances one position per step and each length is timed over the same positions;
  counts [2, cap]: the running counts to start from (an earlier call's `DecodeOutput.draft_counts`, as a
  server keeps them across requests); carried []: whether they are such counts: then the first budget is
  theirs, with no start probe, and the prefill runs the draft heads only if that budget drafts.
  """
  costs: Array
  prior: Array
  limit: Array
  decay: Array
  explore: Array
  timing: Array
  counts: Array
  carried: Array

  @classmethod
  def of(cls, cap: int, costs=None, prior=None, limit: Optional[int] = None, decay: float = DECAY,
         explore: int = EXPLORE, timing: bool = False, counts=None, options: Optional[int] = None) -> "Budget":
    """Defaults: every budget costs as much as greedy, the weak prior PRIOR_REACHED / PRIOR_ACCEPTED, and no
    counts carried in (the first step is a probe). options: the budgets (default cap + 1, chains only)."""
    options = cap + 1 if options is None else options
    costs = jnp.ones((options,), jnp.float32) if costs is None else jnp.asarray(costs, jnp.float32)
    if prior is None:
      prior = jnp.stack([jnp.full((cap,), PRIOR_REACHED), jnp.full((cap,), PRIOR_ACCEPTED)])
    prior = jnp.asarray(prior, jnp.float32)
    carried = counts is not None
    counts = jnp.zeros((2, cap), jnp.float32) if counts is None else jnp.asarray(counts, jnp.float32)
    return cls(costs, prior, jnp.int32(2 ** 31 - 1 if limit is None else limit), jnp.float32(decay),
               jnp.int32(explore), jnp.bool_(timing), counts, jnp.bool_(carried))


def choose_budget(costs, stats, prior, most, tree: Optional["Tree"] = None, tree_stats=None):
  """The draft length j in 0..most (most: an int or a traced scalar) maximising expected tokens per step over
  its cost, E[tokens | j] / C(j). Depth d's draft is accepted, given the drafts before it were, with
  probability q_d = accepted / reached (stats + prior [2, cap]: steps that reached depth d, and accepted its
  draft), so E[tokens | j] = 1 + sum over d < j of q_1 ... q_d. An unobserved depth counts at the prior's
  rate; ties go to the shorter length, so j = 0 (a greedy step) wherever drafting does not pay.

  tree (--draft=auto's static tree, with tree_stats [2, nodes]: the running counts per node): one more budget,
  cap + 1, scored by `tree_gain` over its cost C(cap + 1); a chain wins a tie."""
  counts = stats + prior
  q = counts[1] / jnp.maximum(counts[0], 1e-6)
  gain = 1.0 + jnp.concatenate([jnp.zeros((1,), jnp.float32), jnp.cumsum(jnp.cumprod(q))])
  if tree is not None:
    gain = jnp.concatenate([gain, tree_gain(q, tree, tree_stats)[None]])
  lengths = jnp.arange(gain.shape[0])
  score = jnp.where((lengths <= most) | (lengths > q.shape[0]), gain / costs, -jnp.inf)
  return jnp.argmax(score).astype(jnp.int32)


def tree_gain(q, tree: "Tree", tree_stats):
  """E[tokens] of a step verifying the static tree: 1 + the sum over its nodes of P(node accepted). Siblings
  draft distinct tokens, so at most one node per depth is accepted and the accepted nodes form one path: the
  expected accepted depth is that sum. P(node) is the product, along its path, of each node's acceptance given
  its parent's: q_d (the chain's counts) for a node on the argmax path, which is the chain's draft at depth d,
  else its own running counts tree_stats [2, nodes] over the chain's weak prior (PRIOR_REACHED, PRIOR_ACCEPTED).
  That prior is optimistic for a head's second choice: the tree is tried where it might pay, its own counts then
  decide, and as they fade (Budget.decay) a tree that stopped paying is tried again where the prior says it could."""
  depth, argmax = tree.depth[1:], tree.argmax[1:]
  own = (tree_stats[1] + PRIOR_ACCEPTED) / (tree_stats[0] + PRIOR_REACHED)
  q_node = jnp.where(argmax, q[np.maximum(depth - 1, 0)], own)                    # [nodes]
  p = jnp.prod(jnp.where(tree.ancestors[1:, 1:], q_node[None, :], 1.0), axis=1)   # [nodes]
  return 1.0 + jnp.sum(p)


class SamplingParams(NamedTuple):
  """Traced scalars, so new values never recompile. top_k=0 and top_p=1 switch those filters off."""
  temperature: Array
  top_k: Array
  top_p: Array
  eos_id: Array     # -1: no end-of-sequence token

  @classmethod
  def of(cls, temperature=1.0, top_k=0, top_p=1.0, eos_id: Optional[int] = None) -> "SamplingParams":
    """From Python numbers, with the dtypes the compiled loop was traced with."""
    return cls(jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p),
               jnp.int32(-1 if eos_id is None else eos_id))


@flax.struct.dataclass
class DecodeState:
  cache: Any
  tokens: Array      # [B, max_new + k] generated tokens; slots at and past `count` are scratch
  count: Array       # [B] tokens generated so far
  position: Array    # [B] position of the last generated token: where the next block starts
  drafts: Array      # [B, k-1] drafted tokens that follow the last generated token
  draft_logq: Any    # [B, k-1, V] the distributions the drafts were sampled from (sampling modes only)
  done: Array        # [B] hit EOS or max_new_tokens
  key: Array
  steps: Array       # [] forward passes after the prefill
  forwards: Array    # [B] forward passes that emitted this row's tokens, prefill included
  accepted: Array    # [B, k-1] drafts of head i (1..k-1) accepted
  proposed: Array    # [B, k-1] drafts of head i proposed (every step in chain mode; --draft=auto: steps of
                     # budget >= i)
  budget: Array      # [] drafts the next step verifies (chain: k-1; auto: `choose_budget`)
  stats: Array       # [2, k-1] the batch's (reached, accepted) per depth, fading by Budget.decay per step
  budget_steps: Array  # [options] steps run with each budget 0..k-1 (and auto's tree, last)
  drafted: Array = None   # [] --draft=auto: drafts every row holds (the heads that ran last); a budget past it grows
  unseen: Array = None    # [k-1] --draft=auto: steps since each depth was last drafted (Budget.explore)
  stale: Array = None     # [B, k-1] --draft=auto: position from which head d+1's cache missed steps (STALE_NEVER:
                          # none); `loop._grow` recomputes it from `src` before the head drafts again
  src: Array = None       # [B, S, d] --draft=auto: what the draft heads read at each position (the trunk's output,
                          # or head 0's for chained heads), kept so that a head that stopped can catch up
  grows: Array = None     # [] --draft=auto: times the budget grew back (each a catch-up of the heads it needs)
  tree_sel: Array = None  # [B, N] --draft=bestfirst: the candidates (`Candidates`) the drafted tree holds, ascending
  tree_tokens: Array = None   # [B, N] --draft=auto with a tree: the static tree's node tokens, drafted where every
                              # head ran (drafted == depths; the chain's drafts are its argmax path)
  tree_stats: Array = None    # [2, N] --draft=auto with a tree: the batch's (reached, accepted) per node, fading
  recent: Any = None  # sequential modules: head 0's hidden states [B, D-1, d] and the tokens [B, D-1] at the
                      # D-1 positions before `position`, where the modules' caches are rewritten next step


@flax.struct.dataclass
class DecodeOutput:
  tokens: Array      # [B, max_new_tokens], PAD past `lengths`
  lengths: Array     # [B] tokens generated (the first EOS included)
  forwards: Array    # [B] forward passes that emitted them (prefill included)
  accepted: Array    # [B, k-1] drafts accepted per draft head; each was proposed forwards-1 times
  steps: Array       # [] loop iterations (forward passes after the prefill) for the whole batch
  row_steps: Array   # [] rows x forward passes the batch ran, the prefills' included: less than
                     # batch x (steps + 1) where compaction dropped finished rows
  proposed: Array    # [B, k-1] drafts proposed per draft head
  budget_steps: Array  # [k] the batch's steps with 0..k-1 drafts (--draft=auto with a tree: [k+1], the tree's last)
  grows: Array = None  # [] --draft=auto: times the budget grew back (a catch-up of the heads it needed)
  draft_counts: Array = None  # [2, k-1] --draft=auto: the running (reached, accepted) counts per depth at the
                              # end; `run(draft_counts=...)` starts the next call from them
