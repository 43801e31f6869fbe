"""Faults injected into training and generation: each ends in a real checkpoint or one clear error, and
nothing is lost (issue 17). Signals during evaluation, NaN parameters, every checkpoint damaged, a
read-only or full checkpoint directory (real mounts: a read-only bind mount, a small tmpfs), a failed
first start, damaged caches, and a table of bad command-line inputs."""
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtp_jax import checkpoint, data, step, tokenizer, train
from mtp_jax.checkpoint import Checkpointer, CheckpointWriteError, NoUsableCheckpoint
from mtp_jax.config import ConfigError, base_config, validate
from mtp_jax.errors import UserError

from helpers import ROOT, records, run_main, train_config


def copy_run(trained, tmp_path, name="run"):
  workdir = tmp_path / name
  shutil.copytree(trained, workdir, ignore=shutil.ignore_patterns(".lock"))
  return workdir


def damage(checkpoint_dir):
  """Truncate every file of a checkpoint's parameters."""
  for d, _, files in os.walk(checkpoint_dir / "params"):
    for f in files:
      open(os.path.join(d, f), "w").close()


def write_nan_params(workdir, step_):
  """A checkpoint as the trainer wrote them before issue 17: NaN parameters (optimizer state kept)."""
  import orbax.checkpoint as ocp
  params, _ = checkpoint.load_params(workdir)
  target = workdir / "checkpoints" / str(step_) / "params"
  shutil.rmtree(target)
  with ocp.StandardCheckpointer() as ck:
    ck.save(target, jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), params))
    ck.wait_until_finished()


def _mount(*args) -> bool:
  return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@contextlib.contextmanager
def read_only(path):
  """`path` read-only for real: a read-only bind mount as root (chmod does not stop root), else chmod."""
  path = str(path)
  if os.geteuid() != 0:
    os.chmod(path, 0o555)
    try:
      yield "Permission denied"
    finally:
      os.chmod(path, 0o755)
    return
  if not _mount("--bind", path, path):
    pytest.skip("cannot bind-mount here")
  try:
    if not _mount("-o", "remount,bind,ro", path):
      pytest.skip("cannot remount read-only here")
    yield "Read-only file system"
  finally:
    subprocess.run(["umount", path], check=True)


