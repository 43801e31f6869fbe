"""Decoding: the KV cache against the full forward, speculative == greedy token for token,
speculative sampling == sampling in distribution, one compile per shape, and clear input errors."""
import collections
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtp_jax import decode
from mtp_jax.decode import DecodeError
from mtp_jax.errors import UserError
from mtp_jax.generate import generate, load_workdir, summarize
from mtp_jax.model import init_cache

from helpers import (MIXED, ROOT, bytes_workdir, check_same, chi2_pvalue, decode_run, exact_joint, tiny_config,
                     tiny_decoder)
from tolerances import assert_close, network_k

HEAD_TYPES = ["parallel", "causal", "linear"]


# ----------------------------------------------------------------------------- the cache

def _model_cached(model, params):
  """The model's own forward with a cache: every head's logits [n, B, k, V]."""
  return (lambda toks, pos, cache, prefill: model.apply({"params": params}, toks, pos, None, cache=cache,
                                                       cache_index=pos[:, 0]),
          init_cache(model.args, 2, 16))


def _decoder_cached(model, params):
  """The decode loop's forward (unrolled trunk, stacked heads; a prefill attends within the prompt)
  + the shared unembedding."""
  w = decode.decode_weights(params, model.args, model.args.n_future)

  def apply(toks, pos, cache, prefill):
    hidden, cache = decode.forward_hidden(model, w, toks, pos, cache, pos[:, 0], prefill=prefill)
    return decode.unembed(model, params, hidden), cache
  return apply, decode.init_decode_cache(model.args, 2, 16, model.args.n_future)


@pytest.mark.parametrize("path", [_model_cached, _decoder_cached])
@pytest.mark.parametrize("head_type,window", [(h, 64) for h in HEAD_TYPES] + [("parallel", 4)])
def test_cached_forward_matches_full_forward(monkeypatch, head_type, window, path):
  """Prefill (right-padded, rows of different lengths), single steps and a multi-token block, against
  the uncached forward of the whole sequence, for every head: the model's cached forward and the
  decode loop's own (which rearranges the weights). window=4: a step reads the 16-slot cache in
  windows of 4 slots (rows at different positions: the window covers the furthest)."""
  from mtp_jax import attention as attention_lib
  monkeypatch.setattr(attention_lib, "CACHE_WINDOW", window)
  model, params = tiny_decoder(n=3, head_type=head_type)
  seqs = jax.random.randint(jax.random.key(1), (2, 12), 0, 48)
  full, _ = model.apply({"params": params}, seqs)                         # [n, B, T, V]
  lengths = np.array([5, 3])
  padded = np.where(np.arange(6)[None] < lengths[:, None], seqs[:, :6], 47)   # junk past each prompt
  fn, cache = path(model, params)
  apply = jax.jit(fn, static_argnums=3)
  k = network_k(tiny_config(vocab_size=48, n_future=3, n_layers=4), 0, 12)    # forward only, nothing summed over rows
  logits, cache = apply(jnp.asarray(padded), jnp.broadcast_to(jnp.arange(6), (2, 6)), cache, True)
  for b, l in enumerate(lengths):
    assert_close(logits[:, b, :l], full[:, b, :l], k)
  pos = lengths.copy()
  for _ in range(3):                                                      # single-token steps
    logits, cache = apply(seqs[np.arange(2), pos][:, None], jnp.asarray(pos)[:, None], cache, False)
    assert_close(logits[:, :, 0], full[:, np.arange(2), pos], k)
    pos += 1
  idx = pos[:, None] + np.arange(3)[None]                                 # a 3-token block
  logits, cache = apply(jnp.take_along_axis(seqs, jnp.asarray(idx), 1), jnp.asarray(idx), cache, False)
  for b in range(2):
    assert_close(logits[:, b], full[:, b, idx[b]], k)


