"""The trainer end to end on configs/tiny.py: logs, checkpoints, exact resume after SIGKILL, SIGTERM,
damaged checkpoints, refused workdirs, divergence."""
import json
import os
import shutil
import signal
import time

import jax
import numpy as np
import pytest

from configs.tiny import get_config
from mtp_jax import checkpoint, step, tokenizer, train
from mtp_jax.errors import UserError

from helpers import records, run_main, snapshot, train_config


def test_one_step(tmp_path, cache_dir, capsys):
  c = train_config(cache_dir, steps=1, eval_every=1, checkpoint_every=1)
  final = train.train_and_evaluate(c, tmp_path)
  out = capsys.readouterr().out
  assert "compiled train step memory" in out and "unigram baseline" in out
  (rec,) = records(tmp_path)
  for key in ("loss", "head_losses", "head_accuracies", "lr", "grad_norm", "tokens_per_sec"):
    assert key in rec, key
  assert rec["step"] == 1 and len(rec["head_losses"]) == c.model.n_future and np.isfinite(rec["loss"])
  (valid,) = records(tmp_path, "valid")
  assert valid == final and valid["unigram_loss"] > 0 and len(valid["head_accuracies"]) == c.model.n_future
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))
  # What generate.py reloads: params of the latest checkpoint, the config, the tokenizer.
  params, config = checkpoint.load_params(tmp_path)
  assert config.model.to_dict() == c.model.to_dict()
  assert params["unembed"]["kernel"].shape == (c.model.d_model, c.model.vocab_size)
  tok = tokenizer.load_tokenizer(tmp_path)
  assert tok.vocab_size == c.model.vocab_size and tok.decode(tok.encode("x = 1\n")) == "x = 1\n"


def test_load_params_without_checkpoint(tmp_path):
  with pytest.raises(UserError, match="config.json"):
    checkpoint.load_params(tmp_path)
  (tmp_path / "config.json").write_text(get_config().to_json())
  with pytest.raises(UserError, match="no checkpoint yet"):
    checkpoint.load_params(tmp_path)


def test_variant_and_overrides(tmp_path, cache_dir):
  # A relative --workdir, as the README's command gives (orbax itself wants absolute paths).
  r = run_main("run", cache_dir, "--config.train.steps=2", "--config.model.d_model=16",
               "--config.train.learning_rate=0.01", "--config.train.checkpoint_every=1",
               config="configs/tiny.py:bytes", cwd=tmp_path)
  assert r.returncode == 0, r.stderr
  saved = json.load(open(tmp_path / "run" / "config.json"))
  assert saved["data"]["tokenizer"] == "bytes" and saved["model"]["vocab_size"] == 258
  assert saved["model"]["d_model"] == 16 and saved["train"]["steps"] == 2 and saved["train"]["learning_rate"] == 0.01
  assert [r["step"] for r in records(tmp_path / "run")] == [1, 2]
  assert checkpoint.Checkpointer(tmp_path / "run", read_only=True).steps() == [1, 2]


def test_typo_rejected_in_one_line(tmp_path, cache_dir):
  r = run_main(tmp_path / "run", cache_dir, "--config.train.stpes=5")
  assert r.returncode == 2
  errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "stpes" in errors[0] and "Traceback" not in r.stderr
  assert not (tmp_path / "run").exists()


def test_resume_after_sigkill_is_exact(tmp_path, cache_dir):
  flags = ["--config.train.steps=40", "--config.train.checkpoint_every=10"]
  assert run_main(tmp_path / "full", cache_dir, *flags).returncode == 0
  killed = tmp_path / "killed"
  p = run_main(killed, cache_dir, *flags, wait=False)
  while not (killed / "checkpoints" / "20" / "commit_success.txt").exists():
    assert p.poll() is None, p.stdout.read()
    time.sleep(0.01)
  p.send_signal(signal.SIGKILL)
  p.wait()
  assert p.returncode == -signal.SIGKILL
  logged_before = len(records(killed))
  r = run_main(killed, cache_dir, *flags)
  assert r.returncode == 0, r.stderr
  resumed_from = int(r.stdout.split("resumed from the checkpoint of step ")[1].split()[0])
  assert resumed_from >= 20 and logged_before < 40
  full, again = records(tmp_path / "full"), records(killed)
  assert [x["step"] for x in again] == list(range(1, 41))
  for a, b in zip(full, again):   # bit-identical, including every step redone after the restore
    assert (a["step"], a["loss"], a["head_losses"], a["grad_norm"]) == (b["step"], b["loss"], b["head_losses"],
                                                                         b["grad_norm"])
  assert records(tmp_path / "full", "valid")[-1]["head_losses"] == records(killed, "valid")[-1]["head_losses"]


def test_sigterm_saves_and_resumes(tmp_path, cache_dir):
  workdir = tmp_path / "run"
  p = run_main(workdir, cache_dir, "--config.train.steps=100000", "--config.train.checkpoint_every=100000",
               wait=False)
  while not (workdir / "metrics.jsonl").exists() or len(records(workdir)) < 3:
    assert p.poll() is None, p.stdout.read()
    time.sleep(0.05)
  p.send_signal(signal.SIGTERM)
  out, _ = p.communicate(timeout=120)
  assert p.returncode == 0, out
  stopped = int(out.split("stopped by SIGTERM after step ")[1].split(";")[0])
  assert checkpoint.Checkpointer(workdir, read_only=True).steps() == [stopped]
  assert records(workdir)[-1]["step"] == stopped
  r = run_main(workdir, cache_dir, f"--config.train.steps={stopped + 2}")
  assert r.returncode == 0, r.stderr
  assert f"resumed from the checkpoint of step {stopped}" in r.stdout
  assert [x["step"] for x in records(workdir)] == list(range(1, stopped + 3))