@contextlib.contextmanager
def small_filesystem(path, kib: int):
  """A real filesystem of `kib` KiB at `path` (tmpfs), so writes run out of space."""
  if not _mount("-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(path)):
    pytest.skip("mounting a tmpfs needs root")
  try:
    yield
  finally:
    subprocess.run(["umount", str(path)], check=True)


# ----------------------------------------------------------------------------- broken item 1: signals

@pytest.mark.parametrize("resuming", [False, True])
def test_signal_during_start_up_ends_before_the_first_step(tmp_path, cache_dir, monkeypatch, capsys, resuming):
  """SIGTERM while the run starts (here: while its train step compiles): exit 0 with one line before any step,
  the workdir as it was (a resumed run's checkpoint kept), and the rerun trains on from there."""
  c = train_config(cache_dir, steps=4, eval_every=4, checkpoint_every=2)
  if resuming:
    train.train_and_evaluate(c, tmp_path)
    c = train_config(cache_dir, steps=8, eval_every=4, checkpoint_every=2)
  capsys.readouterr()
  compile_step = train.compile_train_step

  def signalling(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return compile_step(*args, **kwargs)

  monkeypatch.setattr(train, "compile_train_step", signalling)
  assert train.train_and_evaluate(c, tmp_path) is None
  out = capsys.readouterr().out
  before = "before step 5: nothing to save; a rerun resumes from the checkpoint of step 4" if resuming else \
      "before step 1: nothing to save; a rerun starts it afresh"
  assert f"stopped by SIGTERM during start-up, {before}" in out, out
  assert Checkpointer(tmp_path, read_only=True).steps() == ([2, 4] if resuming else [])
  monkeypatch.undo()
  assert train.train_and_evaluate(c, tmp_path)["step"] == c.train.steps


def test_signal_during_evaluation_ends_in_a_real_checkpoint(tmp_path, cache_dir, monkeypatch, capsys):
  """SIGTERM sent from inside the evaluation's compiled step (a host callback, while it runs): the save
  decision is taken after the evaluation, so the checkpoint exists and the rerun resumes from it."""
  make = train.make_eval_step

  def signalling(model, config):
    inner, sent = make(model, config), []

    def send():
      if not sent:
        sent.append(1)
        os.kill(os.getpid(), signal.SIGTERM)

    def eval_step(params, batch):
      jax.debug.callback(send)
      return inner(params, batch)
    return eval_step

  monkeypatch.setattr(train, "make_eval_step", signalling)
  c = train_config(cache_dir, steps=20, eval_every=5, checkpoint_every=1000)
  assert train.train_and_evaluate(c, tmp_path) is None
  assert "stopped by SIGTERM after step 5; checkpoint saved" in capsys.readouterr().out
  assert Checkpointer(tmp_path, read_only=True).steps() == [5]
  monkeypatch.undo()
  train.train_and_evaluate(train_config(cache_dir, steps=7, eval_every=5, checkpoint_every=1000), tmp_path)
  assert "resumed from the checkpoint of step 5" in capsys.readouterr().out
  assert [r["step"] for r in records(tmp_path)] == list(range(1, 8))


# ----------------------------------------------------------------------------- broken item 2: divergence

def test_nonfinite_state_is_never_saved_and_the_advice_works(tmp_path, cache_dir, monkeypatch, capsys):
  """The parameters turn NaN at step 10 (a save step) while that step's loss is still finite: nothing
  is saved, and rerunning with a lower learning rate, as the error says, resumes and finishes."""
  make = step.make_train_step

  def poisoned(model, config, tx=None):   # diverges only at the high learning rate
    fn, hot = make(model, config, tx), config.train.learning_rate > 5e-4

    def wrapped(state, batch):
      state, metrics = fn(state, batch)
      if hot:
        state = state.replace(params=jax.tree.map(lambda p: jnp.where(state.step >= 10, jnp.nan, p), state.params))
      return state, metrics
    return wrapped

  monkeypatch.setattr(step, "make_train_step", poisoned)
  c = train_config(cache_dir, steps=20, checkpoint_every=5)
  with pytest.raises(train.TrainingDiverged, match=r"parameters or optimizer state became NaN/inf by step 10.*"
                     r"last good checkpoint is step 5.*learning_rate.*resume from step 5"):
    train.train_and_evaluate(c, tmp_path)
  assert Checkpointer(tmp_path, read_only=True).steps() == [5]
  c.train.learning_rate = 2.5e-4
  final = train.train_and_evaluate(c, tmp_path)
  assert "resumed from the checkpoint of step 5" in capsys.readouterr().out
  assert np.isfinite(final["loss"]) and Checkpointer(tmp_path, read_only=True).steps()[-1] == 20


def test_nonfinite_checkpoints_are_refused(tmp_path, trained, cache_dir, capsys):
  """A NaN checkpoint (as older versions saved): generate falls back past it, or refuses when no other
  is left; training quarantines it and resumes from the last finite one."""
  workdir = copy_run(trained, tmp_path)
  write_nan_params(workdir, 20)
  params, _ = checkpoint.load_params(workdir)
  assert "checkpoints/20 is unusable (it holds NaN/inf" in capsys.readouterr().out
  assert checkpoint.all_finite(params)
  all_nan = copy_run(workdir, tmp_path, "all_nan")
  write_nan_params(all_nan, 10)
  with pytest.raises(NoUsableCheckpoint, match=r"no usable checkpoint.*step 20: unusable \(it holds NaN/inf.*step 10: unusable"):
    checkpoint.load_params(all_nan)
  train.train_and_evaluate(train_config(cache_dir, steps=20), workdir)
  out = capsys.readouterr().out
  assert "checkpoint step 20 is unusable (it holds NaN/inf" in out and "resumed from the checkpoint of step 10" in out
  assert (workdir / "checkpoints_corrupt" / "20").exists()
  assert [r["loss"] for r in records(workdir)] == [r["loss"] for r in records(trained)]   # redone exactly


# ----------------------------------------------------------------------------- broken item 3: all damaged

def test_every_checkpoint_damaged_stops_and_keeps_everything(tmp_path, trained, cache_dir):
  workdir = copy_run(trained, tmp_path)
  for s in (10, 20):
    damage(workdir / "checkpoints" / str(s))
  metrics = (workdir / "metrics.jsonl").read_bytes()
  with pytest.raises(NoUsableCheckpoint, match=r"no usable checkpoint .*step 20: unreadable .*step 10: unreadable .*nothing was changed"):
    train.train_and_evaluate(train_config(cache_dir, steps=20), workdir)
  assert (workdir / "metrics.jsonl").read_bytes() == metrics
  assert checkpoint.step_dirs(workdir) == [10, 20] and not (workdir / "checkpoints_corrupt").exists()


# ----------------------------------------------------------------------------- broken item 4: unwritable

def test_read_only_checkpoints_fail_fast_and_stay_intact(tmp_path, trained, cache_dir):
  workdir = copy_run(trained, tmp_path)
  with read_only(workdir / "checkpoints") as why:
    began = time.time()
    with pytest.raises(CheckpointWriteError, match=rf"step 25 .*\({why}\); the earlier checkpoints \(steps 10, 20\) "
                                                   rf"are intact.*resume from step 20"):
      train.train_and_evaluate(train_config(cache_dir, steps=30, checkpoint_every=5), workdir)
    assert time.time() - began < 120      # was: 300 s waiting in orbax, then tracebacks
  assert Checkpointer(workdir, read_only=True).steps() == [10, 20]
  assert checkpoint.all_finite(checkpoint.load_params(workdir)[0])


def test_full_disk_fails_fast_and_keeps_the_earlier_checkpoint(tmp_path, cache_dir):
  """checkpoints/ on a 1300 KiB filesystem: the step-5 checkpoint (~0.9 MiB) fits, step 10's does not."""
  workdir = tmp_path / "run"
  (workdir / "checkpoints").mkdir(parents=True)
  with small_filesystem(workdir / "checkpoints", 1300):
    began = time.time()
    with pytest.raises(CheckpointWriteError, match=r"step 10 .*No space left on device.*\(steps 5\) are intact"):
      train.train_and_evaluate(train_config(cache_dir, steps=20, checkpoint_every=5), workdir)
    assert time.time() - began < 120
    assert checkpoint.step_dirs(workdir) == [5] and not list((workdir / "checkpoints").glob("*tmp*"))
    assert checkpoint.all_finite(checkpoint.load_params(workdir)[0])


def test_disk_full_during_the_write_is_reported_the_same(tmp_path, cache_dir, monkeypatch):
  """Without the free-space check the disk fills inside orbax's background write: same one error."""
  monkeypatch.setattr(Checkpointer, "_check_writable", lambda self, step_, nbytes: None)
  workdir = tmp_path / "run"
  (workdir / "checkpoints").mkdir(parents=True)
  with small_filesystem(workdir / "checkpoints", 1300):
    began = time.time()
    with pytest.raises(CheckpointWriteError, match=r"step 10 .*No space left on device.*\(steps 5\) are intact"):
      train.train_and_evaluate(train_config(cache_dir, steps=20, checkpoint_every=5), workdir)
    assert time.time() - began < 120
    assert checkpoint.step_dirs(workdir) == [5]
    assert checkpoint.all_finite(checkpoint.load_params(workdir)[0])


# ----------------------------------------------------------------------------- broken item 5: first start

def test_failed_first_start_does_not_lock_the_shape(tmp_path, cache_dir, monkeypatch):
  c = train_config(cache_dir, steps=2, checkpoint_every=1)
  c.mesh.data = 2                              # a mesh error, after config.json was written
  with pytest.raises(UserError, match="needs 2 devices"):
    train.train_and_evaluate(c, tmp_path)
  assert (tmp_path / "config.json").exists()
  make = step.make_train_step
  monkeypatch.setattr(step, "make_train_step", lambda model, config, tx=None: (
      lambda s, b: (lambda out: (out[0], dict(out[1], loss=jnp.nan)))(make(model, config, tx)(s, b))))
  c = train_config(cache_dir, steps=2, checkpoint_every=1)
  c.model.d_model = 16                         # another shape, and it dies at step 1
  with pytest.raises(train.TrainingDiverged, match="at step 1.*no checkpoint was saved.*start again from step 0"):
    train.train_and_evaluate(c, tmp_path)
  monkeypatch.undo()
  train.train_and_evaluate(train_config(cache_dir, steps=2, checkpoint_every=1), tmp_path)   # the corrected command
  assert Checkpointer(tmp_path, read_only=True).steps() == [1, 2]
  c.model.d_model = 16                         # now a checkpoint binds the shape
  with pytest.raises(UserError, match="model.d_model=32 there vs 16 now"):
    train.train_and_evaluate(c, tmp_path)


# ----------------------------------------------------------------------------- broken item 6: temperature

@pytest.mark.parametrize("temperature", [1e-45, 0.0, float("inf"), float("nan")])
def test_sampling_temperature_must_be_usable(temperature):
  """One rule in every mode and at every entry (a value that cannot work is refused even where unused)."""
  from mtp_jax import decode
  for mode in ("sample", "greedy"):
    with pytest.raises(decode.DecodeError, match=f"temperature={temperature}"):
      decode.Request(mode, 4, temperature=temperature)
  decode.Request("greedy", 4, temperature=decode.MIN_TEMPERATURE)


# ----------------------------------------------------------------------------- broken item 7: config ranges

# One value that validate() must refuse for every field of base_config(): a field added without a
# check (or without a row here) fails test_validate_checks_every_field. None: the field's type admits
# no wrong value (ml_collections refuses a non-bool for a bool field, a non-str for a str field).
BAD = {
    "seed": 2 ** 64,
    "model.vocab_size": 1, "model.d_model": 0, "model.n_layers": 0, "model.n_heads": 0, "model.n_kv_heads": 0,
    "model.d_ff": 0, "model.max_seq_len": 0, "model.rope_theta": 0.0, "model.norm_eps": 0.0, "model.n_future": 0,
    "model.head_type": "tree", "model.parity": None, "model.tie_embeddings": None, "model.dtype": "int8",
    "model.param_dtype": "float8", "model.remat": "some", "model.attention": "magic",
    "model.rope_scaling.type": "yarn", "model.rope_scaling.factor": (0.0, {"model.rope_scaling.type": "llama3"}),
    "model.rope_scaling.low_freq_factor": (0.0, {"model.rope_scaling.type": "llama3"}),
    "model.rope_scaling.high_freq_factor": (0.5, {"model.rope_scaling.type": "llama3"}),
    "model.rope_scaling.original_max_len": (0, {"model.rope_scaling.type": "llama3"}),
    "loss.mtp_lambda": ("-1", {"model.head_type": "sequential"}), "train.trainable": "(",
    "data.prepare_shards": 0,
    "loss.impl": "vmap", "loss.chunk_size": -2, "loss.head_weights": "1,nan,1,1",
    "data.source": "ftp", "data.path": ("", {"data.source": "glob"}), "data.text_field": "",
    "data.valid_fraction": 1.0, "data.tokenizer": "", "data.seq_len": 0, "data.cache_dir": ("", {}),
    "data.max_train_bytes": -1,
    "train.steps": 0, "train.batch_size": 0, "train.learning_rate": float("nan"), "train.warmup_steps": -1,
    "train.min_lr_ratio": -0.1, "train.weight_decay": -0.1, "train.b1": 1.0, "train.b2": -0.5,
    "train.grad_clip": -1.0, "train.log_every": 0, "train.eval_every": 0, "train.eval_batches": 0,
    "train.checkpoint_every": 0, "train.keep_checkpoints": 0, "train.profile_steps": "5:2",
    "mesh.data": 0, "mesh.fsdp": -2, "mesh.tensor": 0, "mesh.rules": ((("vocab", "tensr"),), {}),
}
CACHE_DIR_IS_A_FILE = "data.cache_dir"


def _leaves(d, prefix=""):
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _leaves(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}"


def test_validate_checks_every_field(tmp_path):
  fields = list(_leaves(base_config().to_dict()))
  assert sorted(fields) == sorted(BAD), f"fields without a row in BAD: {sorted(set(fields) - set(BAD))}"
  for field in fields:
    bad = BAD[field]
    if bad is None:
      continue
    bad, extra = bad if isinstance(bad, tuple) and len(bad) == 2 and isinstance(bad[1], dict) else (bad, {})
    if field == CACHE_DIR_IS_A_FILE:
      (tmp_path / "file").write_text("")
      bad = str(tmp_path / "file")
    c = base_config()
    c.update_from_flattened_dict({field: bad, **extra})
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as e:
      validate(c)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("field, value", [
    ("train.min_lr_ratio", -0.5), ("train.grad_clip", -1.0), ("train.weight_decay", -0.1), ("train.b1", 1.0),
    ("train.b2", 1.5), ("model.rope_theta", -1.0), ("model.norm_eps", 0.0), ("loss.head_weights", "1,inf"),
    ("loss.head_weights", "geometric:inf"), ("data.max_train_bytes", -5),
])
def test_issue_settings_are_refused_with_the_right_cause(field, value):
  c = base_config()
  c.model.n_future = 2
  c.update_from_flattened_dict({field: value})
  with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
    validate(c)


# ----------------------------------------------------------------------------- damaged caches

def _private_cache(cache_dir, tmp_path):
  """A copy of the shared cache (tokenizer + token files), so damaging it disturbs no other test."""
  shutil.copytree(cache_dir, tmp_path / "cache", ignore=shutil.ignore_patterns("xla"))
  c = train_config(str(tmp_path / "cache"))
  return c, tmp_path / "cache"


def test_damaged_cached_tokenizer_is_trained_again(tmp_path, trained, cache_dir, capsys):
  c, cache = _private_cache(cache_dir, tmp_path)
  (model_file,) = cache.glob("tokenizer-*.model")
  good = model_file.read_bytes()
  for junk in (b"not a model", b""):              # corrupt, then empty (a 0-piece model)
    model_file.write_bytes(junk)
    tok = data.build_tokenizer(c)
    assert f"cached tokenizer {model_file} is damaged" in capsys.readouterr().out
    assert tok.proto == good and model_file.read_bytes() == good


def test_damaged_workdir_tokenizer_is_named(tmp_path, trained, cache_dir):
  workdir = copy_run(trained, tmp_path)
  (workdir / "tokenizer.model").write_bytes(b"\x00" * 10)
  with pytest.raises(UserError, match=r"tokenizer.model \(the run's copy of its tokenizer\) is damaged.*delete it") as e:
    data.build_tokenizer(train_config(cache_dir, steps=20), workdir=workdir)
  assert "data.tokenizer" not in str(e.value)
  with pytest.raises(UserError, match="tokenizer.model"):
    tokenizer.load_tokenizer(workdir)


@pytest.mark.parametrize("part", ["train.bin", "meta.json", "valid.starts.npy"])
def test_damaged_token_cache_is_rebuilt(tmp_path, trained, cache_dir, capsys, part):
  c, cache = _private_cache(cache_dir, tmp_path)
  want = data.build(c)
  want_train, want_starts = np.array(want.train.tokens), np.array(want.valid.starts)   # off the memmap
  del want
  (tokens_dir,) = cache.glob("tokens-*")
  f = tokens_dir / part
  f.write_bytes(f.read_bytes()[:len(f.read_bytes()) // 2])    # cut short, as a kill or a full disk leaves it
  got = data.build(c)
  assert f"token cache {tokens_dir} is damaged" in capsys.readouterr().out
  assert np.array_equal(got.train.tokens, want_train) and np.array_equal(got.valid.starts, want_starts)


# ----------------------------------------------------------------------------- the CLIs over bad inputs

def _generate(*args):
  return subprocess.run([sys.executable, "-m", "mtp_jax.generate", *args], cwd=ROOT, capture_output=True, text=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}, timeout=300)


@pytest.fixture(scope="module")
def bad_places(tmp_path_factory, trained):
  """Workdirs and files the table below points at (built once)."""
  root = tmp_path_factory.mktemp("bad")
  p = {"root": root, "good": trained}
  (root / "a_file").write_text("x")
  for name, text in (("not_json", "{not json"), ("lacks_fields", '{"model": {}}')):
    w = copy_run(trained, root, name)
    (w / "config.json").write_text(text)
    p[name] = w
  p["all_damaged"] = copy_run(trained, root, "all_damaged")
  for s in (10, 20):
    damage(p["all_damaged"] / "checkpoints" / str(s))
  p["all_emptied"] = copy_run(trained, root, "all_emptied")       # every file, orbax's metadata included
  for d, _, files in os.walk(p["all_emptied"] / "checkpoints"):
    for f in files:
      open(os.path.join(d, f), "w").close()
  p["all_nan"] = copy_run(trained, root, "all_nan")
  write_nan_params(p["all_nan"], 20)
  write_nan_params(p["all_nan"], 10)
  p["bad_tokenizer"] = copy_run(trained, root, "bad_tokenizer")
  (p["bad_tokenizer"] / "tokenizer.model").write_bytes(b"junk")
  (root / "prompts_dir.jsonl").mkdir()
  (root / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
  (root / "array.jsonl").write_text('{"prompt": "ok"}\n\n["a", "b"]\n')
  (root / "number.jsonl").write_text('{"prompt": 3}\n')
  (root / "ro").mkdir()
  return p


# (name, CLI, argv from the places, words the one error line must hold). {x} is bad_places[x].
TABLE = [
    ("config.json not JSON", "main", ["--workdir={not_json}"], "config.json is damaged"),
    ("config.json lacks fields", "main", ["--workdir={lacks_fields}"], "config.json is damaged"),
    ("workdir is a file", "main", ["--workdir={root}/a_file"], "is a file"),
    ("workdir parent is a file", "main", ["--workdir={root}/a_file/run"], "cannot be created"),
    ("dry run, workdir is a file", "main", ["--workdir={root}/a_file", "--dry_run"], "is a file"),
    ("read-only workdir", "main", ["--workdir={root}/ro/run"], "cannot write in"),
    ("stray positional argument", "main", ["--workdir={root}/w", "steps=5"], "unexpected argument 'steps=5'"),
    ("negative max_train_bytes", "main", ["--workdir={root}/w", "--config.data.max_train_bytes=-1"],
     "data.max_train_bytes=-1"),
    ("rope_theta 0", "main", ["--workdir={root}/w", "--config.model.rope_theta=0"], "model.rope_theta=0"),
    ("every checkpoint damaged", "main", ["--workdir={all_damaged}"], "no usable checkpoint"),
    ("every checkpoint file emptied", "main", ["--workdir={all_emptied}"], "no usable checkpoint"),
    ("generate: config.json not JSON", "generate", ["--workdir={not_json}", "--prompt=a"], "config.json is damaged"),
    ("generate: config.json lacks fields", "generate", ["--workdir={lacks_fields}", "--prompt=a"], "lacks model."),
    ("generate: workdir is a file", "generate", ["--workdir={root}/a_file", "--prompt=a"], "is a file"),
    ("generate: only NaN checkpoints", "generate", ["--workdir={all_nan}", "--prompt=a"], "no usable checkpoint"),
    ("generate: every checkpoint damaged", "generate", ["--workdir={all_damaged}", "--prompt=a"],
     "no usable checkpoint"),
    ("generate: every checkpoint file emptied", "generate", ["--workdir={all_emptied}", "--prompt=a"],
     "no usable checkpoint"),
    ("generate: damaged tokenizer.model", "generate", ["--workdir={bad_tokenizer}", "--prompt=a"],
     "tokenizer.model (the run's copy"),
    ("prompt_file is a directory", "generate", ["--workdir={good}", "--prompt_file={root}/prompts_dir.jsonl"],
     "is a directory"),
    ("prompt_file not UTF-8", "generate", ["--workdir={good}", "--prompt_file={root}/latin1.txt"], "not UTF-8"),
    ("JSONL array on line 3", "generate", ["--workdir={good}", "--prompt_file={root}/array.jsonl"], "line 3: expected"),
    ("JSONL non-string prompt", "generate", ["--workdir={good}", "--prompt_file={root}/number.jsonl"],
     "line 1: expected"),
    ("output is a directory", "generate", ["--workdir={good}", "--prompt=a", "--output={root}"], "is a directory"),
    ("output under a file", "generate", ["--workdir={good}", "--prompt=a", "--output={root}/a_file/o.jsonl"],
     "is a file"),
    ("output read-only", "generate", ["--workdir={good}", "--prompt=a", "--output={root}/ro/o.jsonl"], "cannot write"),
    ("temperature inf", "generate", ["--workdir={good}", "--prompt=a", "--temperature=inf"], "--temperature=inf"),
    ("temperature 1e-45", "generate", ["--workdir={good}", "--prompt=a", "--mode=sample", "--temperature=1e-45"],
     "temperature=1e-45"),
    ("batch_size 0", "generate", ["--workdir={good}", "--prompt=a", "--batch_size=0"], "--batch_size=0"),
    ("eos_id outside the vocabulary", "generate", ["--workdir={good}", "--prompt=a", "--eos_id=99999"],
     "eos_id=99999"),
    ("draft_heads with greedy", "generate", ["--workdir={good}", "--prompt=a", "--draft_heads=2"],
     "--mode=greedy drafts nothing"),
    ("draft_heads past n_future", "generate", ["--workdir={good}", "--prompt=a", "--mode=speculative",
                                               "--draft_heads=9"], "draft_heads=9: the speculative block is 2..n_future"),
    ("seed too large", "generate", ["--workdir={good}", "--prompt=a", f"--seed={2 ** 64}"], "seed="),
    ("generate: stray positional argument", "generate", ["--workdir={good}", "--prompt=a", "extra"],
     "unexpected argument 'extra'"),
]


@pytest.mark.parametrize("name, cli, argv, words", TABLE, ids=[row[0] for row in TABLE])
def test_cli_bad_input_is_one_error_line(bad_places, cache_dir, name, cli, argv, words):
  argv = [a.format(**bad_places) for a in argv]
  ro = contextlib.nullcontext() if "ro/" not in " ".join(argv) else read_only(bad_places["root"] / "ro")
  with ro:
    if cli == "main":
      r = run_main(argv[0].split("=", 1)[1], cache_dir, *argv[1:])
    else:
      r = _generate(*argv, "--max_new_tokens=4")
  out = r.stdout + r.stderr
  assert r.returncode == 2, out
  errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and words in errors[0], out
  assert "Traceback" not in out and "Event loop is closed" not in out
  assert "Failed to json parse" not in out     # orbax's record of a damaged metadata file, its bytes included
  if cli == "generate":   # nothing said twice (orbax's warnings were, once per read attempt)
    said = [l for l in out.splitlines() if l.strip()]
    assert len(said) == len(set(said)), out
  assert not (bad_places["root"] / "ro" / "run").exists()


def test_tilde_workdir_is_expanded(tmp_path, cache_dir):
  """--workdir=~/x means $HOME/x, not a literal ./~ (here with --dry_run)."""
  env_home = tmp_path / "home"
  env_home.mkdir()
  r = subprocess.run([sys.executable, "-m", "mtp_jax.main", f"--config={ROOT}/configs/tiny.py", "--workdir=~/x",
                      "--dry_run"],
                     cwd=tmp_path, capture_output=True, text=True, timeout=300,
                     env={**os.environ, "HOME": str(env_home), "PYTHONPATH": ROOT})
  assert r.returncode == 0, r.stderr
  assert (env_home / "x" / "dry_run.json").exists() and not (tmp_path / "~").exists()


def test_generate_fallback_past_a_damaged_checkpoint_is_quiet(bad_places, tmp_path):
  """The newest checkpoint's arrays damaged: generate uses the previous one, with one warning and none of
  the 'Event loop is closed' tracebacks orbax's abandoned reads used to print."""
  workdir = copy_run(bad_places["good"], tmp_path)
  for d, _, files in os.walk(workdir / "checkpoints" / "20" / "params"):
    for f in files:
      if "ocdbt.process" in d:
        with open(os.path.join(d, f), "r+b") as fh:
          fh.truncate(10)
  r = _generate(f"--workdir={workdir}", "--prompt=def f", "--max_new_tokens=4")
  assert r.returncode == 0, r.stderr
  assert "checkpoints/20 is unreadable" in r.stdout + r.stderr
  assert "Event loop is closed" not in r.stderr and "Traceback" not in r.stderr


def test_abandoned_read_tasks_are_not_logged_but_other_task_errors_are(caplog):
  """The intermittent half of the noise above: asyncio logs 'Task exception was never retrieved' when it
  collects an abandoned read task; those (and only those) are dropped."""
  import asyncio
  import gc

  async def fails(message):
    raise Exception(message)

  checkpoint._drop_closed_loop_noise()
  gc.collect()       # earlier tests' abandoned tasks (the disk-full test's writes) are logged now, not below
  caplog.clear()
  messages = ("Encountered error while reading array index: (slice(0, 1, 1),)", "a real bug")
  loop = asyncio.new_event_loop()
  for message in messages:
    task = loop.create_task(fails(message))
    loop.run_until_complete(asyncio.sleep(0))
    assert task.done()
    del task
  loop.close()
  with caplog.at_level("ERROR", logger="asyncio"):
    gc.collect()
  logged = [str(r.exc_info[1]) for r in caplog.records if r.name == "asyncio" and r.exc_info]
  assert [m for m in logged if m in messages] == ["a real bug"]


# ----------------------------------------------------------------------------- imported weights, prepare, records

PRETRAINED = os.path.join(ROOT, "tests", "fixtures", "pretrained")


def _source_copy(root, name, fixture="hf_gqa_untied", **config_fields):
  import json
  d = root / name
  shutil.copytree(os.path.join(PRETRAINED, fixture), d)
  if config_fields:
    c = json.loads((d / "config.json").read_text())
    c.update(config_fields)
    (d / "config.json").write_text(json.dumps(c))
  return d


def _poison(path, key, value):
  """One element (or, value=nan, the whole tensor) of a safetensors file's tensor `key` set to `value`."""
  from safetensors.numpy import load_file, save_file
  tensors = load_file(str(path))
  if np.isnan(value):
    tensors[key] = np.full_like(tensors[key], value)
  else:
    tensors[key].flat[0] = value
  save_file(tensors, str(path))


def _jsonl_lines(n=40):
  import json
  return [json.dumps({"text": f"record {i}: " + "some words of text " * 8}).encode() for i in range(n)]


@pytest.fixture(scope="module")
def bad_sources(tmp_path_factory):
  """Checkpoints, workdirs and corpora for SOURCE_TABLE (built once)."""
  import gzip
  import pyarrow as pa
  import pyarrow.parquet as pq
  from mtp_jax.workdir import config_json
  from helpers import tiny_config
  root = tmp_path_factory.mktemp("sources")
  p = {"root": root}
  p["bad_generation"] = _source_copy(root, "bad_generation")
  (p["bad_generation"] / "generation_config.json").write_text('{"bos_token_id": 1,')
  p["no_heads"] = _source_copy(root, "no_heads", num_attention_heads=0)
  p["deeper"] = _source_copy(root, "deeper", num_hidden_layers=2)       # the weights hold 3 layers
  p["nan"] = _source_copy(root, "nan")
  _poison(p["nan"] / "model.safetensors", "model.layers.1.mlp.up_proj.weight", np.nan)
  p["meta_inf"] = _source_copy(root, "meta_inf", "meta_mtp")
  _poison(p["meta_inf"] / "consolidated.safetensors", "extra_heads.0.feed_forward.w1.weight", np.inf)
  p["sequential"] = root / "sequential"
  p["sequential"].mkdir()
  (p["sequential"] / "config.json").write_text(config_json(tiny_config(head_type="sequential", n_future=2)))
  whole = gzip.compress(b"\n".join(_jsonl_lines() * 20) + b"\n")
  (root / "truncated.jsonl.gz").write_bytes(whole[:len(whole) // 2])
  pq.write_table(pa.table({"body": ["a document " * 20] * 8}), str(root / "no_text.parquet"))
  (root / "one_record.jsonl").write_bytes(_jsonl_lines(1)[0] + b"\n")
  (root / "empty_dir").mkdir()
  return p


_PREPARE = ["--config.data.max_train_bytes=0", "--output={root}/prepared"]   # after --config=configs/tiny.py:bytes
# (name, CLI, argv from the places, words the one error line must hold). {x} is bad_sources[x].
SOURCE_TABLE = [
    ("convert: damaged generation_config.json", "convert", ["import", "--from={bad_generation}", "--workdir={root}/w"],
     "generation_config.json is not JSON"),
    ("convert: num_attention_heads 0", "convert", ["import", "--from={no_heads}", "--workdir={root}/w"],
     "num_attention_heads=0 must be a positive integer"),
    ("convert: more layers than num_hidden_layers", "convert", ["import", "--from={deeper}", "--workdir={root}/w"],
     "hold 3 model.layers.* (model.layers.0..2) but config.json's num_hidden_layers=2"),
    ("convert: a NaN tensor", "convert", ["import", "--from={nan}", "--workdir={root}/w"],
     "tensor model.layers.1.mlp.up_proj.weight (our trunk/layer/up/kernel[1]) holds 6144 NaN/inf values"),
    ("convert: an inf in a Meta extra head", "convert", ["import", "--from={meta_inf}", "--workdir={root}/w"],
     "tensor extra_heads.0.feed_forward.w1.weight (our heads_1/gate/kernel) holds 1 NaN/inf value"),
    ("convert: export of sequential heads", "convert", ["export", "--workdir={sequential}", "--to={root}/hf"],
     "sequential heads do not export"),
    ("prepare: truncated .jsonl.gz", "prepare",
     ["--config=configs/tiny.py:bytes", "--config.data.source=jsonl", "--config.data.path={root}/truncated.jsonl.gz", *_PREPARE],
     "truncated.jsonl.gz cannot be read to its end (EOFError"),
    ("prepare: Parquet without the text column", "prepare",
     ["--config=configs/tiny.py:bytes", "--config.data.source=parquet", "--config.data.path={root}/no_text.parquet", *_PREPARE], "has no column 'text'"),
    ("prepare: a split comes out empty", "prepare",
     ["--config=configs/tiny.py:bytes", "--config.data.source=jsonl", "--config.data.path={root}/one_record.jsonl", *_PREPARE],
     "came out empty (1 files); add data or change data.valid_fraction (nothing was left in --output"),
    ("main: truncated .jsonl.gz", "main",
     ["--workdir={root}/run", "--config.data.source=jsonl", "--config.data.path={root}/truncated.jsonl.gz"],
     "truncated.jsonl.gz cannot be read to its end (EOFError"),
    ("main: data.path an empty directory", "main",
     ["--workdir={root}/run", "--config.data.source=jsonl", "--config.data.path={root}/empty_dir"],
     "is an empty directory"),
]


@pytest.mark.parametrize("name, cli, argv, words", SOURCE_TABLE, ids=[row[0] for row in SOURCE_TABLE])
def test_new_paths_bad_input_is_one_error_line(bad_sources, cache_dir, name, cli, argv, words):
  """The converter, prepare and the record sources: one `error:` line, exit 2, nothing written (the
  workdir, the export and the prepare output are absent or empty afterwards)."""
  argv = [a.format(**bad_sources) for a in argv]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  if cli == "main":
    r = run_main(argv[0].split("=", 1)[1], cache_dir, *argv[1:])
  else:
    r = subprocess.run([sys.executable, "-m", f"mtp_jax.{cli}", *argv], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
  out = r.stdout + r.stderr
  assert r.returncode == 2, out
  errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and words in errors[0], out
  assert "Traceback" not in out, out
  root = bad_sources["root"]
  for place in ("w", "hf", "run", "prepared"):
    assert not (root / place).exists() or not any((root / place).iterdir()), place


def test_every_importer_is_checked_where_the_workdir_is_written(tmp_path):
  """write_workdir, which every importer calls, refuses non-finite parameters by our path: nothing written."""
  from mtp_jax.interop import workdir as import_workdir
  from mtp_jax.interop.tensors import ConvertError
  from helpers import tiny_config
  params = {"embed": {"embedding": np.ones((4, 2), np.float32)}, "final_norm": {"scale": np.array([1, np.inf])}}
  with pytest.raises(ConvertError, match=r"parameter final_norm/scale holds 1 NaN/inf value .*nothing was written"):
    import_workdir.write_workdir(tmp_path / "w", tiny_config(), params, None)
  assert not (tmp_path / "w").exists() and os.listdir(tmp_path) == []


def test_imported_workdir_refuses_another_tokenizer(tmp_path, cache_dir):
  """data.tokenizer=sentencepiece on an import with a Hugging Face tokenizer would train a new, unrelated
  tokenizer and fine-tune the imported embeddings on its ids: refused before anything is written."""
  from configs.imported import get_config as imported_config
  from mtp_jax import interop
  from helpers import snapshot
  w = tmp_path / "w"
  interop.import_checkpoint(os.path.join(PRETRAINED, "hf_gqa_untied"), w)
  before = snapshot(w)
  for field, value in (("tokenizer", "sentencepiece"), ("tokenizer", "bytes")):
    c = imported_config(str(w))
    c.data.update({field: value, "cache_dir": cache_dir, "max_train_bytes": 200_000})
    with pytest.raises(UserError, match=rf"imported model .*data\.tokenizer='huggingface' there vs {value!r} now"):
      train.train_and_evaluate(c, w)
    assert snapshot(w) == before          # config.json as it was, no tokenizer.model left behind


def test_trainable_heads_run_resumes_with_trainable_all(tmp_path, cache_dir, capsys):
  """A train.trainable=heads checkpoint resumed with trainable=all: parameters, step, schedule and data
  position come back, the newly trainable arrays start with zero moments (said in one line)."""
  import json
  train.train_and_evaluate(train_config(cache_dir, steps=4, checkpoint_every=4, trainable="heads"), tmp_path)
  capsys.readouterr()
  c = train_config(cache_dir, steps=8, checkpoint_every=4, trainable="all")
  train.train_and_evaluate(c, tmp_path)
  out = capsys.readouterr().out
  assert "train.trainable='all' now, 'heads' when the checkpoint of step 4 was saved" in out, out
  assert "newly trainable parameter arrays start with zero AdamW moments" in out
  assert "resumed from the checkpoint of step 4" in out
  assert json.loads((tmp_path / "config.json").read_text())["train"]["trainable"] == "all"
  assert [r["step"] for r in records(tmp_path)] == list(range(1, 9))
  assert Checkpointer(tmp_path, read_only=True).steps()[-1] == 8


def test_carried_optimizer_state_keeps_counts_and_moments_of_what_still_trains(make_config):
  """heads -> all: the counts (Adam's and the schedule's) and the heads' moments carry over, the rest start
  at zero; all -> heads: the frozen leaves' moments are dropped."""
  c = make_config(n_future=2)
  params = {"trunk": {"w": jnp.ones((3, 2))}, "heads_1": {"w": jnp.ones((2, 2))}}
  c.train.trainable = "heads"
  heads = step.make_optimizer(c.train).init(params)
  heads = jax.tree.map(lambda x: x + 5 if x.ndim == 0 else x + 0.5, heads)     # as after some steps
  c.train.trainable = "all"
  fresh = step.make_optimizer(c.train).init(params)
  carried, started, dropped = step.carry_opt_state(heads, fresh)
  leaves = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(carried)}
  assert [int(x) for k, x in leaves.items() if k.endswith("count")] == [5, 5]
  assert np.all(leaves["[1][0].mu['heads_1']['w']"] == 0.5) and np.all(leaves["[1][0].mu['trunk']['w']"] == 0)
  assert started == ["['trunk']['w']"] and dropped == []
  back, started, dropped = step.carry_opt_state(carried, heads)
  assert started == [] and dropped == ["['trunk']['w']"]


def test_jsonl_record_that_is_not_utf8_is_skipped_and_counted(tmp_path):
  """A record whose bytes are not UTF-8 (or whose JSON escapes are no characters) is skipped and counted
  with the unreadable documents, never read as U+FFFD; .gz and Parquet included."""
  import gzip
  from mtp_jax.corpora import Corpus
  lines = _jsonl_lines(30)
  lines[3] = b'{"text": "caf\xe9 in latin-1"}'
  lines[7] = b'{"text": "a lone \\udc80 surrogate"}'
  for name, blob in (("a.jsonl", b"\n".join(lines) + b"\n"), ("a.jsonl.gz", gzip.compress(b"\n".join(lines)))):
    (tmp_path / name).write_bytes(blob)
    c = base_config()
    c.data.update(source="jsonl", path=str(tmp_path / name), max_train_bytes=0)
    corpus = Corpus(c.data)
    texts = list(corpus.texts("train")) + list(corpus.texts("valid"))
    assert len(texts) == 28 and not any("\ufffd" in t or "caf" in t or "lone" in t for t in texts)
    skipped = corpus.stats["train_skipped"] + corpus.stats["valid_skipped"]
    assert skipped == 2 and "skipped: unreadable or not UTF-8" in corpus.describe("train")
  import pyarrow as pa
  import pyarrow.parquet as pq
  values = [b"ok text " * 10] * 9 + [b"caf\xe9"]       # a string column holding bytes that are not UTF-8
  pq.write_table(pa.table({"text": pa.array(values, pa.binary()).view(pa.string())}), str(tmp_path / "a.parquet"))
  c.data.update(source="parquet", path=str(tmp_path / "a.parquet"))
  corpus = Corpus(c.data)
  texts = list(corpus.texts("train")) + list(corpus.texts("valid"))
  assert len(texts) == 9 and corpus.stats["train_skipped"] + corpus.stats["valid_skipped"] == 1


def test_prepare_failure_leaves_the_output_empty_and_a_rerun_works(bad_sources, tmp_path):
  """A split that comes out empty: nothing is left in --output, and the same --output then takes a good run."""
  from configs.tiny import get_config
  from mtp_jax.shards.pipeline import prepare
  c = get_config("bytes")
  c.data.update(source="jsonl", path=str(bad_sources["root"] / "one_record.jsonl"), max_train_bytes=0)
  c.data.prepare_shards = 2
  out = tmp_path / "prepared"
  with pytest.raises(UserError, match="came out empty"):
    prepare(c, str(out), ["--direct_running_mode=in_memory"])
  assert not out.exists() or not any(out.iterdir())
  (tmp_path / "corpus.jsonl").write_bytes(b"\n".join(_jsonl_lines(40)) + b"\n")
  c.data.path, c.data.valid_fraction = str(tmp_path / "corpus.jsonl"), 0.3
  meta = prepare(c, str(out), ["--direct_running_mode=in_memory"])
  assert meta["splits"]["train"]["docs"] + meta["splits"]["valid"]["docs"] == 40
