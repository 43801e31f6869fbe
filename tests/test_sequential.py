"""DeepSeek-V3 sequential MTP modules: layout, causality, scan == naive, the lambda schedule, the
modules' cached drafting against the full forward, speculative == greedy, speculative sampling exact."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtp_jax import decode
from mtp_jax.config import ConfigError, loss_weights, mtp_lambda_schedule, validate
from mtp_jax.dry_run import param_counts
from mtp_jax.loss import make_loss_fn
from mtp_jax.model import abstract_params, build_model
from mtp_jax.step import make_optimizer, new_train_state, make_train_step

from helpers import (MIXED, ROOT, check_same, chi2_pvalue, decode_run, exact_joint, loss_batch, main_command,
                     random_params, tiny_config)
from tolerances import assert_close, assert_trees_close, network_k


def _model(n, vocab=64, seed=0):
  c = tiny_config(head_type="sequential", n_future=n, n_layers=n + 1, vocab_size=vocab)
  model = build_model(c.model)
  return c, model, random_params(model, seed)


def test_parameter_layout_mirrors_hf_mtp_modules():
  """heads_k holds HF's enorm / hnorm / eh_proj / the layer / shared_head.norm; embedding and unembedding are the model's."""
  c, model, _ = _model(3)
  params, _ = abstract_params(model)                         # shapes only: nothing compiled
  d = c.model.d_model
  for k in (1, 2):
    m = params[f"heads_{k}"]
    assert sorted(m) == ["eh_proj", "enorm", "hnorm", "layer", "shared_head"]
    assert m["eh_proj"]["kernel"].shape == (2 * d, d)        # HF eh_proj.weight [d, 2d], transposed
    assert sorted(m["layer"]) == sorted(params["trunk"]["layer"])   # the layer is named as a trunk layer
    assert list(m["shared_head"]) == ["norm"]
  assert sorted(params["heads_0"]) == sorted(params["trunk"]["layer"])   # head 0 is the main model's last layer
  # Parity: each module's layer is one of n_layers; a module adds only eh_proj and its three norms.
  base = param_counts(abstract_params(build_model(tiny_config(n_future=1, n_layers=4).model))[0])
  seq = param_counts(abstract_params(build_model(tiny_config(head_type="sequential", n_future=3, n_layers=4).model))[0])
  assert model.args.n_trunk_layers == 1
  assert seq["params_total"] == base["params_total"] + 2 * (2 * d * d + 3 * d)


def test_module_reads_token_t_plus_k_and_nothing_later():
  """Module k's logits at t (predicting t+k+1) depend on tokens up to t+k, and on token t+k itself."""
  _, model, params = _model(3)
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 64)
  base, _ = model.apply({"params": params}, tokens)
  for j in (4, 8):
    changed = tokens.at[:, j].set((tokens[:, j] + 5) % 64)
    logits, _ = model.apply({"params": params}, changed)
    for k in range(3):                                     # head 0 is k=0: reads up to t
      np.testing.assert_allclose(logits[k, :, :j - k], base[k, :, :j - k], atol=1e-6, err_msg=f"head {k}")
      assert np.abs(np.asarray(logits[k, :, j - k] - base[k, :, j - k])).max() > 1e-4, f"head {k} must see t+{k}"


@pytest.mark.parametrize("n", [2, 3, 4])                 # D = 1, 2, 3 modules
def test_scan_equals_naive(n):
  """Loss, per-head metrics and every gradient: scan (chunked and not) against the naive forward."""
  c, model, params = _model(n)
  c.loss.mtp_lambda = "0.5"
  batch = loss_batch(n)
  results = {}
  for impl, chunk in (("naive", 0), ("scan", 0), ("scan", 4)):
    c.loss.impl, c.loss.chunk_size = impl, chunk
    results[impl, chunk] = jax.jit(jax.value_and_grad(make_loss_fn(model, c), has_aux=True))(params, batch)
  (ref_loss, ref_m), ref_g = results["naive", 0]
  assert_close(ref_loss, ref_m["head_losses"][0] + 0.5 / (n - 1) * ref_m["head_losses"][1:].sum(),
               n)                                       # L_main + lambda / D * sum_k L_k
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(ref_g["heads_1"]))   # modules do train
  k = network_k(c, batch["tokens"].shape[0])
  for key in (("scan", 0), ("scan", 4)):
    (loss, m), g = results[key]
    assert_close(loss, ref_loss, k, err_msg=str(key))
    assert_close(m["head_losses"], ref_m["head_losses"], k)
    np.testing.assert_array_equal(m["head_accuracies"], ref_m["head_accuracies"])
    np.testing.assert_array_equal(m["head_tokens"], ref_m["head_tokens"])
    assert_trees_close(g, ref_g, k, err_msg=str(key))