def test_greedy_matches_uncached_argmax_loop():
  """The cached greedy decoder against the obvious reference: re-run the whole sequence per token."""
  model, params = tiny_decoder(n=2)
  out = decode_run(model, params, MIXED, "greedy", max_new_tokens=10)
  forward = jax.jit(lambda toks: model.apply({"params": params}, toks)[0][0])   # head 0, [B, T, V]
  seqs, lengths = decode.pad_prompts(MIXED, 20)                    # causal: padding after a row is harmless
  for _ in range(10):
    nxt = np.argmax(forward(seqs)[np.arange(3), lengths - 1], axis=-1)
    seqs[np.arange(3), lengths] = nxt
    lengths += 1
  for b, prompt in enumerate(MIXED):
    assert out.tokens[b].tolist() == seqs[b, len(prompt):len(prompt) + 10].tolist()


# ----------------------------------------------------------------------------- speculative == greedy

@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_speculative_equals_greedy(n, head_type):
  accepted = {}
  for shared in (False, True):
    model, params = tiny_decoder(n=n, head_type=head_type, shared=shared)
    for prompts in (MIXED, [[7, 3, 5, 1]]):                # batch > 1 with mixed lengths, and batch 1
      g = decode_run(model, params, prompts, "greedy")
      s = decode_run(model, params, prompts, "speculative", draft="chain")   # auto: tests/test_draft_budget.py
      check_same(g, s, 24)
      assert s.accepted.shape == (len(prompts), n - 1)
      accepted[shared] = accepted.get(shared, 0) + s.accepted.sum()
      # Across EOS: stop at a token greedy emits mid-way in row 0.
      eos = int(g.tokens[0, 5])
      g2 = decode_run(model, params, prompts, "greedy", eos_id=eos)
      s2 = decode_run(model, params, prompts, "speculative", eos_id=eos, draft="chain")
      check_same(g2, s2, 24)
      first = g.tokens[0].tolist().index(eos)
      assert g2.tokens[0].tolist() == g.tokens[0, :first + 1].tolist() + [decode.PAD] * (23 - first)
  assert accepted[True] > 0, "copied heads should get some drafts accepted, or the accept path is untested"


def _chain(mode):
  """A fixed chain: each row's forward passes are then its own (--draft=auto shares one budget per batch, so only
  its tokens are batch-independent; tests/test_draft_budget.py)."""
  return {"draft": "chain"} if mode == "speculative" else {}


@pytest.mark.parametrize("head_type", ["parallel", "sequential"])
def test_rows_that_finish_early_leave_the_batch(head_type):
  """8 rows, at least half of them ending early at EOS: the loop moves the active rows into smaller
  batches (8 -> 4 -> 2), and every row's tokens, forward passes and accepted drafts are what decoding
  it alone gives. Sequential modules carry more per-row state (their caches and the recent window)."""
  model, params = tiny_decoder(n=3, head_type=head_type, shared=head_type != "sequential")
  rng = np.random.default_rng(3)
  prompts = [list(rng.integers(1, 48, size=rng.integers(2, 10))) for _ in range(8)]
  alone = [decode_run(model, params, [p], "greedy") for p in prompts]
  seen = collections.Counter(t for a in alone for t in set(a.tokens[0, :12].tolist()))
  eos = next(t for t, rows in seen.most_common() if 4 <= rows < 8)   # ends 4-7 rows within 12 tokens
  for mode in ("greedy", "speculative"):
    batch = decode_run(model, params, prompts, mode, eos_id=eos, **_chain(mode))
    for i, p in enumerate(prompts):
      one = decode_run(model, params, [p], mode, eos_id=eos, **_chain(mode))
      np.testing.assert_array_equal(batch.tokens[i], one.tokens[0], err_msg=f"{mode} row {i}")
      assert batch.lengths[i] == one.lengths[0] and batch.forwards[i] == one.forwards[0], (mode, i)
      np.testing.assert_array_equal(batch.accepted[i], one.accepted[0])
    assert int(batch.row_steps) < 8 * (int(batch.steps) + 1), mode     # finished rows stopped costing passes
  assert np.sum(batch.lengths < 24) >= 4