def test_damaged_latest_checkpoint_falls_back(tmp_path, trained, cache_dir, capsys):
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  for d, _, files in os.walk(workdir / "checkpoints" / "20" / "params"):
    for f in files:   # truncate every data and metadata file of the newest checkpoint
      open(os.path.join(d, f), "w").close()
  train.train_and_evaluate(train_config(cache_dir, steps=20), workdir)
  out = capsys.readouterr().out
  assert "checkpoint step 20 is unreadable" in out and "resumed from the checkpoint of step 10" in out
  assert (workdir / "checkpoints_corrupt" / "20").exists()
  assert checkpoint.Checkpointer(workdir, read_only=True).steps() == [10, 20]
  assert [r["loss"] for r in records(workdir)] == [r["loss"] for r in records(trained)]


def test_refuses_other_model_shape_and_writes_nothing(tmp_path, trained, cache_dir):
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  before = snapshot(workdir)
  c = train_config(cache_dir, steps=30)
  c.model.d_model, c.data.seq_len = 64, 64
  with pytest.raises(UserError, match=r"model.d_model=32 there vs 64 now.*data.seq_len=32 there vs 64 now"):
    train.train_and_evaluate(c, workdir)
  assert snapshot(workdir) == before


def test_refuses_to_resume_over_other_data_and_writes_nothing(tmp_path, trained, cache_dir):
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  before = snapshot(workdir)
  c = train_config(cache_dir, steps=30)
  c.data.max_train_bytes = 150_000               # the same source, fewer of its bytes: another token stream
  with pytest.raises(UserError, match=r"trained on other data: data.source='stdlib', data.max_train_bytes=200000 gave [0-9,]+ "
                     r"train tokens.*this config's data.source='stdlib', data.max_train_bytes=150000 gives"):
    train.train_and_evaluate(c, workdir)
  corpus = tmp_path / "other.jsonl"
  corpus.write_text("".join(json.dumps({"text": f"line {i} of another corpus. " * 20}) + "\n" for i in range(300)))
  c = train_config(cache_dir, steps=30)
  c.data.update(source="jsonl", path=str(corpus))
  with pytest.raises(UserError, match=r"this config's data.source='jsonl', data.path='.*other.jsonl' gives"):
    train.train_and_evaluate(c, workdir)
  assert snapshot(workdir) == before


def test_the_same_data_spelled_another_way_resumes_with_a_note(tmp_path, cache_dir, capsys):
  """Another glob for the same files gives the same token stream, so the run resumes; an edited file does not."""
  os.makedirs(tmp_path / "a")
  for i in range(12):
    (tmp_path / "a" / f"doc{i:02d}.txt").write_text(f"document {i}: " + "some text to model. " * (300 + 17 * i))
  c = train_config(cache_dir, steps=10)
  c.data.update(source="glob", path=str(tmp_path / "a" / "*.txt"), max_train_bytes=0, tokenizer="bytes")
  c.model.vocab_size = 258
  workdir = tmp_path / "run"
  train.train_and_evaluate(c, workdir)
  record = json.loads((workdir / "data.json").read_text())
  c.data.path = str(tmp_path / "a" / "doc*.txt")
  c.train.steps = 12
  train.train_and_evaluate(c, workdir)
  out = capsys.readouterr().out
  assert "the data settings changed" in out and "resumed from the checkpoint of step 10" in out
  now = json.loads((workdir / "data.json").read_text())
  assert now["path"].endswith("doc*.txt") and now["train_digest"] == record["train_digest"]
  for i in range(12):          # one word changed in every document: same lengths, other tokens
    f = tmp_path / "a" / f"doc{i:02d}.txt"
    f.write_text(f.read_text().replace("model", "mode1", 1))
  c.train.steps = 14
  before = snapshot(workdir)
  with pytest.raises(UserError, match=r"the data under the same settings .* changed since the run started"):
    train.train_and_evaluate(c, workdir)
  assert snapshot(workdir) == before


def test_divergence_stops_without_saving(tmp_path, cache_dir, monkeypatch):
  make = step.make_train_step

  def poisoned(model, config, tx=None):   # the loss turns NaN from step 7 on
    step_fn = make(model, config, tx)

    def wrapped(state, batch):
      state, metrics = step_fn(state, batch)
      return state, dict(metrics, loss=jax.numpy.where(state.step >= 7, jax.numpy.nan, metrics["loss"]))
    return wrapped

  monkeypatch.setattr(step, "make_train_step", poisoned)
  with pytest.raises(train.TrainingDiverged, match="NaN/inf at step 7.*last good checkpoint is step 5"):
    train.train_and_evaluate(train_config(cache_dir, steps=20, checkpoint_every=5, log_every=4), tmp_path)
  assert checkpoint.Checkpointer(tmp_path, read_only=True).steps() == [5]


def test_second_run_in_a_busy_workdir_is_refused(tmp_path):
  """While one run holds the workdir, another is refused before it writes anything."""
  from mtp_jax import workdir as workdir_lib
  workdir = tmp_path / "run"
  holder = workdir_lib.lock(workdir)
  try:
    with pytest.raises(UserError, match="in use by another training run"):
      workdir_lib.lock(workdir)
  finally:
    holder.close()
  workdir_lib.lock(workdir).close()       # released with its holder: the next run may start
