"""train.trainable (frozen parameters hold no optimizer state, get no backward work, stay bit-identical),
the per-head acceptance metric, and an imported model fine-tuned through the trainer."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtp_jax import step
from mtp_jax.dry_run import dry_run_report
from mtp_jax.errors import UserError
from mtp_jax.loss import mtp_loss_naive, mtp_loss_scan
from mtp_jax.model import build_model, init_params
from helpers import tiny_config

from helpers import ROOT


def _batch(c, seed=1):
  tokens = jax.random.randint(jax.random.key(seed), (c.train.batch_size, c.data.seq_len + c.model.n_future), 0,
                              c.model.vocab_size)
  segments = jnp.ones_like(tokens).at[0, 10:].set(2)   # a document boundary masks some targets
  return {"tokens": tokens, "segment_ids": segments}


def _acceptance_reference(logits, batch, seq_len, n):
  """numpy: head i right given heads 1..i-1 right, over positions whose head-i target is in the document."""
  tokens, seg = np.asarray(batch["tokens"]), np.asarray(batch["segment_ids"])
  ok = np.ones(tokens[:, :seq_len].shape, bool)
  out = []
  for i in range(n):
    tgt = tokens[:, i + 1:i + 1 + seq_len]
    mask = seg[:, i + 1:i + 1 + seq_len] == seg[:, :seq_len]
    hit = (np.argmax(np.asarray(logits[i]), -1) == tgt) & mask
    out.append((hit & ok).sum() / max((ok & mask).sum(), 1))
    ok = hit & ok
  return np.array(out)


@pytest.mark.parametrize("impl,chunk", [("scan", 0), ("scan", 8), ("naive", 0)])
def test_head_acceptance_matches_reference(impl, chunk):
  c = tiny_config(n_future=3, vocab_size=2)    # two tokens: heads are right by chance half the time
  c.train.batch_size = 4
  model = build_model(c.model)
  params = init_params(model, jax.random.key(0))
  batch = _batch(c)
  fn = {"scan": mtp_loss_scan, "naive": mtp_loss_naive}[impl]
  _, m = jax.jit(lambda p, b: fn(p, b, model, c.data.seq_len, chunk_size=chunk))(params, batch)
  logits, _ = jax.jit(model.apply)({"params": params}, batch["tokens"][:, :c.data.seq_len],
                                   segment_ids=batch["segment_ids"][:, :c.data.seq_len])
  ref = _acceptance_reference(logits, batch, c.data.seq_len, 3)
  np.testing.assert_allclose(np.asarray(m["head_acceptance"]), ref, rtol=1e-6)
  np.testing.assert_allclose(m["head_acceptance"][0], m["head_accuracies"][0], rtol=1e-6)
  assert 0 < ref[2] < 1


def _heads_config(trainable="heads"):
  c = tiny_config(n_future=3)
  c.train.update(trainable=trainable, warmup_steps=0, learning_rate=1e-2)
  return c


def test_trainable_heads_freezes_all_else_bit_exactly():
  c = _heads_config()
  model = build_model(c.model)
  tx = step.make_optimizer(c.train)
  params = init_params(model, jax.random.key(0))
  before = jax.device_get(params)
  state = step.new_train_state(jax.tree.map(jnp.copy, params), tx)
  train_step = jax.jit(step.make_train_step(model, c, tx), donate_argnums=0)
  for i in range(3):
    state, metrics = train_step(state, _batch(c, seed=i))
  after = jax.device_get(state.params)
  for (path, x), y in zip(jax.tree.leaves_with_path(before), jax.tree.leaves(after)):
    name = step.param_path(path)
    if name.startswith(("heads_1/", "heads_2/")):
      assert not np.array_equal(x, y), name
    else:
      assert x.tobytes() == y.tobytes(), name     # trunk, head 1, norm, embedding, unembedding
  # no optimizer moments for frozen leaves: Adam's mu + nu hold exactly the two trained heads
  head_size = sum(x.size for k, x in before.items() if k in ("heads_1", "heads_2") for x in jax.tree.leaves(x))
  moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
  assert moments == 2 * head_size
  assert np.isfinite(float(metrics["loss"]))


def test_frozen_trunk_does_less_work_and_dry_run_reports_the_saving():
  reports = {t: dry_run_report(_heads_config(t)) for t in ("all", "heads")}
  full, heads = reports["all"], reports["heads"]
  assert heads["optimizer_bytes_per_device"] < full["optimizer_bytes_per_device"]
  assert heads["optimizer_bytes_saved_per_device"] == full["optimizer_bytes_per_device"] - \
      heads["optimizer_bytes_per_device"]
  assert heads["params_trainable"] == heads["params_heads"] * 2 // 3
  # no backward pass through the trunk, head 1 or the embedding: the compiled step computes less
  assert heads["compiled_flops_per_step"] < 0.85 * full["compiled_flops_per_step"]


def test_trainable_regex_and_its_errors():
  c = _heads_config(r"trunk/.*")
  model = build_model(c.model)
  mask = step.trainable_mask(init_params(model, jax.random.key(0)), c.train.trainable)
  assert all(v for k, v in mask["trunk"]["layer"].items()) and not any(jax.tree.leaves(mask["heads_0"]))
  c.train.trainable = "nothing_matches"
  tx = step.make_optimizer(c.train)
  state = step.new_train_state(init_params(model, jax.random.key(0)), tx)
  with pytest.raises(UserError, match="matches no parameter"):
    jax.jit(step.make_train_step(model, c, tx))(state, _batch(c))
  from mtp_jax.config import ConfigError, validate
  c = tiny_config(n_future=1)
  c.train.trainable = "heads"
  with pytest.raises(ConfigError, match="model.n_future=1"):
    validate(c)
  c.train.trainable = "heads_(["
  with pytest.raises(ConfigError, match="is not a regex"):
    validate(c)


def test_imported_model_trains_heads_on_a_frozen_trunk(tmp_path):
  """convert import (+2 heads) -> main with trainable=heads from step 0 -> generate; head 1 unchanged."""
  w, cache = tmp_path / "w", tmp_path / "cache"
  env = {**os.environ, "PYTHONPATH": ROOT}
  src = os.path.join(ROOT, "tests", "fixtures", "pretrained", "hf_gqa_untied")
  r = subprocess.run([sys.executable, "-m", "mtp_jax.convert", "import", f"--from={src}", f"--workdir={w}",
                      "--n_future=3"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  r = subprocess.run([sys.executable, "-m", "mtp_jax.main", f"--config=configs/imported.py:{w}", f"--workdir={w}",
                      "--config.train.trainable=heads", "--config.train.steps=4", "--config.train.batch_size=2",
                      "--config.data.seq_len=32", "--config.train.log_every=2", "--config.train.eval_every=4",
                      "--config.train.eval_batches=1", "--config.train.checkpoint_every=4",
                      "--config.train.warmup_steps=0", "--config.data.max_train_bytes=60000",
                      f"--config.data.cache_dir={cache}"], cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  assert "starting at step 0 from the imported parameters" in r.stdout
  valid = [json.loads(l) for l in open(w / "metrics.jsonl") if '"valid"' in l][-1]
  assert len(valid["head_acceptance"]) == 3 and valid["step"] == 4
  from mtp_jax.checkpoint import load_params
  from mtp_jax.checkpoint import load_pretrained
  trained, config = load_params(w)
  imported = load_pretrained(w, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trained))
  for k in ("trunk", "heads_0", "embed", "unembed", "final_norm"):
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b), trained[k], imported[k])), k
  assert not np.array_equal(trained["heads_1"]["up"]["kernel"], imported["heads_1"]["up"]["kernel"])
  r = subprocess.run([sys.executable, "-m", "mtp_jax.generate", f"--workdir={w}", "--prompt=def f(x):",
                      "--mode=speculative", "--max_new_tokens=8"], cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert json.loads(r.stderr.strip().splitlines()[-1])["tokens_per_forward"] >= 1


@pytest.mark.slow   # four toy trainings and three decode benchmarks: ~1.5 min alone on 2 cores, over CI's budget
def test_frozen_heads_experiment_quick(tmp_path):
  """experiments/findings/frozen_heads.py --quick: n=1 -> export -> import with 3 heads -> frozen and joint -> vs n=4."""
  r = subprocess.run([sys.executable, "experiments/findings/frozen_heads.py", "--quick", f"--workdir={tmp_path / 'w'}",
                      f"--out_dir={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                     env={**os.environ, "PYTHONPATH": ROOT})
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  res = json.load(open(tmp_path / "out" / "frozen_heads_quick.json"))
  for kind in ("frozen", "joint", "n4"):
    assert len(res[kind]["head_acceptance"]) == 4 and res[kind]["identical_to_greedy"]
    assert 1 <= res[kind]["tokens_per_forward"] <= 4
