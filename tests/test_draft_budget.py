"""--draft=auto: the draft length chosen per step from the step costs and the acceptance so far. It gives
greedy's tokens exactly (batch 1, a batch, continuous batching), keeps sampling's distribution, drafts nothing
where drafting does not pay, and refuses what cannot work in one line."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtp_jax import decode
from mtp_jax.generate import generate, summarize

from helpers import MIXED, ROOT, bytes_workdir, check_same, chi2_pvalue, decode_run, exact_joint, tiny_config, tiny_decoder

# A step of j drafts costs C(j) greedy steps: with every draft accepted 2 drafts pay most, and as acceptance
# falls the loop moves to 1 or 0 (the random model's heads rarely agree with head 0).
SLOPED = [1.0, 1.2, 1.5, 2.5]


def test_choose_budget():
  stats = jnp.array([[10.0, 10.0, 10.0], [9.0, 5.0, 0.0]])        # conditional rates 0.9, 0.5, 0
  none = jnp.zeros((2, 3))
  pick = lambda costs, most=3, s=stats, prior=none: int(decode.choose_budget(jnp.array(costs), s, prior, most))
  assert pick([1, 1, 1, 1]) == 2                  # free drafts: up to the last depth that is ever accepted
  assert pick([1, 1.5, 2.5, 3.0]) == 1            # 1.9 / 1.5 beats 2.35 / 2.5
  assert pick([1, 1.5, 2.5, 3.0], most=0) == 0    # never past `most`
  assert pick([1, 2.0, 3.0, 4.0]) == 0            # 1.9 tokens for the cost of 2: greedy
  assert pick([1, 1, 1, 1], s=jnp.array([[5.0] * 3, [0.0] * 3])) == 0   # nothing accepted: greedy
  # an unobserved depth counts at the prior's rate, behind the observed ones: 0.9 * 0.5 * 0.5 more at depth 3
  prior = jnp.array([[1.0] * 3, [0.5] * 3])
  assert pick([1, 1, 1, 1.1], s=jnp.array([[10.0, 10.0, 0.0], [9.0, 9.0, 0.0]]), prior=prior) == 3
  assert pick([1, 1, 1, 1.3], s=jnp.array([[10.0, 10.0, 0.0], [9.0, 9.0, 0.0]]), prior=prior) == 2


def test_auto_and_chain_equal_greedy():
  """Batch 1, a batch of three, and two rows serving six prompts: chain and auto (a sloped cost table, under
  which the budget falls during the run, and the timed one) give greedy's tokens. (Causal heads: the chain in
  test_decode.py, auto in the test below.)"""
  model, params = tiny_decoder(n=4, shared=True)
  for prompts, slots in (([MIXED[1]], None), (MIXED, None), (MIXED * 2, 2)):
    g = decode_run(model, params, prompts, "greedy", slots=slots)
    timed = [dict(draft="auto")] if slots else []   # the cost timing: once is enough
    for kw in [dict(draft="chain"), dict(draft="auto", draft_costs=SLOPED)] + timed:
      s = decode_run(model, params, prompts, "speculative", slots=slots, **kw)
      check_same(g, s, 24)
      assert int(s.budget_steps.sum()) == int(s.steps)
      assert np.all(s.accepted <= s.proposed) and np.all(s.proposed <= s.forwards[:, None] - 1)
      if kw["draft"] == "chain":
        np.testing.assert_array_equal(s.proposed, np.repeat(s.forwards[:, None] - 1, 3, axis=1))
  s = decode_run(model, params, MIXED, "speculative", draft="auto", draft_costs=SLOPED, draft_prior=[[4] * 3, [4] * 3])
  assert s.budget_steps[2] > 0 and s.budget_steps[:2].sum() > 0, s.budget_steps   # it started at 2, then fell


@pytest.mark.parametrize("head_type", ["parallel", "causal", "linear"])
def test_auto_grows_back_and_stays_exact(head_type):
  """Counts that fade fast and forget in 3 steps: the budget falls, grows back (the heads catching up), and
  falls again, many times; every output is greedy's, at batch 1, a batch and with continuous batching. Linear
  heads (the default recipe's) hold no cache: they catch up by reading the trunk's output at the last position.
  Causal and linear heads run the continuous-batching case only (the one that compacts and refills their caches):
  their batch-1 and plain-batch programs differ from parallel heads' by the heads alone, which that case runs."""
  model, params = tiny_decoder(n=4, head_type=head_type)
  cases = (([MIXED[1]], None), (MIXED, None), (MIXED * 2, 2))
  for prompts, slots in cases if head_type == "parallel" else cases[2:]:
    g = decode_run(model, params, prompts, "greedy", slots=slots, max_new_tokens=40)
    s = decode_run(model, params, prompts, "speculative", slots=slots, max_new_tokens=40, draft="auto",
                   draft_costs=[1.0, 1.05, 1.1, 1.15], draft_decay=0.5, draft_explore=3)
    check_same(g, s, 40)
    assert int(s.budget_steps.sum()) == int(s.steps)
    if len(prompts) > 1:
      # (the random linear heads' acceptance lets the budget grow back once in this run, the others' twice or more)
      assert int(s.grows) >= 1 + (head_type != "linear") and s.budget_steps[:3].sum() > 0 and \
          s.budget_steps[1:].sum() > 0, s.budget_steps


def test_choose_budget_with_a_tree():
  """Auto's tree (static, depth 2: three choices, then two children of the argmax and one of the second) is one
  more budget, scored by its expected tokens: the argmax path at the chain's rates, the other nodes at their own
  counts (or the prior)."""
  tree = decode.Tree.of(2)
  chain = jnp.array([[10.0, 10.0], [8.0, 5.0]])                            # q = 0.8, 0.5
  none = jnp.zeros((2, 2))
  alts = jnp.zeros((2, 6)).at[:, 1].set(jnp.array([10.0, 5.0]))           # the second choice at depth 1: 5 of 10
  second = (5 + 0.5) / (10 + 1)                                             # over the prior's 0.5 of 1
  # the argmax path 0.8 + 0.8 * 0.5; the second choice, and its child at the prior's 0.5; the third choice and the
  # argmax's second child at the prior
  want = 1 + 0.8 + 0.8 * 0.5 + second + second * 0.5 + 0.5 + 0.8 * 0.5
  np.testing.assert_allclose(float(decode.types.tree_gain(chain[1] / chain[0], tree, alts)), want, rtol=1e-5)
  pick = lambda costs, stats=alts: int(decode.choose_budget(jnp.array(costs), chain, none, 2, tree, stats))
  assert pick([1, 1, 1, 1]) == 3                 # as cheap as a chain: the tree, which holds the chain
  assert pick([1, 1.1, 1.2, 1.9]) == 3           # 3.85 / 1.9 beats 2.2 / 1.2
  assert pick([1, 1.1, 1.2, 2.2]) == 2           # 3.85 / 2.2 does not
  assert pick([1, 1.1, 1.2, 1.9], jnp.zeros((2, 6)).at[:, 1].set(jnp.array([10.0, 0.0]))) == 2   # a useless second


@pytest.mark.parametrize("head_type", ["parallel", "linear", "causal"])
def test_auto_with_a_tree_equals_greedy(head_type):
  """--draft=auto with a tree of 9 nodes among its budgets, counts that fade fast and forget in 3 steps, and
  costs under which tree, chains and greedy steps all win in turn: the loop moves between tree steps, chains
  of every length and catch-ups, and every output is greedy's (batch 1, a batch, continuous batching; causal
  and linear heads, the continuous-batching case only, which compacts and refills their caches)."""
  model, params = tiny_decoder(n=4, head_type=head_type)
  cases = (([MIXED[1]], None), (MIXED, None), (MIXED * 2, 2))
  for prompts, slots in cases if head_type == "parallel" else cases[2:]:
    g = decode_run(model, params, prompts, "greedy", slots=slots, max_new_tokens=40)
    s = decode_run(model, params, prompts, "speculative", slots=slots, max_new_tokens=40, draft="auto", tree_nodes=9,
                   draft_costs=[1.0, 1.05, 1.1, 1.15, 2.0], draft_decay=0.5, draft_explore=3)
    check_same(g, s, 40)
    assert s.budget_steps.shape == (5,) and int(s.budget_steps.sum()) == int(s.steps)
    assert s.budget_steps[4] > 0 and s.budget_steps[1:4].sum() > 0 and int(s.grows) >= 1, s.budget_steps
  # where a tree step costs what a chain's does, auto verifies the tree: greedy's tokens in fewer forward passes
  model, params = tiny_decoder(n=4, shared=True)
  g = decode_run(model, params, MIXED, "greedy")
  tree = decode_run(model, params, MIXED, "speculative", draft="auto", tree_nodes=9, draft_costs=[1.0] * 5)
  chain = decode_run(model, params, MIXED, "speculative", draft="chain")
  check_same(g, tree, 24)
  assert int(tree.budget_steps[4]) == int(tree.steps) - 1 and tree.forwards.sum() < chain.forwards.sum()


def test_auto_tree_defaults_and_refusals(monkeypatch):
  """Unset, auto has a tree on an accelerator (the whole static tree) and none on a CPU; a tree for auto must fit
  the static tree, suits mode=speculative only, and its cost table needs one more entry."""
  model, params = tiny_decoder(n=4)
  args, request = model.args, decode.Request("speculative", 24)
  assert request.settings(args).auto_tree == 0
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert request.settings(args).auto_tree == 9 and request.settings(args).options == 5
  assert decode.Request("speculative", 24, draft="auto", tree_nodes=0).settings(args).auto_tree == 0
  assert decode.Request("speculative_sample", 24).settings(args).auto_tree == 0
  monkeypatch.undo()
  for kw, match in ((dict(tree_nodes=10), "tree_nodes=10: the static tree has 9 nodes at 3 draft depths"),
                    (dict(tree_nodes=-1), "tree_nodes=-1: must be an integer >= 0"),
                    (dict(tree_nodes=4, mode="speculative_sample"), "mode=speculative_sample samples its drafts"),
                    (dict(tree_nodes=4, draft_costs=[1.0] * 4), r"draft_costs has shape \(4,\).*takes 5 costs")):
    with pytest.raises(decode.DecodeError, match=match):
      decode_run(model, params, MIXED, **{"mode": "speculative", "draft": "auto", **kw})


def test_auto_probes_where_the_prior_would_never_draft():
  """Verify steps that cost 10 greedy steps: auto drafts nothing but probes, at the first step and every
  `explore` steps without a draft (a catch-up and a step of every draft), so heads better than the prior are
  found again."""
  model, params = tiny_decoder(n=4, shared=True)
  g = decode_run(model, params, MIXED, "greedy", max_new_tokens=40)
  s = decode_run(model, params, MIXED, "speculative", max_new_tokens=40, draft="auto",
                 draft_costs=[1.0, 10.0, 10.0, 10.0], draft_explore=8)
  check_same(g, s, 40)
  probes = int(s.budget_steps[3])   # the first step, then one every 8 steps without a draft
  assert 3 <= probes <= s.steps // 6 and int(s.grows) == probes - 1, s.budget_steps
  assert s.budget_steps[1:3].sum() == 0


def test_heads_that_catch_up_hold_the_caches_they_would_have_written():
  """Heads 1..3 copies of head 0 (all read the trunk's output): after greedy steps without them and a grow, their
  caches equal head 0's at every position before the rows' own, and each drafts head 0's token there, the
  token just emitted."""
  from mtp_jax.decode import loop
  model, params = tiny_decoder(n=4, shared=True)
  settings = decode.Settings("speculative", 24, 4, draft="auto")
  w = decode.decode_weights(params, model.args, settings.heads_run, per_head=True)
  tokens, lengths = map(jnp.asarray, decode.pad_prompts(MIXED, 16))
  greedy_only = decode.Budget.of(3, costs=[1.0, 1e9, 1e9, 1e9], explore=0)   # never drafts, no probe: heads stop at once
  sp = decode.SamplingParams.of()
  state = jax.jit(lambda t, n: decode.prefill(model, w, settings, sp, t, n, jax.random.key(0), greedy_only))(
      tokens, lengths)
  step = jax.jit(lambda s: decode.step(model, w, settings, sp, s, greedy_only))
  for _ in range(int(loop.CATCH_UP * 1.5)):      # more than a chunk missed: the catch-up runs in two
    state = step(state)
  assert int(state.drafted) == 0 and np.all(np.asarray(state.stale) == np.asarray(lengths)[:, None])   # missed from there
  grown = jax.jit(lambda s: loop._grow(model, w, settings, sp, s))(state.replace(budget=jnp.int32(3)))
  assert int(grown.drafted) == 3 and int(grown.grows) == 1
  heads, pos = grown.cache["heads"], np.asarray(state.position)
  for i in (1, 2, 3):
    for kv in (0, 1):
      for r, p in enumerate(pos):
        np.testing.assert_allclose(np.asarray(heads[i][kv][r, :, :p]), np.asarray(heads[0][kv][r, :, :p]),
                                   rtol=1e-4, atol=1e-5)
  last = np.asarray(jnp.take_along_axis(state.tokens, state.count[:, None] - 1, axis=1))
  np.testing.assert_array_equal(np.asarray(grown.drafts), np.repeat(last, 3, axis=1))


@pytest.mark.parametrize("costs,prior", [([1.0, 10.0, 10.0, 10.0], None),            # verify steps cost too much
                                         ([1.0, 1.01, 1.02, 1.03], [[100] * 3, [0] * 3])])   # nothing accepted
def test_auto_drafts_nothing_where_drafting_does_not_pay(costs, prior):
  model, params = tiny_decoder(n=4, shared=True)
  g = decode_run(model, params, MIXED, "greedy")
  s = decode_run(model, params, MIXED, "speculative", draft="auto", draft_costs=costs, draft_prior=prior,
                 draft_explore=0)   # no probes
  check_same(g, s, 24)
  np.testing.assert_array_equal(s.forwards, g.forwards)              # one token per forward, as greedy
  assert int(s.budget_steps[0]) == int(s.steps) and s.proposed.sum() == 0


def test_auto_carries_its_counts_across_calls():
  """A call's draft_counts start the next one: counts that say drafting does not pay give a first step with
  no probe and no draft heads in the prefill (greedy's forwards); counts that say it pays draft from the
  first step; either way the output is greedy's."""
  model, params = tiny_decoder(n=4, shared=True)
  g = decode_run(model, params, MIXED, "greedy")
  first = decode_run(model, params, MIXED, "speculative", draft="auto", draft_costs=SLOPED)
  assert first.draft_counts.shape == (2, 3) and np.all(first.draft_counts >= 0)
  assert np.all(first.draft_counts[1] <= first.draft_counts[0])
  again = decode_run(model, params, MIXED, "speculative", draft="auto", draft_costs=SLOPED,
                     draft_counts=first.draft_counts)
  check_same(g, again, 24)
  free = [1.0, 1.01, 1.02, 1.03]
  never = decode_run(model, params, MIXED, "speculative", draft="auto", draft_costs=free,
                     draft_counts=[[100.0] * 3, [0.0] * 3])
  check_same(g, never, 24)
  np.testing.assert_array_equal(never.forwards, g.forwards)
  assert int(never.budget_steps[0]) == int(never.steps) and never.proposed.sum() == 0
  always = decode_run(model, params, MIXED, "speculative", draft="auto", draft_costs=free,
                      draft_counts=[[100.0] * 3, [100.0] * 3])
  check_same(g, always, 24)
  assert int(always.budget_steps[3]) > 0 and int(always.grows) == 0   # drafting from the start: nothing to catch up
  for kw, match in ((dict(draft="chain"), "draft_counts carries --draft=auto's"),
                    (dict(draft="auto", draft_heads=3), r"shape \(2, 3\), this program drafts up to 2")):
    with pytest.raises(decode.DecodeError, match=match):
      decode_run(model, params, MIXED, "speculative", draft_counts=np.zeros((2, 3)), **kw)


def test_auto_speculative_sample_keeps_the_distribution():
  """The budget falls from 2 drafts to 1 after the first step; the first three tokens keep sample's law."""
  v, rows, prompt = 8, 16384, [1, 2]
  model, params = tiny_decoder(n=3, vocab=v)
  exact, _ = exact_joint(model, params, prompt, 1.0, 0, 1.0)
  out = decode_run(model, params, [prompt] * rows, "speculative_sample", max_new_tokens=3, bucket=2, seed=4,
                   draft="auto", draft_costs=[1.0, 1.3, 1.9], draft_prior=[[4, 4], [4, 4]])
  assert out.budget_steps[2] >= 1 and out.budget_steps[1] >= 1, out.budget_steps
  assert chi2_pvalue((out.tokens[:, 0] * v + out.tokens[:, 1]) * v + out.tokens[:, 2], exact) > 1e-4


def test_generate_reports_the_budget():
  model, params = tiny_decoder(n=4, shared=True)
  config = tiny_config(vocab_size=48, n_future=4, n_layers=5)
  res = generate(params, config, MIXED, mode="speculative", max_new_tokens=8, draft="auto")
  s = res[0]["stats"]
  assert len(s["batch_draft_costs"]) == 4 and s["batch_draft_costs"][0] == 1.0
  assert sum(s["batch_draft_budget_steps"]) == s["batch_forward_passes"] - 1
  assert len(s["draft_proposed"]) == 3 and s["accepted_per_step"] >= 0
  assert len(summarize(res)["acceptance_rate"]) == 3


@pytest.mark.parametrize("kw,match", [
    (dict(draft="bushy"), "draft='bushy': choose one of chain, auto, tree, bestfirst"),
    (dict(mode="greedy", draft="auto"), "mode=greedy drafts nothing"),
])
def test_bad_draft_options(kw, match):
  model, params = tiny_decoder(n=4)
  with pytest.raises(decode.DecodeError, match=match):
    decode_run(model, params, MIXED, **{"mode": "speculative", **kw})


def test_auto_refused_without_draft_heads_or_for_sequential_modules():
  for n, head_type, match in ((1, "parallel", "this model has none"), (3, "sequential", "in a chain only")):
    model, params = tiny_decoder(n=n, head_type=head_type)
    with pytest.raises(decode.DecodeError, match=match):
      decode_run(model, params, MIXED, "speculative", draft="auto")
  model, params = tiny_decoder(n=1)                                     # the default there is a chain
  check_same(decode_run(model, params, MIXED, "greedy"), decode_run(model, params, MIXED, "speculative"), 24)


def test_cli_draft_errors_are_one_line(tmp_path):
  bytes_workdir(tmp_path / "one_head", vocab_size=258, n_future=1)
  cli = lambda *a: subprocess.run([sys.executable, "-m", "mtp_jax.generate", "--prompt=abc", "--max_new_tokens=4",
                                   *a], cwd=ROOT, capture_output=True, text=True,
                                  env={**os.environ, "JAX_PLATFORMS": "cpu"})
  for args, match in (([f"--workdir={tmp_path / 'one_head'}", "--mode=speculative", "--draft=auto"],
                       "draft=auto chooses how many draft heads draft, but this model has none"),
                      (["--workdir=/tmp", "--mode=speculative", "--draft=bushy"], "--draft='bushy': choose one of"),
                      (["--workdir=/tmp", "--mode=speculative", "--draft=chain", "--tree_nodes=4"],
                       "--tree_nodes=4 sizes a tree, but --draft=chain")):
    proc = cli(*args)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1 and match in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- --draft=tree

@pytest.mark.parametrize("kind,window", [("tree", 0), ("tree", 8), ("bestfirst", 0), ("bestfirst", 8)])
def test_tree_equals_greedy(monkeypatch, kind, window):
  """A static tree of the heads' top choices, or each row's most probable tree: greedy's tokens at batch 1, in a
  batch whose rows end at EOS (and leave it), and two rows serving six prompts; fewer forward passes than the
  chain with copied heads. window=8: steps read the cache in windows of 8 slots, which must reach the tree's
  last slot."""
  from mtp_jax import attention as attention_lib
  monkeypatch.setattr(attention_lib, "CACHE_WINDOW", window)
  decode.clear_compiled()
  model, params = tiny_decoder(n=4, shared=True)
  cases = (([MIXED[1]], None, None), (MIXED * 2, None, 26), (MIXED * 2, 2, None))
  for prompts, slots, eos in cases if not window else cases[1:2]:   # windows: the batch with EOS shows them
    g = decode_run(model, params, prompts, "greedy", slots=slots, eos_id=eos)
    t = decode_run(model, params, prompts, "speculative", slots=slots, eos_id=eos, draft=kind)
    check_same(g, t, 24)
    assert int(t.budget_steps[-1]) == int(t.steps) and t.accepted.shape == (len(prompts), 3)
  if not window:
    chain = decode_run(model, params, MIXED, "speculative", draft="chain")
    tree = decode_run(model, params, MIXED, "speculative", draft=kind)
    assert tree.forwards.sum() < chain.forwards.sum(), (tree.forwards, chain.forwards)
  decode.clear_compiled()


def test_tree_budgets_equal_greedy():
  """--tree_nodes / --tree_top: a static tree cut to its first paths, and a best-first tree larger than the default
  over fewer choices per head, in a batch whose rows end at EOS: greedy's tokens."""
  model, params = tiny_decoder(n=4, shared=True)
  g = decode_run(model, params, MIXED * 2, "greedy", eos_id=26)
  for kind, nodes, top in (("tree", 4, None), ("bestfirst", 20, 3)):
    assert decode.Request("speculative", 24, draft=kind, tree_nodes=nodes, tree_top=top).settings(
        model.args).block == nodes + 1
    t = decode_run(model, params, MIXED * 2, "speculative", eos_id=26, draft=kind, tree_nodes=nodes, tree_top=top)
    check_same(g, t, 24)


@pytest.mark.parametrize("kw,match", [
    (dict(draft="chain", tree_nodes=4), "tree_nodes=4 sizes a tree, but draft=chain: use draft=tree or draft=bestfirst"),
    (dict(draft="tree", tree_top=2), "tree_top=2 sizes a tree, but draft=tree: use draft=bestfirst"),
    (dict(draft="bestfirst", tree_nodes=0), "tree_nodes=0: must be a positive integer"),
    (dict(draft="tree", tree_nodes=10), "tree_nodes=10: the static tree has 9 nodes at 3 draft depths"),
    (dict(draft="bestfirst", tree_nodes=15, tree_top=2), r"tree_nodes=15: at most 14 nodes \(the paths of 1..3"),
    (dict(draft="bestfirst", tree_top=49), "tree_top=49: at most 32 choices per head"),
])
def test_tree_budget_refusals(kw, match):
  model, params = tiny_decoder(n=4, vocab=48)
  with pytest.raises(decode.DecodeError, match=match):
    decode_run(model, params, MIXED, "speculative", **kw)


def test_tree_shape_and_refusals():
  t = decode.Tree.of(2)                       # depth 1: three choices; depth 2: two children of the argmax, one of
  assert t.depth.tolist() == [0, 1, 1, 1, 2, 2, 2] and t.choice.tolist() == [0, 0, 1, 2, 0, 1, 0]   # the second
  assert t.path[5].tolist() == [0, 1, 5] and t.ancestors[5].tolist() == [True, True, False, False, False, True, False]


def test_best_first_trees_are_trees():
  """Candidates chosen as the static tree's paths give the static tree exactly: depths, masks and paths."""
  from mtp_jax.decode.tree import RowTrees
  cands, static = decode.Candidates.of(2, 4), decode.Tree.of(2)
  index = {tuple(int(cands.choice[cands.path[i, e]]) for e in range(d)): i for i, d in enumerate(cands.depth)}
  sel = jnp.array([[index[p] for p in decode.types.TREE_PATHS if len(p) <= 2]] * 2)
  rows, want = RowTrees.best_first(sel, cands), RowTrees.static(static, 2)
  for got, exp in zip(rows, want):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(exp))