@pytest.mark.parametrize("head_type", ["parallel", "sequential"])
def test_finished_rows_take_the_next_prompt(head_type):
  """Continuous batching: 7 prompts through 3 rows, EOS ending some early, so rows are refilled at
  different steps. Every prompt's tokens, forward passes and accepted drafts are what decoding it
  alone gives, and the rows paid fewer passes than batches of 3 prompts."""
  model, params = tiny_decoder(n=3, head_type=head_type, shared=head_type != "sequential")
  rng = np.random.default_rng(5)
  prompts = [list(rng.integers(1, 48, size=rng.integers(2, 10))) for _ in range(7)]
  alone = [decode_run(model, params, [p], "greedy") for p in prompts]
  seen = collections.Counter(t for a in alone for t in set(a.tokens[0, :12].tolist()))
  eos = next(t for t, rows in seen.most_common() if 3 <= rows < 7)
  for mode in ("greedy", "speculative"):
    served = decode_run(model, params, prompts, mode, eos_id=eos, slots=3, **_chain(mode))
    for i, p in enumerate(prompts):
      one = decode_run(model, params, [p], mode, eos_id=eos, **_chain(mode))
      np.testing.assert_array_equal(served.tokens[i], one.tokens[0], err_msg=f"{mode} prompt {i}")
      assert served.lengths[i] == one.lengths[0] and served.forwards[i] == one.forwards[0], (mode, i)
      np.testing.assert_array_equal(served.accepted[i], one.accepted[0])
    batched = [decode_run(model, params, prompts[i:i + 3], mode, eos_id=eos, **_chain(mode)) for i in range(0, 7, 3)]
    assert int(served.row_steps) < sum(int(b.row_steps) for b in batched), mode
  with pytest.raises(DecodeError, match="slots=0"):
    decode_run(model, params, prompts, "greedy", slots=0)
  with pytest.raises(DecodeError, match="argmax modes"):
    decode_run(model, params, prompts, "sample", slots=3)


def test_compaction_stages():
  stages = lambda b, mode="speculative", shards=1: decode.Settings(mode, 8, 3, batch_shards=shards).stages(b)
  assert stages(16) == (16, 8, 4, 2) and stages(5) == (5, 2) and stages(3) == (3,) and stages(1) == (1,)
  assert stages(16, shards=4) == (16, 8, 4) and stages(16, shards=8) == (16, 8) and stages(12, shards=4) == (12,)
  assert stages(16, "sample") == (16,) and stages(16, "speculative_sample") == (16,)   # draws stay layout-free


@pytest.mark.parametrize("attention,unroll_blocks", [("xla", 16), ("blockwise", 0), ("blockwise", 16)])
def test_speculative_equals_greedy_with_each_attention(monkeypatch, attention, unroll_blocks):
  """Every CPU attention implementation in the prefill and the cached verify steps (chain, auto, the static tree
  and auto with the tree among its budgets): blocks of 8, so the
  16-token prefill and the decode steps over the 56-slot cache really run several blocks (in XLA loops,
  or unrolled), and steps read the cache in windows of 8 slots."""
  from mtp_jax import attention as attention_lib
  monkeypatch.setattr(attention_lib, "CPU_BLOCK", 8)
  monkeypatch.setattr(attention_lib, "CPU_SHORT_BLOCK", 8)
  monkeypatch.setattr(attention_lib, "UNROLL_BLOCKS", unroll_blocks)
  monkeypatch.setattr(attention_lib, "CACHE_WINDOW", 8)   # steps read the cache in windows of 8 slots
  decode.clear_compiled()                                 # no program traced with other settings
  model, params = tiny_decoder(n=3, shared=True, attention=attention)
  g = decode_run(model, params, MIXED, "greedy")
  s = decode_run(model, params, MIXED, "speculative", draft="chain")
  auto = decode_run(model, params, MIXED, "speculative", draft="auto", draft_costs=[1.0, 1.2, 1.5])   # a falling budget
  tree = decode_run(model, params, MIXED, "speculative", draft="tree")
  auto_tree = decode_run(model, params, MIXED, "speculative", draft="auto", tree_nodes=6,   # tree steps and chains
                         draft_costs=[1.0, 1.2, 1.5, 1.9])
  decode.clear_compiled()
  for out in (s, auto, tree, auto_tree):
    check_same(g, out, 24)
  assert auto_tree.budget_steps[3] > 0, auto_tree.budget_steps
  ref = decode_run(*tiny_decoder(n=3, shared=True, attention="xla"), MIXED, "greedy")
  np.testing.assert_array_equal(g.tokens, ref.tokens)
  assert s.accepted.sum() > 0