def test_lambda_schedule_is_traced_not_recompiled():
  """'0.3@0,0.1@0.5' over 10 steps: steps 0-4 weigh modules 0.3/D, steps 5+ 0.1/D, one compiled step."""
  c, model, params = _model(3)
  c.loss.mtp_lambda, c.train.steps = "0.3@0,0.1@0.5", 10
  validate(c)
  assert mtp_lambda_schedule(c.loss.mtp_lambda) == ([0.3, 0.1], [0.0, 0.5])
  assert loss_weights(c, 4) == [1.0, 0.15, 0.15] and loss_weights(c, 5) == [1.0, 0.05, 0.05]
  tx = make_optimizer(c.train)
  step = jax.jit(make_train_step(model, c, tx))
  state = new_train_state(params, tx)
  batch = loss_batch(3)
  seen = []
  for s in (0, 4, 5, 9):
    _, m = step(state.replace(step=jnp.int32(s)), batch)
    seen.append(np.asarray(m["loss_weights"]))
    assert_close(m["loss"], np.dot(seen[-1], m["head_losses"]), 3)
  np.testing.assert_allclose(seen, [[1, .15, .15], [1, .15, .15], [1, .05, .05], [1, .05, .05]], rtol=1e-6)
  assert step._cache_size() == 1


@pytest.mark.parametrize("change, words", [
    (dict(n_future=1), "D = n_future - 1 MTP modules must be >= 1"),
    (dict(mtp_lambda="-0.1"), "lambda must be a finite number >= 0"),
    (dict(mtp_lambda="0.3@0,0.1@0.7,x"), "does not parse"),
    (dict(mtp_lambda="0.3@0,0.1"), "every entry of a schedule needs @fraction"),
    (dict(mtp_lambda="0.3@0.2,0.1@0.7"), "must start at 0"),
    (dict(mtp_lambda="0.3@0,0.1@1.5"), "stay below 1"),
    (dict(head_weights="1,2,3"), "weighted by loss.mtp_lambda"),
])
def test_bad_sequential_configs(change, words):
  c = tiny_config(head_type="sequential", n_future=change.pop("n_future", 3))
  c.loss.update(change)
  with pytest.raises(ConfigError, match=words):
    validate(c)


def test_cli_rejects_bad_lambda_before_compiling(tmp_path):
  r = main_command("--config=configs/tiny.py", f"--workdir={tmp_path}", "--dry_run",
                   "--config.model.head_type=sequential", "--config.loss.mtp_lambda=0.3@0,oops")
  errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert r.returncode == 2 and len(errors) == 1 and "loss.mtp_lambda" in errors[0], r.stderr
  assert "Traceback" not in r.stderr and not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------- decoding

@pytest.mark.parametrize("vocab", [64, 24])
def test_cached_drafts_equal_the_full_forward(vocab):
  """After the prefill and after every speculative step, each module's draft equals the argmax of the
  uncached forward over [prompt, generated tokens] with the earlier drafts as its lookahead: the
  modules' KV caches hold exactly what training computes, also where drafts were accepted (vocab 24:
  some are) and for a prompt shorter than D - 1."""
  n = 4
  _, model, params = _model(n, vocab=vocab)
  settings = decode.Settings("speculative", 16, n)
  sp = decode.SamplingParams.of()
  prompts = MIXED                                           # lengths 3, 9 and 1 (< D - 1)
  tokens, lengths = map(jnp.asarray, decode.pad_prompts(prompts, 16))
  w = decode.decode_weights(params, model.args, settings.heads_run)
  state = jax.jit(lambda w: decode.prefill(model, w, settings, sp, tokens, lengths, jax.random.key(0)))(w)
  step = jax.jit(lambda w, s: decode.step(model, w, settings, sp, s))
  forward = jax.jit(lambda x: model.apply({"params": params}, x)[0])
  for _ in range(8):
    for b, p in enumerate(prompts):
      seq = p + state.tokens[b, :int(state.count[b])].tolist()
      # [prompt, generated, drafts], right-padded to one shape: module k at the last fed position
      # len(seq) - 2 reads the last token (k=1) or draft k-1.
      full = np.zeros((1, 48), np.int32)
      full[0, :len(seq) + n - 1] = seq + state.drafts[b].tolist()
      logits = forward(jnp.asarray(full))                                    # [n, 1, 48, V]
      want = [int(np.argmax(logits[k, 0, len(seq) - 2])) for k in range(1, n)]
      assert state.drafts[b].tolist() == want, (b, state.drafts[b], want)
    state = step(w, state)
  if vocab == 24:
    assert 0 < int(state.accepted.sum()) < 3 * int((state.forwards - 1).sum()), state.accepted


