"""Experiment scripts end to end at toy size (--quick), so they never rot: they run, write the table,
the JSON and the plot, and what they report is self-consistent."""
import json
import math
import os
import subprocess
import sys

import pytest

from helpers import ROOT


def run_quick(script: str, tmp_path, *flags: str) -> dict:
  """Run `experiments/<group>/<script> --quick --out_dir=tmp_path *flags` from the repo root (HOME in tmp_path,
  so nothing lands in the user's caches); assert it exits 0 and return the results JSON it wrote."""
  r = subprocess.run([sys.executable, f"experiments/{script}", "--quick", *flags, f"--out_dir={tmp_path}"],
                     cwd=ROOT, capture_output=True, text=True, timeout=600,
                     env={**os.environ, "PYTHONPATH": ROOT, "HOME": str(tmp_path)})
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads((tmp_path / f"{os.path.basename(script)[:-3]}_quick.json").read_text())


def test_marginalisation_quick(tmp_path):
  res = run_quick("findings/marginalisation.py", tmp_path, "--k=1,4,all")
  ks = [row["k"] for row in res["rows"]]
  assert ks == [1, 4, res["vocab"], 0]                    # three marginals, then head 2 of the n=2 import
  for row in res["rows"]:
    assert 0 <= row["acc_t2"] <= 1 and row["nll_t2"] > 0
  assert (tmp_path / "marginalisation_quick.png").stat().st_size > 10_000
  assert "| predictor |" in (tmp_path / "marginalisation_quick.md").read_text()
  pair = res["pairs"][0]                                  # head 2 against the exact marginal, paired by position
  assert pair["marginal"].endswith("(all)") and pair["nll"][1] <= pair["nll"][0] <= pair["nll"][2]
  assert res["positions"] == res["windows"] * (res["length"] - res["context"] - 1)   # every position with the context
  # --pool summarises per-seed results files (here the same one twice) over seeds
  r = subprocess.run([sys.executable, "experiments/findings/marginalisation.py", f"--out_dir={tmp_path}",
                      "--pool=marginalisation_quick,marginalisation_quick", "--out_name=pooled"],
                     cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
  assert r.returncode == 0, r.stderr[-3000:]
  pooled = json.loads((tmp_path / "pooled.json").read_text())["rows"][0]
  assert pooled["per_seed"] == [pair["nll"][0]] * 2 and pooled["interval"][0] == pytest.approx(pair["nll"][0])
  r = subprocess.run([sys.executable, "experiments/findings/marginalisation.py", f"--out_dir={tmp_path}",
                      "--pool=missing_seed"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                     env={**os.environ, "PYTHONPATH": ROOT})
  assert r.returncode != 0 and "error: --pool: no results file" in r.stderr


def test_cached_marginal_matches_one_row_per_candidate(tmp_path):
  """The marginal from one tree-attention pass over [x_t, c_1..c_k] at the cached window equals the plain one: a
  separate forward pass over x_0..x_t c for every candidate c, weighted by p(c)."""
  import jax
  import numpy as np
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  sys.path.insert(0, os.path.join(ROOT, "experiments", "findings"))
  import marginalisation
  from mtp_jax import interop
  from mtp_jax.generate import load_workdir
  from mtp_jax.model import build_model
  interop.import_checkpoint(os.path.join(ROOT, "tests", "fixtures", "pretrained", "hf_gqa_untied"), str(tmp_path / "w"),
                            n_future=1, head_init="random")
  params, config, _ = load_workdir(str(tmp_path / "w"))
  vocab = config.model.vocab_size
  window = np.random.default_rng(0).integers(0, vocab, size=12).astype(np.int32)
  ts = np.arange(2, 10)
  p_next = marginalisation.head_probs(params, config)(window[None])[0, 0]                    # [L, V]
  model = build_model(config.model)
  last = jax.jit(lambda t: jax.nn.softmax(model.apply({"params": params}, t)[0][0, :, -1], -1))
  for k in (3, vocab):
    p_target, argmax = marginalisation.cached_marginal(params, config, k, rows=3)(window, p_next, window[ts + 2], ts)
    for i, t in enumerate(ts):
      top = np.argsort(-p_next[t])[:k]
      rows = np.concatenate([np.repeat(window[None, :t + 1], k, 0), top[:, None]], 1)
      marginal = p_next[t, top] @ np.asarray(last(rows)) / p_next[t, top].sum()
      np.testing.assert_allclose(p_target[i], marginal[window[t + 2]], rtol=2e-5)
      assert argmax[i] == np.argmax(marginal)


def test_induction_quick(tmp_path):
  res = run_quick("findings/induction.py", tmp_path, f"--workdir={tmp_path / 'runs'}", "--model_seeds=0,1")
  assert [(row["size"], row["n"], row["seed"]) for row in res["rows"]] == [("xs", 1, 0), ("xs", 2, 0), ("xs", 1, 1),
                                                                             ("xs", 2, 1)]
  assert "| xs |" in (tmp_path / "induction_quick.md").read_text().split("| size | d_model")[0]   # the seeds summary
  for row in res["rows"]:
    assert row["repeat_mentions"] > 0 and row["first_mentions"] > 0 and row["steps"] == res["steps"]
    assert 0 <= row["induction_accuracy"] <= 1 and 0 <= row["first_mention_accuracy"] <= 1
  assert res["rows"][0]["params"] == res["rows"][1]["params"]      # parity: n=2 costs no parameters
  assert (tmp_path / "induction_quick.png").stat().st_size > 10_000
  assert "| size |" in (tmp_path / "induction_quick.md").read_text()


def test_induction_stories_name_exactly_three_characters_each_mentioned_again():
  sys.path.insert(0, os.path.join(ROOT, "experiments", "findings"))
  import induction_stories
  stories = induction_stories.generate(300, seed=1)
  assert stories == induction_stories.generate(300, seed=1) and stories != induction_stories.generate(300, seed=2)
  for text in stories:
    found = induction_stories.mentions(text)
    names = {name for _, name, _ in found}
    assert len(names) == 3 and len({n[0] for n in names}) == 3, text      # a first byte picks one name
    assert all(sum(1 for _, n, _ in found if n == name) >= 2 for name in names)
    for offset, name, _ in found:
      assert text.encode()[offset:offset + 2] == name.encode()


def test_n_sweep_quick(tmp_path):
  res = run_quick("findings/n_sweep.py", tmp_path, f"--root={tmp_path / 'runs'}")
  rows = res["rows"]
  assert [(row["recipe"], row["n"]) for row in rows] == [("bytes", 1), ("bytes", 4), ("sp", 1), ("sp", 4)]
  for recipe in ("bytes", "sp"):
    a, b = (row for row in rows if row["recipe"] == recipe)
    assert a["params"] == b["params"]                                  # parity: one count for every n
    assert a["n_layers"] == b["n_layers"] == 6                         # the quick 5 layers, raised: n=4 keeps a 2-layer trunk
    assert len(b["valid_head_losses"]) == 4 and b["identical_to_greedy"] and len(b["acceptance"]) == 3
  assert rows[0]["tokens_per_byte"] == 1.0 and 0.1 < rows[2]["tokens_per_byte"] < 1.0     # pieces span bytes
  for row in rows:
    assert abs(row["bits_per_byte"] * math.log(2) - row["valid_next_token_loss"] * row["tokens_per_byte"]) < 1e-9
  assert (tmp_path / "n_sweep_quick.png").stat().st_size > 10_000
  assert "| n | params |" in (tmp_path / "n_sweep_quick.md").read_text()


def test_n_sweep_seeds_quick(tmp_path):
  r = subprocess.run([sys.executable, "experiments/findings/n_sweep.py", "--quick", "--recipes=bytes", "--seeds=0,1",
                      f"--root={tmp_path / 'runs'}", f"--out_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                     timeout=600, env={**os.environ, "PYTHONPATH": ROOT, "HOME": str(tmp_path)})
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads((tmp_path / "n_sweep_seeds_quick.json").read_text())
  assert [(row["n"], row["seed"]) for row in res["rows"]] == [(1, 0), (4, 0), (1, 1), (4, 1)]
  assert "speedup" in res["rows"][1] and "speedup" not in res["rows"][3]      # decoding: the first seed only
  one, four = res["summary"]
  loss = {(row["n"], row["seed"]): row["valid_next_token_loss"] for row in res["rows"]}
  assert one["per_seed"] == [loss[(1, 0)], loss[(1, 1)]]
  assert four["diff_per_seed"] == pytest.approx([loss[(4, s)] - loss[(1, s)] for s in (0, 1)])   # paired by seed
  assert four["verdict"] in ("not separable at this budget", "reproduced (n=1 better)", "not reproduced: n>1 better")
  assert (abs(four["diff_mean"]) > four["diff_ci95"]) == (four["verdict"] != "not separable at this budget")
  assert "| n | valid next-token loss | per seed |" in (tmp_path / "n_sweep_seeds_quick.md").read_text()


def test_mtp_cost_vs_length_quick(tmp_path):
  res = run_quick("findings/mtp_cost_vs_length.py", tmp_path, f"--workdir={tmp_path / 'runs'}")
  assert res["ns"] == ["1", "2"] and res["seeds"] == [0, 1] and res["lengths"] == [4, 8]
  assert sorted((r["n"], r["seed"]) for r in res["runs"]) == [(1, 0), (1, 1), (2, 0), (2, 1)]
  assert len({r["params"] for r in res["runs"]}) == 1                 # parity: one count for every n
  an = res["analysis"]
  assert an["seeds_complete"] == [0, 1] and [row["steps"] for row in an["per_length"]] == [4, 8]
  for row in an["per_length"]:                                         # gaps are paired by seed
    loss = {n: {s: r["valid_next_token_loss"][str(row["steps"])] for r in res["runs"] for s in [r["seed"]] if r["n"] == n}
            for n in (1, 2)}
    assert row["gap_n2"]["per_seed"] == pytest.approx([loss[2][s] - loss[1][s] for s in (0, 1)])
    assert row["n1"]["ci95"] > 0
  trend = an["trend"]["n2"]
  assert len(trend["b_per_seed"]) == 2 and trend["b_mean"] == pytest.approx(sum(trend["b_per_seed"]) / 2)
  assert res["flops_per_step"]["2"] > res["flops_per_step"]["1"]
  assert (tmp_path / "mtp_cost_vs_length_quick.png").stat().st_size > 10_000
  assert "| steps | n=1 loss |" in (tmp_path / "mtp_cost_vs_length_quick.md").read_text()


def test_poly_ring_problems_are_what_they_say():
  sys.path.insert(0, os.path.join(ROOT, "experiments", "findings"))
  import random
  import poly_ring as R
  rng = random.Random(0)
  polys = [tuple(rng.randrange(7) for _ in range(5)) for _ in range(20)]
  x, one = (0, 1, 0, 0, 0), (1, 0, 0, 0, 0)
  for a, b, c in zip(polys, polys[1:], polys[2:]):
    assert R.mul(a, b) == R.mul(b, a) and R.mul(a, R.add(b, c)) == R.add(R.mul(a, b), R.mul(a, c))
    assert R.compose(a, x) == a and R.compose(x, a) == a and R.add(a, R.neg(a)) == (0,) * 5
    c0 = (0,) + c[1:]          # substituting X -> c0 is a ring map of F_7[X]/(X^5) only when c0(0) = 0
    assert R.compose(R.compose(a, b), c0) == R.compose(a, R.compose(b, c0))
    assert R.compose(R.mul(a, b), c0) == R.mul(R.compose(a, c0), R.compose(b, c0))
  assert R.mul(x, (1, 1, 1, 1, 1)) == (0, 1, 1, 1, 1) and R.compose(one, a) == one   # mod X^5; constants stay
  for k in range(0, 7):
    for _ in range(30):
      text, answer = R.problem(rng, k)
      expression, _, written = text.partition("=")
      assert written == answer and R.text_of(R.evaluate(expression)) == answer
      assert sum(expression.count(op) for op in "-+*o") == k
  try:
    R.evaluate("(01234+0123)")
  except ValueError as e:
    assert "malformed polynomial" in str(e)
  else:
    raise AssertionError("a 4-digit polynomial parsed")
  for bad in ("(01234+01234", "(01234/01234)", "01234)"):
    try:
      R.evaluate(bad)
    except ValueError:
      pass
    else:
      raise AssertionError(f"{bad!r} parsed")


def test_poly_answer_scoring_against_an_oracle():
  """The scorer reads the answer's 5 positions: a perfect predictor scores 1, one reading a token late 0."""
  sys.path.insert(0, os.path.join(ROOT, "experiments", "findings"))
  import numpy as np
  import poly_arithmetic as PA
  rows = [[1, *b"(01234+65432)=" + b"00000"], [1, *b"-01234=" + b"06543"]]
  tokens = np.zeros((2, 32), np.int64)
  for i, r in enumerate(rows):
    tokens[i, :len(r)] = r
  lengths = [len(r) for r in rows]
  oracle = np.roll(tokens, -1, axis=1)                  # position j predicts token j + 1 exactly
  assert PA.answer_hits(oracle, tokens, lengths).all()
  late = np.roll(tokens, -2, axis=1)
  assert not PA.answer_hits(late, tokens, lengths)[1].any()
  wrong_last = oracle.copy()
  wrong_last[0, lengths[0] - 2] = ord("1")               # the last coefficient of row 0
  assert PA.answer_hits(wrong_last, tokens, lengths).tolist()[0] == [True] * 4 + [False]
  seen = set(PA.fresh_problems(1, 50, set()))
  assert not seen & set(PA.fresh_problems(1, 50, seen))   # held out from what it is told was seen


def test_poly_arithmetic_quick(tmp_path):
  res = run_quick("findings/poly_arithmetic.py", tmp_path, f"--workdir={tmp_path / 'runs'}")
  assert [row["n"] for row in res["rows"]] == [1, 2] and res["rows"][0]["params"] == res["rows"][1]["params"]
  for row in res["rows"]:
    assert [x["k"] for x in row["by_k"]] == list(range(1, res["test_ops"] + 1))
    assert all(0 <= x["exact_match"] <= x["coefficient_accuracy"] <= 1 for x in row["by_k"])
  assert (tmp_path / "poly_arithmetic_quick.png").stat().st_size > 10_000
  assert "| run |" in (tmp_path / "poly_arithmetic_quick.md").read_text()


def test_poly_arithmetic_seeds_summary_pairs_runs_by_seed():
  """Means over seeds, and each run minus n1 paired by seed, on made-up rows (3 operations in domain of 4)."""
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  sys.path.insert(0, os.path.join(ROOT, "experiments", "findings"))
  import poly_arithmetic
  by_k = lambda e, c: [{"k": k, "exact_match": e * k, "coefficient_accuracy": c} for k in (1, 2, 3, 4)]
  rows = [{"run": run, "seed": seed, "valid_next_token_loss": 1.0 + 0.1 * (run == "n2") + 0.01 * seed,
           "by_k": by_k(0.01 * (1 + seed) * (2 if run == "n2" else 1), 0.2)} for seed in (0, 1, 2) for run in ("n1", "n2")]
  summary = {(e["metric"], e["run"]): e for e in poly_arithmetic.seeds_summary(rows, 3)}
  loss = summary["valid next-token loss", "n2"]
  assert loss["per_seed"] == pytest.approx([1.1, 1.11, 1.12]) and loss["minus_n1"]["per_seed"] == pytest.approx([0.1] * 3)
  assert loss["minus_n1"]["interval"] == pytest.approx((0.1, 0.0), abs=1e-9)
  exact = summary["exact match, k in domain", "n2"]["minus_n1"]["per_seed"]   # mean over k = 1..3 of 0.01 (1+s) k
  assert exact == pytest.approx([0.02, 0.04, 0.06])
  assert "minus_n1" not in summary["valid next-token loss", "n1"]
  lines = poly_arithmetic.summary_lines(list(summary.values()), [0, 1, 2])
  assert any(line.startswith("| valid next-token loss | n2 |") and line.endswith("| separable |") for line in lines)


def test_decode_profile_quick(tmp_path):
  """Both probs x V paths are built, timed and profiled, and the profile shows which one each program ran; a
  best-first tree's step too, its tree work outside the layers."""
  res = run_quick("speed/decode_profile.py", tmp_path, "--modes=greedy,bestfirst")
  assert [(r["batch"], r["mode"]) for r in res["rows"]] == [(2, "greedy"), (2, "bestfirst")]
  assert any(op.startswith("tree_verify/") for op in res["rows"][1]["ops_ms"]["stream"])
  for r in res["rows"]:
    einsum_ops, stream_ops = r["ops_ms"]["einsum"], r["ops_ms"]["stream"]
    assert any("bkgts,bksd->btkgd" in op for op in einsum_ops), einsum_ops
    assert stream_ops and not any("bkgts,bksd->btkgd" in op for op in stream_ops), stream_ops
    assert all(t > 0 for t in r["step_ms"].values())
  text = (tmp_path / "decode_profile_quick.md").read_text()
  assert "| batch | mode | einsum ms/step |" in text and "| 2 | bestfirst | " in text and "outside the layers |" in text and "layer dots" in text


def test_decode_attention_quick(tmp_path):
  """The five attention paths each compile a whole decode, are timed, and their tokens compared."""
  res = run_quick("speed/decode_attention.py", tmp_path)
  assert [(r["batch"], r["mode"]) for r in res["rows"]] == [(2, "greedy"), (2, "speculative")]
  for r in res["rows"]:
    assert set(r["ms"]) == {"dots", "stream", "stream_qk", "window", "window_qk"} and all(t > 0 for t in r["ms"].values())
    assert isinstance(r["identical"], bool)
  assert "| batch | mode | dots ms |" in (tmp_path / "decode_attention_quick.md").read_text()


def _jaxpr_macs(jaxpr) -> int:
  """Multiply-accumulates of every dot_general a jaxpr runs: scan bodies times their length, one branch of
  a cond (the heads' switch runs one per step), every other sub-jaxpr (remat, custom VJP, pjit) once."""
  from jax.extend import core as jcore
  total = 0
  for e in jaxpr.eqns:
    if e.primitive.name == "dot_general":
      (lhs_contract, _), _ = e.params["dimension_numbers"]
      shape = e.invars[0].aval.shape
      total += math.prod(e.outvars[0].aval.shape) * math.prod(shape[i] for i in lhs_contract)
      continue
    assert e.primitive.name != "while", "a while loop's trip count is not in its jaxpr"
    subs = []
    for v in e.params.values():
      for x in (v if isinstance(v, (tuple, list)) else (v,)):
        if isinstance(x, (jcore.Jaxpr, jcore.ClosedJaxpr)):
          subs.append(_jaxpr_macs(x.jaxpr if isinstance(x, jcore.ClosedJaxpr) else x))
    if e.primitive.name == "cond":
      total += max(subs)
    else:
      total += e.params.get("length", 1) * sum(subs) if e.primitive.name == "scan" else sum(subs)
  return total


@pytest.mark.parametrize("n,remat_heads", [(1, True), (4, True), (4, False)])
def test_step_ratio_counts_the_matmuls_the_train_step_runs(n, remat_heads):
  """experiments/common/matmul_work.py's matmul_macs equals the dot_general work in the gradient's jaxpr, for n=1,
  n=4 with its head layers recomputed, and n=4 keeping them (xla attention, which scores every key)."""
  sys.path[:0] = [os.path.join(ROOT, "experiments", "speed"), os.path.join(ROOT, "experiments")]
  import functools
  import jax
  import jax.numpy as jnp
  import step_ratio
  from common.matmul_work import matmul_macs
  from mtp_jax import loss
  from mtp_jax.model import build_model, init_params
  c = step_ratio.config(n, 512, quick=True)
  c.model.attention = "xla"
  model = build_model(c.model)
  params = init_params(model, jax.random.key(0))
  saved, loss.mtp_loss_scan = loss.mtp_loss_scan, functools.partial(loss.mtp_loss_scan, remat_heads=remat_heads)
  try:
    loss_fn = loss.make_loss_fn(model, c)
  finally:
    loss.mtp_loss_scan = saved
  batch_size, seq = 2, c.data.seq_len
  batch = {"tokens": jnp.zeros((batch_size, seq + n), jnp.int32)}
  jaxpr = jax.make_jaxpr(jax.grad(lambda p: loss_fn(p, batch)[0]))(params).jaxpr
  counted = _jaxpr_macs(jaxpr) / (batch_size * seq)
  assert counted == matmul_macs(c.model, seq, remat_heads, keys_per_query=seq)


@pytest.mark.slow   # five train steps compiled: about 75 s
def test_step_ratio_quick(tmp_path):
  res = run_quick("speed/step_ratio.py", tmp_path)
  rows = {(r["n"], r["vocab"], r["remat_heads"]): r for r in res["rows"]}
  assert set(rows) == {(1, 2048, True), (4, 2048, True), (4, 2048, False), (1, 256, True), (4, 256, True)}
  assert all(r["seconds"] > 0 and r["temp_mib"] > 0 for r in rows.values())
  # the patched loss took effect: keeping the head layers' activations needs more temporaries
  assert rows[(4, 2048, False)]["temp_mib"] > rows[(4, 2048, True)]["temp_mib"]


@pytest.mark.slow   # two dry runs with XLA dumps, each in its own process on 8 simulated devices: 30-70 s
def test_scheduler_memory_quick(tmp_path):
  """Both schedules are compiled and reported; the memory schedule plans fewer temporaries, the dry run
  says which schedule it used, and each peak lists real buffers that are live at the peak."""
  rows = {r["schedule"]: r for r in run_quick("memory/scheduler_memory.py", tmp_path)["rows"]}
  assert rows["memory"]["temp_bytes"] < rows["concurrency"]["temp_bytes"]
  assert {s: r["reported_schedule"] for s, r in rows.items()} == {"memory": "memory", "concurrency": "concurrency"}
  for r in rows.values():
    peak = r["peak"]
    assert peak["buffers"] and 0 < peak["peak_temp_bytes"]
    assert all(b["bytes"] > 0 and b["live"][0] <= peak["peak_at"] <= b["live"][1] for b in peak["buffers"])
  assert "| buffer | shape | KiB |" in (tmp_path / "scheduler_memory_quick.md").read_text()


@pytest.mark.slow   # five benchmarks at tiny sizes, each in its own process: about 4 min on 2 cores
def test_gpu_benchmarks_script_runs_end_to_end_and_packs_its_tables(tmp_path):
  """experiments/speed/gpu_benchmarks.sh in SMOKE mode on this machine's backend: every benchmark writes its
  table named for the device into MTP_RESULTS_DIR (never experiments/results/), and the one file brought
  back from a lent machine, $OUT/gpu_tables_<device>.tar.gz, holds them all."""
  import tarfile
  results, out = tmp_path / "results", tmp_path / "out"
  out.mkdir()
  r = subprocess.run(["bash", "experiments/speed/gpu_benchmarks.sh"], cwd=ROOT, capture_output=True, text=True,
                     timeout=1800, env={**os.environ, "SMOKE": "1", "MTP_RESULTS_DIR": str(results), "OUT": str(out),
                                        "PYTHON": sys.executable, "HOME": str(tmp_path), "BENCH_TIMEOUT": "600"})
  assert r.returncode == 0, r.stderr[-3000:]
  [packed] = out.iterdir()
  device = packed.name[len("gpu_tables_"):-len(".tar.gz")]
  assert device.endswith("_smoke")
  names = set(tarfile.open(packed).getnames())
  for stem in ("memory", "ce_chunk", "attention_speed", "speculative"):
    assert {f"{stem}_{device}.md", f"{stem}_{device}.json"} <= names, (stem, names)
    table = (results / f"{stem}_{device}.md").read_text()
    assert "|" in table and "cpu" in table.lower()     # a table, naming the device it ran on
  assert f"step_ratio_{device}_quick.md" in names
  speculative = json.loads((results / f"speculative_{device}.json").read_text())
  assert all(row["identical_to_greedy"] for row in speculative["rows"])


def test_gpu_benchmarks_script_goes_on_past_a_benchmark_that_runs_out_of_time(tmp_path):
  """With every benchmark cut off by BENCH_TIMEOUT, the script still runs all five, names each one that
  did not finish, packs nothing and exits non-zero (a device call's minutes are not spent on silence)."""
  out = tmp_path / "out"
  out.mkdir()
  r = subprocess.run(["bash", "experiments/speed/gpu_benchmarks.sh"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                     env={**os.environ, "SMOKE": "1", "MTP_RESULTS_DIR": str(tmp_path / "results"), "OUT": str(out),
                          "PYTHON": sys.executable, "HOME": str(tmp_path), "BENCH_TIMEOUT": "0.5"})
  assert r.returncode == 1
  assert "memory ce_chunk attention_speed step_ratio speculative" in r.stderr.splitlines()[-1]
  assert not list(out.iterdir())


def test_batch_invariance_quick(tmp_path):
  """Greedy, chain, tree and auto (its budget falling and growing back) at batch 1 and 8 with continuous batching
  and EOS: every prompt's tokens equal greedy's at batch 1 (the script exits 1 otherwise). (Best-first trees with
  continuous batching: tests/test_draft_budget.py.)"""
  res = run_quick("speed/batch_invariance.py", tmp_path, "--draft=chain,tree,auto")
  assert res["all_identical"] and res["n_prompts"] == 24
  assert [(r["scheme"], r["batch"]) for r in res["rows"]] == [(s, b) for s in ("greedy", "chain", "tree", "auto")
                                                              for b in (1, 8)]
  assert all(r["identical"] == 24 and r["first_difference"] is None for r in res["rows"])
  assert "| auto | 8 | 24/24 | none |" in (tmp_path / "batch_invariance_quick.md").read_text()


def test_sequential_vs_parallel_pairs_seeds_and_weights():
  """The seeds summary of experiments/findings/sequential_vs_parallel.py on made-up rows: differences paired by
  seed, each topology against the other at its own and at the other's head weights, specs refused in one line.
  (In a subprocess: the script defines its absl flags at import.)"""
  code = r'''
import sys
sys.path[:0] = ["experiments/findings", "experiments"]
import sequential_vs_parallel as S
assert S.parse_runs(["parallel:1", "sequential:4:uniform", "parallel:4:deepseek"]) == [
    ("parallel", 1, "own"), ("sequential", 4, "uniform"), ("parallel", 4, "deepseek")]
for bad in ("parallel:4:uniform", "sequential:4:deepseek", "causal:1", "parallel", "sequential:4:own:x"):
  try:
    S.parse_runs([bad])
    raise AssertionError(bad)
  except SystemExit as e:
    assert str(e).startswith("error: --runs=") and "\n" not in str(e), e
rows = []
for seed, shift in ((0, 0.0), (1, 0.1), (2, 0.2)):          # seeds move every model alike: pairing removes it
  for head_type, n, weights, loss, acc in (("parallel", 1, "own", 1.30, None), ("parallel", 4, "own", 1.50, 0.5),
                                           ("sequential", 4, "own", 1.40, 0.7), ("sequential", 4, "uniform", 1.45, 0.8),
                                           ("parallel", 4, "deepseek", 1.35, 0.4)):
    rows.append({"name": S.name_of(head_type, n, weights), "seed": seed, "head_type": head_type, "n_future": n,
                 "weights": weights, "valid_next_token_loss": loss + shift + 0.001 * seed * (n > 1),
                 "valid_head_losses": [loss + shift, 2.0 + shift], "acceptance": [] if acc is None else [acc, 0.3]})
models, pairs = S.summary(rows, [0, 1, 2])
by = {m["name"]: m for m in models}
assert by["parallel_n1"]["loss"][1] > 0.2 and "diff_n1" not in by["parallel_n1"]
mean, half = by["parallel_n4"]["diff_n1"]
assert abs(mean - 0.201) < 1e-9 and half < 0.01                      # paired: the seeds' shift is gone
got = {(p["sequential"], p["parallel"], p["weights"]): p["next_token"][0] for p in pairs}
assert set(got) == {("sequential_D3", "parallel_n4", "each its own"),
                    ("sequential_D3", "parallel_n4_deepseek", "sequential's"),
                    ("sequential_D3_uniform", "parallel_n4", "parallel's")}, got
assert abs(got[("sequential_D3", "parallel_n4_deepseek", "sequential's")] - 0.05) < 1e-9
lines = S.summary_lines(models, pairs, 600)
assert any("sequential_D3_uniform | parallel_n4 | parallel's" in line and "sequential better" in line for line in lines)
print("ok")
'''
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_row_cost_quick(tmp_path):
  res = run_quick("speed/row_cost.py", tmp_path)
  assert [r["kernel"] for r in res["results"]] == ["xla", "eigen", "rows", "numpy"]
  for r in res["results"]:
    assert sorted(r["ms"]) == ["1", "2"] and all(t > 0 for t in r["ms"].values()) and r["core_gflops"] > 0
  take = {r["kernel"]: r["two_rows_take"] for r in res["results"]}
  assert take["eigen"] == "dot" and take["numpy"] == take["rows"] == ""    # the flag moves two rows off YNNPACK
  assert "| rows |" in (tmp_path / "row_cost_quick.md").read_text()


def test_acceptance_by_position_quick(tmp_path):
  """Steps replayed from greedy's output, grouped by position and by repeats; the decode loop's forward passes
  equal the replay's (the script fails otherwise)."""
  res = run_quick("speed/acceptance_by_position.py", tmp_path)
  assert sum(g["steps"] for g in res["by_position"]) == res["by_kind"]["all"]["steps"] > 0
  assert res["by_kind"]["all"]["tokens_per_forward"] >= 1.0 and res["per_prompt"]["min"] >= 1.0


def test_row_products_quick(tmp_path):
  """The split on and off, side by side: both settings' outputs equal greedy's, and the table says so."""
  res = run_quick("speed/row_products.py", tmp_path)
  assert res["all_identical"] and [r["scheme"] for r in res["rows"]] == ["greedy", "chain2"]
  assert all(r["on_tokens_per_s"] > 0 and r["off_tokens_per_s"] > 0 for r in res["rows"])
  assert "| chain2 |" in (tmp_path / "row_products_quick.md").read_text()