@pytest.mark.parametrize("kind,temperature,top_k,top_p", [("tree", 1.0, 0, 1.0), ("tree", 0.6, 3, 1.0),
                                                          ("tree", 1.3, 0, 0.8), ("bestfirst", 1.0, 0, 1.0),
                                                          ("bestfirst", 0.6, 3, 1.0)])
def test_tree_speculative_sample_keeps_the_distribution(kind, temperature, top_k, top_p):
  """Multi-draft rejection sampling over the tree (static: three choices at depth 1; best-first: each row's six
  most probable paths; a vocabulary of 8): the first three tokens follow sample's exact law, also where top-k
  leaves the candidates all the mass."""
  v, rows, prompt = 8, 16384, [1, 2]
  model, params = tiny_decoder(n=3, vocab=v)
  exact, _ = exact_joint(model, params, prompt, temperature, top_k, top_p)
  out = decode_run(model, params, [prompt] * rows, "speculative_sample", max_new_tokens=3, bucket=2, seed=5,
                   draft=kind, temperature=temperature, top_k=top_k, top_p=top_p)
  assert out.accepted[:, 0].sum() > rows // 4 and out.accepted[:, 1].sum() > 0, out.accepted.sum(0)   # trees paid
  assert chi2_pvalue((out.tokens[:, 0] * v + out.tokens[:, 1]) * v + out.tokens[:, 2], exact) > 1e-4