@pytest.mark.parametrize("n,vocab", [(2, 48), (4, 48), (4, 24)])
def test_speculative_equals_greedy(n, vocab):
  """Token for token, mixed prompt lengths and batch 1, with and without EOS mid-way."""
  for prompts in (MIXED, [[7, 3, 5, 1]]):
    _, model, params = _model(n, vocab=vocab)
    g = decode_run(model, params, prompts, "greedy")
    s = decode_run(model, params, prompts, "speculative")
    check_same(g, s, 24)
    assert s.accepted.shape == (len(prompts), n - 1)
    eos = int(g.tokens[0, 5])
    g2 = decode_run(model, params, prompts, "greedy", eos_id=eos)
    s2 = decode_run(model, params, prompts, "speculative", eos_id=eos)
    check_same(g2, s2, 24)
    first = g.tokens[0].tolist().index(eos)
    assert g2.tokens[0].tolist() == g.tokens[0, :first + 1].tolist() + [decode.PAD] * (23 - first)


def test_speculative_sample_matches_sample():
  """The law of the first 3 tokens (chi-square against the exact joint from head 0), both accept and reject run."""
  v, rows, prompt = 8, 16384, [1, 2]
  _, model, params = _model(3, vocab=v)
  exact, wrong_law = exact_joint(model, params, prompt, 1.0, 0, 1.0)
  outcome = lambda t: (t[:, 0] * v + t[:, 1]) * v + t[:, 2]
  kw = dict(max_new_tokens=3, bucket=2)
  for mode, seed in (("sample", 1), ("speculative_sample", 2)):
    out = decode_run(model, params, [prompt] * rows, mode, seed=seed, **kw)
    assert np.all(out.lengths == 3)
    assert chi2_pvalue(outcome(out.tokens), exact) > 1e-4, mode
  acc = out.accepted.sum(0) / (out.forwards - 1).sum()
  assert np.all((acc > 0.05) & (acc < 0.95)), f"both accept and reject paths must run, got {acc}"
  wrong = np.random.default_rng(0).choice(v ** 3, size=rows, p=wrong_law.ravel())
  assert chi2_pvalue(wrong, exact) < 1e-6                  # the test has power


@pytest.mark.slow   # four toy trainings and decode benchmarks: minutes on 2 cores, over CI's budget
def test_comparison_experiment_quick(tmp_path):
  """experiments/findings/sequential_vs_parallel.py --quick trains the four models, decodes, writes the table and plot."""
  r = subprocess.run([sys.executable, "experiments/findings/sequential_vs_parallel.py", "--quick", f"--root={tmp_path / 'runs'}",
                      f"--results_dir={tmp_path}", "--max_new_tokens=8", "--repeats=1"], cwd=ROOT,
                     capture_output=True, text=True, timeout=900, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 0, r.stderr[-3000:]
  result = json.loads((tmp_path / "sequential_vs_parallel_quick.json").read_text())
  assert [row["name"] for row in result["rows"]] == ["parallel_n2", "parallel_n4", "sequential_D1", "sequential_D3"]
  for row in result["rows"]:
    assert row["identical_to_greedy"] and len(row["acceptance"]) == row["n_future"] - 1
    assert 1 <= row["tokens_per_forward"] <= row["n_future"]
  assert (tmp_path / "sequential_vs_parallel_quick.png").stat().st_size > 0
