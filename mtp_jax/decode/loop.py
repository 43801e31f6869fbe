"""KV-cached decoding as one jit-compiled program: a prefill, then one `jax.lax.while_loop`.

Every mode is the same loop over *blocks*. A step feeds each row's block [last token, drafts]
(k tokens) at the row's own cache position, verifies the drafts with head 0, emits the accepted
drafts plus one token from head 0 (1..k tokens), and drafts the next block with heads 1..n-1 at
the last accepted position (draft.py). `greedy` and `sample` are the case k=1 (no drafts, only
head 0 run): the reference next-token decoders.

The prefill attends within the prompt only (nothing is cached before it) and writes its keys and
values to the cache. Shapes are static: prompts are right-padded to a bucket P, the cache holds
P + max_new_tokens + n_future slots, and rejected drafts' cache slots lie past the row's position
(masked by the model) until the next block overwrites them. Rows that are done stay in the batch,
frozen, until at most half the batch is active; then the active rows move into a batch half the
size (argmax modes; see `decode`). Given more prompts than rows (`slots`), a finished row takes the
next prompt instead, as serving systems do (continuous batching, `_serve_queue`), and compaction ends
the last batch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mtp_jax.decode.draft import draft_heads_at, drafter_for, verify
from mtp_jax.decode.forward import Weights, forward_hidden, init_decode_cache, run_heads, take_at, unembed
from mtp_jax.decode.rows import Results, put_row, select_rows
from mtp_jax.decode.tree import (RowTrees, best_first_drafts, chain_and_tree, keep_path, path_counts, tree_drafts,
                                 tree_verify)
from mtp_jax.decode.types import (CATCH_UP, PAD, STALE_NEVER, Budget, DecodeOutput, DecodeState,
                                  SamplingParams, Settings, choose_budget)
from mtp_jax.model import MTPTransformer, default_positions


def _pad_drafts(x, cap: int):
  """Drafts [B, j, ...] padded to the state's [B, cap, ...] (slots past the budget are never read)."""
  return None if x is None else jnp.pad(x, ((0, 0), (0, cap - x.shape[1])) + ((0, 0),) * (x.ndim - 2))


def _emit(settings: Settings, sp, state: DecodeState, p_logits, drafter, drafts, draft_logq, key, active,
          budget: Budget = None, verified=None, seen=None):
  """Verify a block, append the accepted tokens (up to EOS / max_new_tokens), draft the next block.

  The block's index 0 sits at state.position; rows that are not `active` keep their state. The block
  verifies j = drafts.shape[1] drafts; --draft=auto then updates the running counts and picks the next
  budget from them (`_auto_budget`). verified: (a, token) already known (a tree's path, as a chain in `drafts`);
  seen: --draft=auto's tree step, what its nodes and argmax path saw (`tree.path_counts`).
  """
  k_verify, k_draft = jax.random.split(key) if settings.sampling else (key, key)   # argmax modes draw nothing
  a, token = verify(p_logits, drafts, draft_logq, k_verify, sp, settings.sampling)[:2] if verified is None else verified
  if settings.draft == "auto" and budget is not None:   # a cost timing run: nothing accepted (Budget.timing)
    a = jnp.where(budget.timing, 0, a)
  new_drafts, new_logq, updates = drafter(a, token, k_draft)
  made = new_drafts.shape[1]
  new_drafts, new_logq = _pad_drafts(new_drafts, settings.block - 1), _pad_drafts(new_logq, settings.block - 1)
  if updates is not None and "tree_sel" in updates:   # --draft=bestfirst: the trees the drafts make up
    state = state.replace(tree_sel=jnp.where(active[:, None], updates["tree_sel"], state.tree_sel))
  elif updates is not None and "tree_tokens" in updates:   # --draft=auto's tree, drafted beside the chain
    state = state.replace(tree_tokens=jnp.where(active[:, None], updates["tree_tokens"], state.tree_tokens))
  elif updates is not None:   # sequential modules: their cache, and the positions before the next block
    state = state.replace(cache={**state.cache, "drafter": updates["cache"]}, recent=updates["recent"])

  idx = jnp.arange(drafts.shape[1] + 1)[None, :]
  new = jnp.where(idx == a[:, None], token[:, None], jnp.pad(drafts, ((0, 0), (0, 1))))   # d_1..d_a, token
  m = jnp.minimum(a + 1, settings.max_new_tokens - state.count)
  is_eos = (new == sp.eos_id) & (idx < m[:, None])
  hit = jnp.any(is_eos, axis=1)
  m = jnp.where(hit, jnp.argmax(is_eos, axis=1) + 1, m)
  written = jax.vmap(lambda buf, u, i: jax.lax.dynamic_update_slice_in_dim(buf, u, i, 0))(
      state.tokens, new.astype(state.tokens.dtype), state.count)

  def keep(new_val, old_val):
    if new_val is None:
      return None
    return jnp.where(active.reshape(active.shape + (1,) * (new_val.ndim - 1)), new_val, old_val)

  cap = settings.depths
  depth = jnp.arange(cap)[None, :]
  proposed = active[:, None] & (depth < drafts.shape[1])
  accepted = active[:, None] & (a[:, None] > depth)
  if settings.draft == "auto" and seen is None:
    state = _auto_budget(settings, state, budget, proposed & (a[:, None] >= depth), accepted, drafts.shape[1], made)
  elif settings.draft == "auto":   # a tree step: the argmax path's nodes are the chain's drafts
    nodes, chain = (x * active[None, :, None] for x in seen)
    depths = int(settings.static_tree().argmax.sum()) - 1   # the chain depths the tree holds
    state = _auto_budget(settings, state, budget, chain[0] > 0, chain[1] > 0, depths, made, nodes)
  return state.replace(
      tokens=keep(written, state.tokens),
      count=keep(state.count + m, state.count),
      position=keep(state.position + m, state.position),
      drafts=keep(new_drafts, state.drafts),
      draft_logq=keep(new_logq, state.draft_logq),
      done=state.done | (active & (hit | (state.count + m >= settings.max_new_tokens))),
      forwards=state.forwards + active,
      accepted=state.accepted + accepted, proposed=state.proposed + proposed)


