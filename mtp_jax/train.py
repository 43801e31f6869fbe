"""The trainer, top to bottom: check the workdir, build data and model, restore, train, evaluate.

    train_and_evaluate(config, workdir)

Rerunning the same command resumes from the newest good checkpoint: parameters, optimizer state,
RNG key and the data iterator position are all restored, so the resumed run logs bit-identical
losses (on CPU) for every step after the restored one. SIGTERM / SIGINT finish the current step,
save a checkpoint and exit with status 0; a second signal kills at once. A NaN/inf loss stops the
run without saving (the newest checkpoint stays the last good state) and exits with status 2.
"""
from __future__ import annotations

import fcntl
import json
import logging as std_logging
import os
import signal
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mtp_jax import data as data_lib
from mtp_jax import metrics as metrics_lib
from mtp_jax import sharding
from mtp_jax import tokenizer as tokenizer_lib
from mtp_jax.checkpoint import Checkpointer, with_shardings
from mtp_jax.config import loss_weights, validate
from mtp_jax.dry_run import compile_train_step, memory_report
from mtp_jax.errors import UserError
from mtp_jax.model import build_model
from mtp_jax.step import make_eval_step, make_optimizer

CONFIG_FILE = "config.json"


class TrainingDiverged(UserError):
  """The loss became NaN or inf."""


def _shape_fields(cfg: dict) -> dict:
  """The fields a checkpoint's shapes (and meaning) depend on: every model field, seq_len, tokenizer."""
  fields = {f"model.{k}": v for k, v in cfg["model"].items()}
  fields.update({f"data.{k}": cfg["data"][k] for k in ("seq_len", "tokenizer")})
  return fields


def check_workdir(config, workdir: Path) -> None:
  """Refuse (before writing anything) a workdir whose run has another model shape."""
  path = workdir / CONFIG_FILE
  if not path.exists():
    if (workdir / "checkpoints").exists():
      raise UserError(f"{workdir} holds checkpoints but no {CONFIG_FILE}, so their shapes cannot be checked; "
                      f"use a new --workdir (or restore {path})")
    return
  old, new = _shape_fields(json.loads(path.read_text())), _shape_fields(config.to_dict())
  diffs = [f"{k}={old.get(k)!r} there vs {new[k]!r} now" for k in new if old.get(k) != new[k]]
  if diffs:
    raise UserError(f"{workdir} holds a run with another model shape ({'; '.join(diffs)}); use a new --workdir, "
                    f"or the run's own values to resume it")


def _lock_workdir(workdir: Path):
  """Hold W/.lock exclusively while this run lives (the OS drops it even on SIGKILL): two runs in one
  workdir would interleave metrics and checkpoints. Returns the open lock file; keep it open."""
  workdir.mkdir(parents=True, exist_ok=True)
  lock = open(workdir / ".lock", "a")
  try:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    lock.close()
    raise UserError(f"{workdir} is in use by another training run; wait for it or stop it, or use another --workdir")
  return lock


def _write_config(config, workdir: Path) -> None:
  tmp = workdir / f".{CONFIG_FILE}.tmp"
  tmp.write_text(config.to_json(indent=2, sort_keys=True))
  os.replace(tmp, workdir / CONFIG_FILE)