def test_max_new_tokens_is_exact():
  model, params = tiny_decoder(n=4, shared=True)
  for max_new in (1, 5):
    g = decode_run(model, params, MIXED, "greedy", max_new_tokens=max_new)
    s = decode_run(model, params, MIXED, "speculative", max_new_tokens=max_new)
    check_same(g, s, max_new)
    assert s.tokens.shape == (3, max_new) and np.all(s.lengths == max_new)
  assert int(s.steps) >= 1 and int(decode_run(model, params, MIXED, "speculative", max_new_tokens=1).steps) == 0


def test_one_head_speculative_is_greedy():
  model, params = tiny_decoder(n=1)
  g = decode_run(model, params, MIXED, "greedy", max_new_tokens=12)
  s = decode_run(model, params, MIXED, "speculative", max_new_tokens=12)
  check_same(g, s, 12)
  assert s.accepted.shape == (3, 0)


def test_few_row_steps_split_per_row_and_stay_greedy():
  """Matrices past row_products.MIN_WEIGHTS (d_model = d_ff = 128): verify steps of 2 and 3 tokens at batch 1 and
  greedy over 2 rows run one matrix-vector product per row, and give batch-1 greedy's tokens."""
  from mtp_jax import row_products
  from mtp_jax.model import build_model
  from helpers import random_params
  c = tiny_config(vocab_size=48, n_future=3, n_layers=4, d_model=128, d_ff=128)
  model = build_model(c.model)
  params = random_params(model, 0)
  params = {**params, "heads_1": params["heads_0"], "heads_2": params["heads_0"]}   # drafts often right
  assert row_products.split_rows(3, c.model.d_model * c.model.d_ff)
  prompts = MIXED[:2]
  alone = [decode_run(model, params, [p], "greedy", max_new_tokens=12) for p in prompts]
  pair = decode_run(model, params, prompts, "greedy", max_new_tokens=12)
  for i, g in enumerate(alone):
    np.testing.assert_array_equal(pair.tokens[i], g.tokens[0])
    for k in (2, 3):
      s = decode_run(model, params, [prompts[i]], "speculative", max_new_tokens=12, draft="chain", draft_heads=k)
      check_same(g, s, 12)
      assert s.accepted.sum() > 0


# ----------------------------------------------------------------------------- speculative sampling

@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 0.9)])
def test_speculative_sample_matches_sample(temperature, top_k, top_p):
  v, rows, prompt = 8, 16384, [1, 2]
  model, params = tiny_decoder(n=3, vocab=v)
  exact, always_accept = exact_joint(model, params, prompt, temperature, top_k, top_p)
  outcome = lambda t: (t[:, 0] * v + t[:, 1]) * v + t[:, 2]
  kw = dict(max_new_tokens=3, bucket=2, temperature=temperature, top_k=top_k, top_p=top_p)
  for mode, seed in (("sample", 1), ("speculative_sample", 2)):
    out = decode_run(model, params, [prompt] * rows, mode, seed=seed, **kw)
    assert np.all(out.lengths == 3)
    assert chi2_pvalue(outcome(out.tokens), exact) > 1e-4, mode
  acc = out.accepted.sum(0) / (out.forwards - 1).sum()
  assert np.all((acc > 0.05) & (acc < 0.95)), f"both accept and reject paths must run, got {acc}"
  # The test has power: a wrong rule (always accept the drafts) is rejected at the same sample size.
  wrong = np.random.default_rng(0).choice(v ** 3, size=rows, p=always_accept.ravel())
  assert chi2_pvalue(wrong, exact) < 1e-6