def _auto_budget(settings: Settings, state: DecodeState, budget: Budget, reached, accepted, verified: int, made: int,
                 tree_seen=None) -> DecodeState:
  """--draft=auto: fold this step's counts per depth (rows that reached it, rows that accepted its draft) into
  the fading running counts, let depths not drafted for Budget.explore steps forget theirs (the first depth
  then gets one probing draft), and choose the next budget over every length (and the tree, whose nodes'
  counts tree_seen [2, B, nodes] a tree step adds); past the `made` drafts the rows hold, the loop grows it
  (`_grow`)."""
  cap = state.stats.shape[1]
  seen = jnp.arange(cap) < verified
  stats = state.stats * budget.decay + jnp.stack([jnp.sum(reached, 0), jnp.sum(accepted, 0)]).astype(jnp.float32)
  unseen = jnp.where(seen, 0, state.unseen + 1)
  forget = (budget.explore > 0) & (unseen >= budget.explore)
  stats, unseen = jnp.where(forget[None], 0.0, stats), jnp.where(forget, 0, unseen)
  tree_stats = state.tree_stats
  if settings.auto_tree:
    tree_stats = tree_stats * budget.decay + (0.0 if tree_seen is None else jnp.sum(tree_seen, axis=1))
  # A first depth left undrafted that long gets one step of every draft (a probe) even where the prior alone
  # would not pay: heads better than the prior, behind a step cost above its tokens, are found again.
  chosen = _choose(settings, budget, stats, tree_stats)
  return state.replace(stats=stats, unseen=unseen, drafted=jnp.int32(made), tree_stats=tree_stats,
                       budget=jnp.where(forget[0], cap, chosen))


def _choose(settings: Settings, budget: Budget, stats, tree_stats):
  """`choose_budget` over this program's budgets: chains of 0..depths drafts, and auto's tree where it has one."""
  tree = settings.static_tree() if settings.auto_tree else None
  return choose_budget(budget.costs, stats, budget.prior, settings.depths, tree, tree_stats)


