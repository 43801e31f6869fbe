"""--draft=auto: the draft length chosen per step from the step costs and the acceptance so far. It gives
greedy's tokens exactly (batch 1, a batch, continuous batching), keeps sampling's distribution, drafts nothing
where drafting does not pay, and refuses what cannot work in one line."""
import os
import subprocess
import sys

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
  stats = jnp.array([[10.0, 10.0, 10.0], [9.0, 5.0, 0.0]])        # depth rates 0.9, 0.5, 0
  pick = lambda costs, most=3, s=stats: int(decode.choose_budget(jnp.array(costs), s, most))
  assert pick([1, 1, 1, 1]) == 2                  # free drafts: up to the last depth that is ever accepted
  assert pick([1, 1.5, 2.5, 3.0]) == 1            # 1.9 / 1.5 beats 2.4 / 2.5
  assert pick([1, 1.5, 2.5, 3.0], most=0) == 0    # never past `most`
  assert pick([1, 2.0, 3.0, 4.0]) == 0            # 1.9 tokens for the cost of 2: greedy
  assert pick([1, 1, 1, 1], s=jnp.array([[5.0] * 3, [0.0] * 3])) == 0   # nothing accepted: greedy


@pytest.mark.parametrize("head_type", ["parallel", "causal"])
def test_auto_and_chain_equal_greedy(head_type):
  """Batch 1, a batch of three, and two rows serving six prompts: chain and auto (a sloped cost table, under
  which the budget falls during the run, and the timed one) give greedy's tokens."""
  model, params = tiny_decoder(n=4, head_type=head_type, shared=True)
  for prompts, slots in (([MIXED[1]], None), (MIXED, None), (MIXED * 2, 2)):
    g = decode_run(model, params, prompts, "greedy", slots=slots)
    for kw in (dict(draft="chain"), dict(draft="auto", draft_costs=SLOPED), dict(draft="auto")):
      s = decode_run(model, params, prompts, "speculative", slots=slots, **kw)
      check_same(g, s, 24)
      assert int(s.budget_steps.sum()) == int(s.steps)
      assert np.all(s.accepted <= s.proposed) and np.all(s.proposed <= s.forwards[:, None] - 1)
      if kw["draft"] == "chain":
        np.testing.assert_array_equal(s.proposed, np.repeat(s.forwards[:, None] - 1, 3, axis=1))
  s = decode_run(model, params, MIXED, "speculative", draft="auto", draft_costs=SLOPED)
  assert s.budget_steps[2] > 0 and s.budget_steps[:2].sum() > 0, s.budget_steps   # it started at 2, then fell


@pytest.mark.parametrize("costs,prior", [([1.0, 10.0, 10.0, 10.0], None),            # verify steps cost too much
                                         ([1.0, 1.01, 1.02, 1.03], [[100] * 3, [0] * 3])])   # nothing accepted
def test_auto_drafts_nothing_where_drafting_does_not_pay(costs, prior):
  model, params = tiny_decoder(n=4, shared=True)
  g = decode_run(model, params, MIXED, "greedy")
  s = decode_run(model, params, MIXED, "speculative", draft="auto", draft_costs=costs, draft_prior=prior)
  check_same(g, s, 24)
  np.testing.assert_array_equal(s.forwards, g.forwards)              # one token per forward, as greedy
  assert int(s.budget_steps[0]) == int(s.steps) and s.proposed.sum() == 0


def test_auto_speculative_sample_keeps_the_distribution():
  """The budget falls from 2 drafts to 1 after the first step; the first three tokens keep sample's law."""
  v, rows, prompt = 8, 16384, [1, 2]
  model, params = tiny_decoder(n=3, vocab=v)
  exact, _ = exact_joint(model, params, prompt, 1.0, 0, 1.0)
  out = decode_run(model, params, [prompt] * rows, "speculative_sample", max_new_tokens=3, bucket=2, seed=4,
                   draft="auto", draft_costs=[1.0, 1.3, 1.9])
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
    (dict(draft="bushy"), "draft='bushy': choose one of chain, auto, tree"),
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
                      (["--workdir=/tmp", "--mode=speculative", "--draft=bushy"], "--draft='bushy': choose one of")):
    proc = cli(*args)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1 and match in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- --draft=tree

@pytest.mark.parametrize("window", [0, 8])
def test_tree_equals_greedy(monkeypatch, window):
  """A static tree of the heads' top choices: greedy's tokens at batch 1, in a batch whose rows end at EOS (and
  leave it), and two rows serving six prompts; fewer forward passes than the chain with copied heads. window=8:
  steps read the cache in windows of 8 slots, which must reach the tree's last slot."""
  from mtp_jax import attention as attention_lib
  monkeypatch.setattr(attention_lib, "CACHE_WINDOW", window)
  decode.clear_compiled()
  model, params = tiny_decoder(n=4, shared=True)
  for prompts, slots, eos in (([MIXED[1]], None, None), (MIXED * 2, None, 26), (MIXED * 2, 2, None)):
    g = decode_run(model, params, prompts, "greedy", slots=slots, eos_id=eos)
    t = decode_run(model, params, prompts, "speculative", slots=slots, eos_id=eos, draft="tree")
    check_same(g, t, 24)
    assert int(t.budget_steps[-1]) == int(t.steps) and t.accepted.shape == (len(prompts), 3)
  chain = decode_run(model, params, MIXED, "speculative", draft="chain")
  tree = decode_run(model, params, MIXED, "speculative", draft="tree")
  decode.clear_compiled()
  assert tree.forwards.sum() < chain.forwards.sum(), (tree.forwards, chain.forwards)


def test_tree_shape_and_refusals():
  t = decode.Tree.of(2)                       # depth 1: three choices; depth 2: two children of the argmax, one of
  assert t.depth.tolist() == [0, 1, 1, 1, 2, 2, 2] and t.choice.tolist() == [0, 0, 1, 2, 0, 1, 0]   # the second
  assert t.path[5].tolist() == [0, 1, 5] and t.ancestors[5].tolist() == [True, True, False, False, False, True, False]
  model, params = tiny_decoder(n=3)
  with pytest.raises(decode.DecodeError, match="draft=tree verifies greedily"):
    decode_run(model, params, MIXED, "speculative_sample", draft="tree")