def test_adjusted_logprobs_filters():
  logits = jnp.log(jnp.array([0.05, 0.4, 0.3, 0.15, 0.1]))
  p = lambda **kw: np.asarray(jnp.exp(decode.adjusted_logprobs(logits, **kw)))
  np.testing.assert_allclose(p(temperature=1.0, top_k=0, top_p=1.0), [0.05, 0.4, 0.3, 0.15, 0.1], rtol=1e-5)
  np.testing.assert_allclose(p(temperature=1.0, top_k=2, top_p=1.0), [0, 4 / 7, 3 / 7, 0, 0], rtol=1e-5)
  np.testing.assert_allclose(p(temperature=1.0, top_k=0, top_p=0.75), [0, 0.4 / 0.85, 0.3 / 0.85, 0.15 / 0.85, 0],
                             rtol=1e-5)
  assert np.argmax(p(temperature=0.01, top_k=0, top_p=1.0)) == 1


# ----------------------------------------------------------------------------- API, compiles, errors

class CharTokenizer:
  """a..z and space -> 1..27; 0 is EOS."""
  vocab_size = 48
  eos_id = 0

  def encode(self, text):
    return [1 + "abcdefghijklmnopqrstuvwxyz ".index(ch) for ch in text]

  def decode(self, ids):
    return "".join("abcdefghijklmnopqrstuvwxyz "[i - 1] if 1 <= i <= 27 else "?" for i in ids)


def test_generate_api_and_compile_once():
  model, params = tiny_decoder(n=4, shared=True)
  config = tiny_config(vocab_size=48, n_future=4, n_layers=5)
  before = decode.trace_count()
  res = generate(params, config, ["hello world", "abc"], CharTokenizer(), mode="speculative", max_new_tokens=7)
  assert decode.trace_count() == before + 1
  # New prompts of the same bucket, other seed / eos / sampling values: no new compile.
  generate(params, config, ["xyz", "a b c d"], CharTokenizer(), mode="speculative", max_new_tokens=7, seed=3,
           eos_id=-1, temperature=0.5)
  generate(params, config, [[1, 2], [3]], mode="speculative", max_new_tokens=7, eos_id=5)
  assert decode.trace_count() == before + 1
  generate(params, config, [[1, 2], [3]], mode="speculative", max_new_tokens=8)   # another static shape
  assert decode.trace_count() == before + 2

  r = res[0]
  assert r["prompt"] == "hello world" and r["prompt_tokens"] == CharTokenizer().encode("hello world")
  assert isinstance(r["text"], str) and len(r["tokens"]) <= 7
  s = r["stats"]
  assert s["forward_passes"] >= 1 and s["tokens_per_forward"] == s["new_tokens"] / s["forward_passes"]
  assert len(s["acceptance_rate"]) == 3 and s["batch_compile_s"] > 0
  total = summarize(res)
  assert total["new_tokens"] == sum(x["stats"]["new_tokens"] for x in res) and total["tokens_per_s"] > 0
  json.dumps(res)                                          # JSONL-ready
  # Two rows serving three prompts (a finished row takes the next) give the same greedy tokens as one batch.
  one = generate(params, config, MIXED, mode="greedy", max_new_tokens=6, batch_size=2)
  assert [x["tokens"] for x in one] == [x["tokens"] for x in generate(params, config, MIXED, max_new_tokens=6)]


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompts=[]), "no prompts"),
    (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
    (dict(prompts=[""], tokenizer=CharTokenizer()), "prompt 0 is empty"),
    (dict(prompts=[[1] * 125]), "prompt 0 has 125 tokens"),
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(max_new_tokens=-3), "max_new_tokens=-3"),
    (dict(mode="beam"), "mode='beam'"),
    (dict(mode="sample", temperature=0.0), "temperature=0.0"),
    (dict(mode="sample", top_p=0.0), "top_p=0.0"),
    (dict(prompts=[[1, 99]]), "token id 99 outside"),
    (dict(prompts=["abc"]), "no tokenizer"),
    (dict(tokenizer=type("T", (CharTokenizer,), {"vocab_size": 30})()), "30 tokens but the model's vocabulary has 48"),
])
def test_bad_inputs_raise_clear_errors(kwargs, match):
  model, params = tiny_decoder(n=4)
  config = tiny_config(vocab_size=48, n_future=4, n_layers=5)
  call = dict(prompts=[[1, 2]], tokenizer=None, mode="greedy", max_new_tokens=4)
  call.update(kwargs)
  with pytest.raises(DecodeError, match=match) as e:
    generate(params, config, call.pop("prompts"), **call)
  assert isinstance(e.value, UserError)