def prefill(model, w: Weights, settings: Settings, sp, tokens, lengths, key, budget: Budget = None,
            current=None) -> DecodeState:
  """Run the padded prompts through the model, emit each row's first token and first drafts. current: the
  batch's budget when a prompt refills a row (--draft=auto: no drafting head runs where it is 0)."""
  args, (b, p) = model.args, tokens.shape
  k = settings.block
  budget = settings.budget() if budget is None else budget
  slots = p + settings.max_new_tokens + args.n_future + settings.span
  cache = init_decode_cache(args, b, slots, settings.heads_run, per_head=settings.per_head)
  positions = jnp.broadcast_to(jnp.arange(p), (b, p))
  zero = jnp.zeros((b,), jnp.int32)
  auto = settings.draft == "auto"
  cap = settings.depths
  heads_on, first = True, cap
  if auto and current is not None:   # a refilled row drafts where the batch does
    heads_on = current > 0
  elif auto:                         # carried counts choose the first budget; else the start probe drafts all
    no_tree_counts = jnp.zeros((2, settings.auto_tree), jnp.float32)
    first = jnp.where(budget.carried, _choose(settings, budget, budget.counts, no_tree_counts), cap)
    heads_on = first > 0
  hidden, cache, src = _prefill_forward(model, w, settings, heads_on, tokens, positions, cache, zero)
  last = lengths - 1
  h_last = take_at(hidden[0], last)[:, None]                            # head 0 at each prompt's end [B, 1, d]
  key, sub = jax.random.split(key)
  per_head = jnp.zeros((b, settings.depths), jnp.int32)
  state = DecodeState(
      cache=cache, tokens=jnp.zeros((b, settings.max_new_tokens + k), jnp.int32),
      count=jnp.zeros((b,), jnp.int32), position=last.astype(jnp.int32),
      drafts=jnp.zeros((b, k - 1), jnp.int32),
      draft_logq=jnp.zeros((b, k - 1, args.vocab_size), jnp.float32) if settings.sampling else None,
      done=jnp.zeros((b,), bool), key=key, steps=jnp.zeros((), jnp.int32),
      forwards=jnp.zeros((b,), jnp.int32), accepted=per_head, proposed=per_head,
      budget=jnp.int32(cap), stats=budget.counts if auto else jnp.zeros((2, cap), jnp.float32),
      budget_steps=jnp.zeros((settings.options if auto else cap + 1,), jnp.int32), drafted=jnp.int32(cap),
      unseen=jnp.zeros((cap,), jnp.int32),
      grows=jnp.zeros((), jnp.int32),
      stale=jnp.where(heads_on, STALE_NEVER, 0) * jnp.ones((b, cap), jnp.int32) if auto else None,
      src=jnp.pad(src, ((0, 0), (0, slots - p), (0, 0))) if auto else None,
      tree_sel=jnp.zeros((b, k - 1), jnp.int32) if settings.draft == "bestfirst" and settings.speculative else None,
      tree_tokens=jnp.zeros((b, settings.auto_tree), jnp.int32) if settings.auto_tree else None,
      tree_stats=jnp.zeros((2, settings.auto_tree), jnp.float32) if settings.auto_tree else None,
      recent=None if w.drafter is None else (jnp.zeros((b, k - 2, args.d_model), hidden.dtype),
                                             jnp.zeros((b, k - 2), jnp.int32)))
  no_drafts = jnp.zeros((b, 0), jnp.int32)
  no_logq = jnp.zeros((b, 0, args.vocab_size), jnp.float32) if settings.sampling else None
  drafter = drafter_for(model, w, settings, sp, state, hidden, tokens, zero, last, True)
  if settings.tree or settings.auto_tree:
    h = jax.vmap(lambda hh: take_at(hh, last)[:, None])(hidden[1:])
    drafter = _tree_drafter(model, w, settings, h)
  state = _emit(settings, sp, state, unembed(model, w.params, h_last), drafter, no_drafts, no_logq, sub,
                jnp.ones((b,), bool), budget)
  if not auto:
    return state
  state = state.replace(drafted=jnp.where(heads_on, state.drafted, 0))
  if current is None:   # the first step probes every draft (one observation per depth before the counts
    #                     decide), unless counts were carried in
    state = state.replace(budget=jnp.where(budget.carried, first, jnp.where(budget.explore > 0, cap, state.budget)))
  return state