class _QuietLibraries(std_logging.Filter):
  """Drop orbax's and grain's INFO chatter (tens of lines per checkpoint); keep their warnings."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or not any(p in record.pathname for p in ("/orbax/", "/grain/"))


def _say(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


class _StopOnSignal:
  """SIGTERM/SIGINT ask the loop to stop after the current step; a second signal acts at once."""

  def __init__(self):
    self.signal = None
    self._old = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, sig, frame):
    if self.signal is not None:   # second signal: the default behaviour, now
      signal.signal(sig, self._old[sig])
      os.kill(os.getpid(), sig)
      return
    self.signal = signal.Signals(sig).name
    _say(f"{self.signal}: finishing this step, saving a checkpoint, then exiting (signal again to stop now)")

  def __exit__(self, *exc):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)


@jax.jit
def _first_bad_step(bad, loss, step):
  """The first step whose loss was not finite (0: none yet), tracked on device so nothing waits."""
  return jnp.where((bad == 0) & ~jnp.isfinite(loss), step, bad)


def _memory_line(compiled) -> str:
  try:
    m = memory_report(compiled)
  except Exception:  # not every backend reports it
    return "compiled train step memory: not reported by this backend"
  mib = lambda b: f"{b / 2 ** 20:,.1f} MiB"
  return (f"compiled train step memory: arguments {mib(m['argument_bytes'])}, outputs {mib(m['output_bytes'])} "
          f"({mib(m['alias_bytes'])} aliased to donated arguments), temporaries {mib(m['temp_bytes'])}")


def train_and_evaluate(config, workdir) -> dict:
  """Train as config says in workdir (resuming if it holds a checkpoint); returns the final valid record."""
  validate(config)
  absl_logger = logging.get_absl_logger()
  if not any(isinstance(f, _QuietLibraries) for f in absl_logger.filters):
    absl_logger.addFilter(_QuietLibraries())
  workdir = Path(workdir)
  check_workdir(config, workdir)
  data = data_lib.build(config, workdir)   # may train a tokenizer into the cache, writes nothing in workdir
  lock = _lock_workdir(workdir) if jax.process_index() == 0 else None
  if jax.process_index() == 0:
    _write_config(config, workdir)
    tokenizer_lib.save_to_workdir(data.tokenizer, workdir)

  t = config.train
  seq_len, n_future = config.data.seq_len, config.model.n_future
  model = build_model(config.model)
  tx = make_optimizer(t)
  mesh = sharding.make_mesh(config)
  replicated, batch_sharding = sharding.replicated(mesh), sharding.batch_sharding(mesh)

  rng = jax.random.key(config.seed)
  # Compiled once, ahead of time, as --dry_run compiles it; `state` is donated so its buffers are
  # reused for the new state. Restore targets and a fresh state take the same shardings.
  compiled, abstract_state, state_shardings, _ = compile_train_step(config, mesh, model, tx)
  _say(_memory_line(compiled))
  abstract_rng = with_shardings(jax.eval_shape(jax.random.key_data, rng), replicated)

  train_iter = iter(data_lib.train_dataset(data.train, config))
  ckpt = Checkpointer(workdir, keep=t.keep_checkpoints)
  start, restored = ckpt.restore_latest(**ckpt.train_targets(abstract_state, abstract_rng, train_iter))
  if restored is None:
    state = sharding.init_train_state(model, tx, mesh, config, jax.random.fold_in(rng, 0))
  else:
    state = type(abstract_state)(step=restored.meta["step"], params=restored.params, opt_state=restored.opt_state)
    rng = jax.random.wrap_key_data(restored.meta["rng"])
    _say(f"resumed from the checkpoint of step {start} in {workdir}")
  if jax.process_index() == 0:
    metrics_lib.truncate_after(workdir, start)

  def to_device(batch):
    return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in batch.items()}

  eval_step = jax.jit(make_eval_step(model, config), in_shardings=(state_shardings.params, batch_sharding),
                      out_shardings=replicated)
  host_valid = data_lib.valid_batches(data.valid, config)
  valid = [to_device(b) for b in host_valid]
  unigram = data_lib.unigram_baseline(data.train, host_valid, seq_len, config.model.vocab_size)

  def evaluate(params):
    sums = None
    for b in valid:
      with sharding.activate(mesh, config):
        out = eval_step(params, b)
      sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    return jax.device_get(sums)

  writer = metrics_lib.MetricsWriter(workdir, t.steps)
  tokens_per_step = t.batch_size * seq_len
  last_record = None
  try:
    if start >= t.steps:
      _say(f"{workdir} is already trained to step {start} (train.steps={t.steps}); evaluating only")
      last_record = metrics_lib.valid_record(start, evaluate(state.params), loss_weights(config, start),
                                                unigram_loss=unigram)
    else:
      last_record = _train_loop(config, state, rng, start, compiled, to_device, train_iter, evaluate, ckpt, writer,
                                unigram, tokens_per_step)
  finally:
    ckpt.close()   # waits for the async save in flight
    writer.close()
    if lock is not None:
      lock.close()
  if last_record is not None and last_record["step"] == t.steps:
    _say(metrics_lib.final_table(last_record, unigram, config.model.vocab_size))
  return last_record


def _train_loop(config, state, rng, start, compiled, to_device, train_iter, evaluate, ckpt, writer,
                unigram, tokens_per_step):
  t = config.train
  bad = jnp.zeros((), jnp.int32)
  pending = None               # (step, metrics, bad) of a log step, read back once the next step is queued
  last_log = (start, time.time())
  paused = 0.0                 # seconds spent in eval and checkpointing, kept out of tokens/s
  valid_record = None

  def report(p):
    nonlocal last_log, paused
    step, metrics, bad_then = p
    metrics, first_bad = jax.device_get((metrics, bad_then))
    _stop_if_diverged(int(first_bad), ckpt)
    now = time.time()
    per_step = max(now - last_log[1] - paused, 1e-9) / max(step - last_log[0], 1)
    writer.train(step, metrics, tokens_per_step / per_step, per_step)
    last_log, paused = (step, now), 0.0

  with _StopOnSignal() as stop:
    for step in range(start + 1, t.steps + 1):
      state, metrics = compiled(state, to_device(next(train_iter)))
      bad = _first_bad_step(bad, metrics["loss"], np.int32(step))
      if pending is not None:
        report(pending)        # step-1 is done or nearly: reading it leaves `step` queued on the device
        pending = None
      if step % t.log_every == 0 or step == t.steps:
        pending = (step, metrics, bad)
      do_eval = step % t.eval_every == 0 or step == t.steps
      do_save = step % t.checkpoint_every == 0 or step == t.steps or stop.signal
      if not (do_eval or do_save):
        continue
      if pending is not None:
        report(pending)
        pending = None
      _stop_if_diverged(int(jax.device_get(bad)), ckpt)   # never evaluate or save a diverged state
      began = time.time()
      if do_eval:
        extra = {"unigram_loss": unigram} if step == t.steps else {}
        valid_record = metrics_lib.valid_record(step, evaluate(state.params), loss_weights(config, step), **extra)
        writer.valid(valid_record)
      if do_save:
        ckpt.save(step, state, rng, train_iter)
      paused += time.time() - began
      if stop.signal and step < t.steps:
        ckpt.wait_until_finished()
        _say(f"stopped by {stop.signal} after step {step}; checkpoint saved in {ckpt.workdir}; "
             f"rerun the same command to resume")
        return None
  return valid_record


def _stop_if_diverged(first_bad: int, ckpt: Checkpointer) -> None:
  if first_bad:
    ckpt.wait_until_finished()
    steps = ckpt.steps()
    last = f"the last good checkpoint is step {steps[-1]}" if steps else "no checkpoint was saved"
    raise TrainingDiverged(f"the loss became NaN/inf at step {first_bad}; stopped without saving ({last}). "
                           f"Lower train.learning_rate or raise train.warmup_steps, then rerun to resume")