def test_workdir_errors(tmp_path):
  with pytest.raises(DecodeError, match="no such directory"):
    load_workdir(str(tmp_path / "missing"))
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(DecodeError, match="no checkpoint"):
    load_workdir(str(tmp_path))
  bytes_workdir(tmp_path / "run", vocab_size=300)          # the byte tokenizer has 258 ids
  with pytest.raises(UserError, match="258 tokens but the model's vocabulary has 300"):
    load_workdir(str(tmp_path / "run"))


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "mtp_jax.generate", *args], cwd=ROOT, capture_output=True, text=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_cli_end_to_end(tmp_path):
  """Load a workdir, generate for two prompts in speculative mode, write JSONL; then a too-long prompt."""
  bytes_workdir(tmp_path / "run", vocab_size=258)
  out = tmp_path / "out.jsonl"
  proc = _cli(f"--workdir={tmp_path / 'run'}", "--prompt=def f(x):", "--prompt=import os", "--mode=speculative",
              "--max_new_tokens=6", f"--output={out}")
  assert proc.returncode == 0, proc.stderr
  rows = [json.loads(l) for l in out.read_text().splitlines()]
  assert [r["prompt"] for r in rows] == ["def f(x):", "import os"]
  assert all(isinstance(r["text"], str) and 1 <= len(r["tokens"]) <= 6 and "tokens_per_forward" in r["stats"]
             for r in rows)
  proc = _cli(f"--workdir={tmp_path / 'run'}", "--prompt=" + "x" * 200, "--max_new_tokens=6")
  assert proc.returncode == 2 and "prompt 0 has 201 tokens" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args,match", [
    (["--workdir=/nonexistent/run", "--prompt=abc"], "no such directory"),
    (["--workdir=/tmp", "--prompt=abc", "--max_new_tokens=0"], "max_new_tokens=0"),
    (["--workdir=/tmp", "--prompt="], "prompt 0 is empty"),
])
def test_cli_errors_are_one_line(args, match):
  proc = _cli(*args)
  assert proc.returncode == 2, proc.stderr
  assert match in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("head_type", ["parallel", "linear", "sequential"])
def test_a_shorter_speculative_block_still_equals_greedy(head_type):
  """draft_heads=k < n: heads 2..k draft (a k-token verify step), the output is still greedy's, and the
  accepted drafts are counted for heads 2..k only."""
  shared = head_type != "sequential"      # copies of head 0 draft well; a module's parameters differ from a Block's
  model, params = tiny_decoder(n=4, head_type=head_type, shared=shared)
  g = decode_run(model, params, MIXED, "greedy")
  for k in (2, 3):
    s = decode_run(model, params, MIXED, "speculative", draft_heads=k, draft="chain")
    check_same(g, s, 24)
    assert s.accepted.shape == (len(MIXED), k - 1) and (s.accepted.sum() > 0 or not shared)
    assert np.all(s.lengths <= s.forwards * k)


@pytest.mark.parametrize("k", [1, 5])
def test_draft_heads_out_of_range_is_refused(k):
  model, params = tiny_decoder(n=4)
  with pytest.raises(decode.DecodeError, match=f"draft_heads={k}: the speculative block is 2..n_future=4"):
    decode_run(model, params, MIXED, "speculative", draft_heads=k)