def _prefill_forward(model, w: Weights, settings: Settings, heads_on, tokens, positions, cache, zero):
  """The prompts through the trunk and heads: (hidden, cache, what the draft heads read --draft=auto keeps, or
  None). --draft=auto runs the draft heads only where heads_on (the first budget drafts, or a refilled row's
  batch does): otherwise the prefill costs what greedy's does, and the heads catch up if the budget grows."""
  if settings.draft != "auto":
    return (*forward_hidden(model, w, tokens, positions, cache, zero, prefill=True), None)
  if cache["heads"] is None:   # heads without caches (linear) read the trunk's output: nothing to catch up
    return forward_hidden(model, w, tokens, positions, cache, zero, prefill=True, trunk_out=True)
  head0 = {**cache, "heads": cache["heads"][:1]}
  hidden0, cache0, z = forward_hidden(model, w._replace(heads=w.heads[:1]), tokens, positions, head0, zero,
                                      prefill=True, trunk_out=True)
  start = hidden0[0] if model.args.heads.chained else z
  segment_ids = default_positions(tokens, positions)[1]
  rest = lambda c: run_heads(model.args, w.heads[1:], start, positions, segment_ids, c, zero, prefill=True)
  skip = lambda c: (jnp.zeros((len(w.heads) - 1,) + hidden0.shape[1:], hidden0.dtype), c)
  hidden_rest, caches = jax.lax.cond(heads_on, rest, skip, cache["heads"][1:])
  return (jnp.concatenate([hidden0, hidden_rest.astype(hidden0.dtype)]), {**cache0, "heads": cache0["heads"] + caches},
          start)


def step(model, w: Weights, settings: Settings, sp, state: DecodeState, budget: Budget = None) -> DecodeState:
  """One forward pass over every row's block [last token, drafts] at its own cache position.

  --draft=auto: one branch per draft length j = 0..k-1 (`jax.lax.switch` on the budget, at most the drafts the
  rows hold; only the taken branch runs), branch j feeding [last token, j drafts] through the trunk and heads
  0..j, so a shorter block costs less and j = 0 is a greedy step. (The decode loop itself runs one loop per
  length and grows the budget back with `_grow`; this single step is for tools that time one step.)"""
  budget = settings.budget() if budget is None else budget
  if settings.tree:
    return _tree_step(model, w, settings, sp, state)
  if settings.draft != "auto":
    return _block_step(model, w, settings, sp, state, settings.depths, budget)
  branches = [lambda s, j=j: _block_step(model, w, settings, sp, s, j, budget) for j in range(settings.depths + 1)]
  return jax.lax.switch(jnp.minimum(state.budget, state.drafted), branches, state)


def _steps_while(model, w: Weights, settings: Settings, sp, budget: Budget, cond, state: DecodeState) -> DecodeState:
  """Steps while cond(state). --draft=auto: one loop per draft length, longest first, each running while the
  budget is its length (static blocks and no conditional around the state: a `lax.switch` over the branches
  copied the caches in and out of it every step), after a loop of tree steps where auto has a tree (budget
  depths + 1, which needs every head's drafts), inside a loop that, where the budget has grown past the
  drafts the rows hold, lets the heads it needs catch up (`_grow`) and goes round again."""
  if settings.draft != "auto":
    return jax.lax.while_loop(cond, lambda s: step(model, w, settings, sp, s, budget), state)
  cap = settings.depths

  def lengths(s):
    if settings.auto_tree:
      s = jax.lax.while_loop(lambda s: cond(s) & (s.budget > cap) & (s.drafted >= cap),
                             lambda s: _tree_step(model, w, settings, sp, s, budget), s)
    for j in reversed(range(cap + 1)):
      s = jax.lax.while_loop(lambda s, j=j: cond(s) & (s.budget == j) & (s.drafted >= j),
                             lambda s, j=j: _block_step(model, w, settings, sp, s, j, budget), s)
    grow = cond(s) & (jnp.minimum(s.budget, cap) > s.drafted)
    return jax.lax.cond(grow, lambda s: _grow(model, w, settings, sp, s), lambda s: s, s)
  return jax.lax.while_loop(cond, lengths, state)


def _grow(model, w: Weights, settings: Settings, sp, state: DecodeState) -> DecodeState:
  """--draft=auto's budget grown past the drafts the rows hold: every draft head recomputes its cache from the
  first position any head missed (`stale`) to the row's position, in chunks of CATCH_UP positions read from
  `src` (what the heads read in the steps they missed), and drafts at the last accepted position, exactly as
  had it run in every step. Rare: the budget grows back only where the counts say drafting pays again, so all
  heads catch up at once (one program, not one per budget)."""
  args = model.args
  size = min(CATCH_UP, state.src.shape[1])
  pos = state.position
  held = state.cache["heads"]   # None: heads without caches (linear), which need only the last position's input
  heads, caches = w.heads[1:], None if held is None else held[1:]
  lo = jnp.minimum(jnp.min(state.stale, axis=1), pos)
  chunks = jnp.maximum(jnp.max((pos - lo + size - 1) // size), 1)

  def chunk(c, carry):
    caches, _, _ = carry
    start = jnp.maximum(jnp.minimum(lo + c * size, pos - size), 0)   # the last chunk ends at pos - 1
    x = jax.vmap(lambda r, i: jax.lax.dynamic_slice_in_dim(r, i, size, 0))(state.src, start)
    positions = start[:, None] + jnp.arange(size)[None, :]
    hidden, caches = run_heads(args, heads, x, positions, jnp.ones_like(positions), caches, start)
    return caches, hidden.astype(state.src.dtype), start

  init = (caches, jnp.zeros((len(heads), pos.shape[0], size, args.d_model), state.src.dtype), jnp.zeros_like(pos))
  caches, hidden, start = jax.lax.fori_loop(0, chunks, chunk, init)
  key, sub = jax.random.split(state.key) if settings.sampling else (state.key, state.key)
  if settings.auto_tree:
    drafts, tree_tokens = chain_and_tree(model, w, hidden, pos - 1 - start, settings.static_tree())
    state = state.replace(tree_tokens=tree_tokens)
  else:
    drafts, logq, _ = draft_heads_at(model, w.params, w.draft_vocab, hidden, pos - 1 - start, sub, sp,
                                     settings.sampling)
  return state.replace(cache={**state.cache, "heads": None if held is None else held[:1] + caches}, key=key, drafts=drafts,
                       draft_logq=logq if settings.sampling else state.draft_logq,
                       stale=jnp.full_like(state.stale, STALE_NEVER), drafted=jnp.int32(settings.depths),
                       grows=state.grows + 1)


def _tree_step(model, w: Weights, settings: Settings, sp, state: DecodeState, budget: Budget = None) -> DecodeState:
  """One forward pass over every row's tree block [last token, the tree's nodes] (decode/tree.py). --draft=auto's
  tree budget too: its nodes are the tree tokens drafted beside the chain, and what they saw feeds the counts."""
  auto = settings.draft == "auto"
  nodes = state.tree_tokens if auto else state.drafts
  block = jnp.concatenate([take_at(state.tokens, state.count - 1)[:, None], nodes], axis=1)
  b = block.shape[0]
  if settings.draft == "bestfirst":
    trees = RowTrees.best_first(state.tree_sel, settings.candidates())
    mask = trees.ancestors
  else:
    tree = settings.static_tree()
    trees = RowTrees.static(tree, b)
    mask = tree.ancestors   # one static mask for every row
  positions = state.position[:, None] + trees.depth
  hidden, cache = forward_hidden(model, w, block, positions, state.cache, state.position, tree=(state.position, mask))
  p_logits = unembed(model, w.params, hidden[0])
  key, sub = jax.random.split(state.key) if settings.sampling else (state.key, state.key)
  best, a, token, chain, slots = tree_verify(p_logits, block, trees, sub, sp, settings.sampling)
  state = state.replace(cache=keep_path(cache, state.position, slots), steps=state.steps + 1, key=key,
                        budget_steps=state.budget_steps.at[-1].add(1))   # the tree's budget is the last
  drafter = _tree_drafter(model, w, settings, hidden[1:], best)
  seen = path_counts(trees, best, tree, settings.depths) if auto else None
  return _emit(settings, sp, state, p_logits, drafter, chain, None, state.key, ~state.done, budget if auto else None,
               (a, token), seen)


def _tree_drafter(model, w: Weights, settings: Settings, hidden, at=None):
  """The drafter of a tree step: the next tree's tokens from the draft heads' states hidden [D, B, k, d] at
  block index `at` (the accepted path's end; the prefill's: the drafter's own argument). --draft=auto: the chain
  and the static tree's tokens beside it (`DecodeState.tree_tokens`), so the next step may verify either."""
  if settings.draft == "auto":
    def draft(a, token, key):
      chain, nodes = chain_and_tree(model, w, hidden, a if at is None else at, settings.static_tree())
      return chain, None, {"tree_tokens": nodes}
    return draft
  if settings.draft == "bestfirst":
    def draft(a, token, key):
      tokens, sel = best_first_drafts(model, w, hidden, a if at is None else at, settings.candidates(),
                                      settings.block - 1)
      return tokens, None, {"tree_sel": sel}
    return draft
  return lambda a, token, key: (tree_drafts(model, w, hidden, a if at is None else at, settings.static_tree()),
                                None, None)


def _block_step(model, w: Weights, settings: Settings, sp, state: DecodeState, j: int, budget: Budget) -> DecodeState:
  """A step verifying the first j drafts (j static), with the heads that draft the next j (heads 0..j)."""
  k = j + 1
  last = take_at(state.tokens, state.count - 1)
  block = jnp.concatenate([last[:, None], state.drafts[:, :j]], axis=1)
  positions = state.position[:, None] + jnp.arange(k)[None, :]
  # --draft=auto: heads and their caches are tuples (`decode_weights(per_head=True)`): taking the first k copies nothing
  heads, caches = w.heads, state.cache["heads"]
  auto = settings.draft == "auto"
  w_k = w._replace(heads=heads[:k]) if auto else w
  cache = {**state.cache, "heads": caches[:k] if auto and caches is not None else caches}
  hidden, cache, z = forward_hidden(model, w_k, block, positions, cache, state.position, trunk_out=True)
  if auto:
    if caches is not None:
      cache["heads"] = cache["heads"] + caches[k:]
    # what the draft heads read here, kept for heads that missed it; heads j+1.. miss it from this block on
    src = hidden[0] if model.args.heads.chained else z
    write = jax.vmap(lambda r, u, i: jax.lax.dynamic_update_slice_in_dim(r, u, i, 0))
    missed = jnp.where((~state.done)[:, None], jnp.minimum(state.stale[:, j:], state.position[:, None]),
                       state.stale[:, j:])
    state = state.replace(src=write(state.src, src.astype(state.src.dtype), state.position),
                          stale=state.stale.at[:, j:].set(missed))
  key, sub = jax.random.split(state.key) if settings.sampling else (state.key, state.key)
  state = state.replace(cache=cache, key=key, steps=state.steps + 1, budget_steps=state.budget_steps.at[j].add(1))
  drafter = drafter_for(model, w_k, settings, sp, state, hidden, block, state.position, None, False)
  if settings.auto_tree and j == settings.depths:   # every head ran: draft the tree beside the chain
    drafter = _tree_drafter(model, w_k, settings, hidden[1:])
  logq = None if state.draft_logq is None else state.draft_logq[:, :j]
  return _emit(settings, sp, state, unembed(model, w.params, hidden[0]), drafter, state.drafts[:, :j], logq,
               sub, ~state.done, budget)


_TRACES = [0]


def decode(w: Weights, tokens, lengths, key, sp: SamplingParams, budget: Budget = None, *, model: MTPTransformer,
           settings: Settings) -> DecodeOutput:
  """The whole generation (jit this): w from `decode_weights`, tokens [N, P] right-padded prompts,
  lengths [N] their lengths. The loop decodes settings.batch(N) rows at once. budget: --draft=auto's
  costs and prior, and a step limit (default: none)."""
  _TRACES[0] += 1   # runs only while tracing: the tests count compilations with it
  n_prompts, b = tokens.shape[0], settings.batch(tokens.shape[0])
  budget = settings.budget() if budget is None else budget
  state = prefill(model, w, settings, sp, tokens[:b], lengths[:b], key, budget)
  # `slots` maps the loop's rows to the caller's prompts; `done_rows` collects every prompt's results
  # as its row finishes (refill) or its stage ends (compaction).
  slots = jnp.arange(b)
  done_rows = Results(*(jnp.zeros((n_prompts,) + getattr(state, f).shape[1:], getattr(state, f).dtype)
                        for f in Results._fields))
  row_steps = jnp.int32(b)
  if b < n_prompts:
    state, slots, done_rows, row_steps = _serve_queue(model, w, settings, sp, budget, tokens, lengths, state,
                                                      done_rows, row_steps)
  # Rows finish at different steps (EOS; in speculative modes each row accepts its own drafts), and a
  # finished row would ride along to the end, paying for a forward pass of its own at every step. So
  # once no prompt is waiting the loop runs in stages of halving batch size: once at most half of a
  # stage's rows are active, they move (cache and all) into the next stage's smaller batch.
  sizes = settings.stages(b)
  for size, next_size in zip(sizes, sizes[1:] + (0,)):
    # Each active step emits >= 1 token per active row, so max_new_tokens bounds the loop.
    began = state.steps
    cond = lambda s, nxt=next_size, began=began: ((jnp.sum(~s.done) > nxt) & (s.steps < budget.limit)
                                                  & (s.steps - began < settings.max_new_tokens))
    state = _steps_while(model, w, settings, sp, budget, cond, state)
    row_steps += size * (state.steps - began)
    done_rows = done_rows.record(slots, state)
    if next_size:
      keep = jnp.argsort(state.done, stable=True)[:next_size]   # the active rows first
      state, slots = select_rows(state, keep), slots[keep]
  n = settings.max_new_tokens
  out = jnp.where(jnp.arange(n)[None, :] < done_rows.count[:, None], done_rows.tokens[:, :n], PAD)
  return DecodeOutput(tokens=out, lengths=done_rows.count, forwards=done_rows.forwards, accepted=done_rows.accepted,
                      steps=state.steps, row_steps=row_steps, proposed=done_rows.proposed,
                      budget_steps=state.budget_steps, grows=state.grows, draft_counts=state.stats)


def _serve_queue(model, w, settings: Settings, sp, budget: Budget, tokens, lengths, state: DecodeState, done_rows,
                 row_steps):
  """Continuous batching: while prompts wait, run the batch until a row finishes, record that row and
  prefill the next prompt into it (a one-row prefill). Rows then never ride along finished while
  work waits, and no row waits for a slower one. Returns (state, slots, done_rows, row_steps) once
  every prompt has had a row; the last batch finishes in `decode`'s compaction stages.

  A row's tokens do not depend on which row it ran in or alongside what (argmax modes): each row
  attends to its own cache only, so the output is what decoding every prompt alone gives.
  """
  n_prompts, b = tokens.shape[0], state.count.shape[0]

  def serve_one(carry):
    state, slots, done_rows, row_steps, nxt = carry
    began = state.steps
    # One row's generation takes <= max_new_tokens steps, so the loop ends even without a done row.
    until_one_done = lambda s: ~jnp.any(s.done) & (s.steps - began < settings.max_new_tokens) & (s.steps < budget.limit)
    state = _steps_while(model, w, settings, sp, budget, until_one_done, state)
    r = jnp.argmax(state.done)                                           # a finished row
    finished = Results(*(getattr(state, f)[r][None] for f in Results._fields))
    done_rows = done_rows.record(slots[r][None], finished)
    fresh = prefill(model, w, settings, sp, jax.lax.dynamic_slice_in_dim(tokens, nxt, 1),
                    jax.lax.dynamic_slice_in_dim(lengths, nxt, 1), state.key, budget, state.budget)
    return (put_row(state, r, fresh), slots.at[r].set(nxt), done_rows, row_steps + b * (state.steps - began) + 1,
            nxt + 1)

  carry = (state, jnp.arange(b), done_rows, row_steps, jnp.int32(b))
  more = lambda c: (c[4] < n_prompts) & (c[0].steps < budget.limit)   # a limit: the host's timing runs
  state, slots, done_rows, row_steps, _ = jax.lax.while_loop(more, serve_one, carry)
  return state, slots, done_rows, row_steps


def trace_count() -> int:
  """How many times `decode` has been traced (= compiled) in this process."""
  return _TRACES[0]
