"""The trainer, top to bottom: check the workdir (workdir.py), build data and model, restore, train, evaluate.

    train_and_evaluate(config, workdir)

Rerunning the same command resumes from the newest good checkpoint: parameters, optimizer state,
RNG key and the data iterator position are all restored, so the resumed run logs bit-identical
losses (on CPU) for every step after the restored one. SIGTERM / SIGINT finish the current step (and
an evaluation in progress), save a checkpoint and exit with status 0; one that comes during start-up (data,
compile, restore) ends the run before its first step, with status 0 and nothing new to save; a second
signal kills at once.
A NaN/inf loss, parameter or optimizer state stops the run without saving and exits with status 2;
checkpoints are only ever written finite, so rerunning (say with a lower learning rate) resumes from
the last good state. config.json binds the workdir to a model shape only once a checkpoint exists.
On a bucket, a store that stops answering ends the run with one line within MTP_STORE_DEADLINE seconds (a
signal: within seconds), naming the newest complete checkpoint (mtp_jax.deadline).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging as std_logging
import os
import signal
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from mtp_jax import data as data_lib
from mtp_jax import data_record
from mtp_jax import deadline
from mtp_jax import io
from mtp_jax import metrics as metrics_lib
from mtp_jax import sharding
from mtp_jax import tokenizer as tokenizer_lib
from mtp_jax import workdir as workdir_lib
from mtp_jax.checkpoint import Checkpointer, all_finite, load_pretrained, with_shardings
from mtp_jax.config import loss_weights, validate
from mtp_jax.dry_run import compile_train_step, memory_report, model_flops_per_token, peak_flops_per_device
from mtp_jax.errors import UserError
from mtp_jax.model import build_model
from mtp_jax.profiler import StepProfiler
from mtp_jax.step import (abstract_train_state, carry_opt_state, init_train_state, make_eval_step, make_optimizer,
                          resumed_train_state, train_state_from_params)


class TrainingDiverged(UserError):
  """The loss became NaN or inf."""


class _QuietLibraries(std_logging.Filter):
  """Drop orbax's, grain's and gcsfs's INFO chatter (tens of lines per checkpoint); keep their warnings, as
  one line each: a failed write is reported once, as one error (checkpoint.CheckpointWriteError), not as
  the tracebacks of each of orbax's background threads."""

  def filter(self, record):
    ours = any(p in record.pathname for p in ("/orbax/", "/grain/", "/gcsfs/", "/fsspec/"))
    if ours and record.exc_info:
      record.exc_info, record.exc_text = None, None
    return record.levelno >= std_logging.WARNING or not ours


def _say(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


class _StopOnSignal:
  """SIGTERM/SIGINT ask the run to stop: during start-up before the first step, in the loop after the current
  step; a second signal acts at once."""

  def __init__(self):
    self.signal = None
    self.training = False   # the loop has begun: a signal then means a step to finish and a checkpoint to save
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
    deadline.stop_requested(self.signal)   # a store that does not answer now is not waited for
    _say(f"{self.signal}: finishing this step, saving a checkpoint, then exiting (signal again to stop now)"
         if self.training else f"{self.signal}: stopping before the first step (signal again to stop now)")

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
  with deadline.watch({"--workdir": workdir, "data.path": config.data.path}), _StopOnSignal() as stop:
    return _train_and_evaluate(config, workdir, stop)


def _quiet_libraries() -> None:
  absl_logger = logging.get_absl_logger()
  if not any(isinstance(f, _QuietLibraries) for f in absl_logger.filters):
    absl_logger.addFilter(_QuietLibraries())


def _open_workdir(config, workdir):
  """(workdir, data, lock or None, resuming, the saved config.json when resuming): the workdir checked, locked
  and written (config, data record, tokenizer), the data built."""
  workdir = workdir_lib.check_path(workdir)
  workdir_lib.check_shape(config, workdir)
  data = data_lib.build(config, workdir)   # may train a tokenizer into the cache, writes nothing in workdir
  data_now = data_record.describe(config, data)
  moved = data_record.check(workdir, bool(workdir_lib.step_dirs(workdir)), data_now)
  if moved:
    _say(moved)
  lock = workdir_lib.lock(workdir) if jax.process_index() == 0 else None
  resuming = bool(workdir_lib.step_dirs(workdir))
  saved = workdir_lib.read_json(workdir) if resuming else None
  if jax.process_index() == 0 and not resuming:   # a resume rewrites it once its checkpoint has restored
    workdir_lib.write_config(config, workdir)
  if jax.process_index() == 0:
    data_record.write(workdir, data_now)
    tokenizer_lib.save_to_workdir(data.tokenizer, workdir)
  return workdir, data, lock, resuming, saved


@dataclasses.dataclass
class _Loop:
  """What the training loop runs with, built once by `_train_and_evaluate`."""
  config: ml_collections.ConfigDict
  compiled: Any              # the compiled train step; the state is donated
  to_device: Callable        # a host batch -> global arrays in the batch sharding
  train_iter: Any            # the grain iterator, saved with every checkpoint
  evaluate: Callable         # params -> the validation set's summed metrics (on the host)
  ckpt: Checkpointer
  writer: metrics_lib.MetricsWriter
  unigram: float             # the unigram baseline's validation loss, for the final report

  @property
  def tokens_per_step(self) -> int:
    return self.config.train.batch_size * self.config.data.seq_len


def _train_and_evaluate(config, workdir, stop: "_StopOnSignal") -> dict:
  _quiet_libraries()
  workdir, data, lock, resuming, saved = _open_workdir(config, workdir)
  t = config.train
  model = build_model(config.model)
  tx = make_optimizer(t)
  mesh = sharding.make_mesh(config)
  rng = jax.random.key(config.seed)
  # Compiled once, ahead of time, as --dry_run compiles it; `state` is donated so its buffers are
  # reused for the new state. Restore targets and a fresh state take the same shardings.
  compiled, abstract_state, state_shardings, _ = compile_train_step(config, mesh, model, tx)
  _say(_memory_line(compiled))
  abstract_rng = with_shardings(jax.eval_shape(jax.random.key_data, rng), sharding.replicated(mesh))

  train_iter = iter(data_lib.train_dataset(data.train, config))
  ckpt = Checkpointer(workdir, keep=t.keep_checkpoints)
  # The checkpoints' optimizer state has the shape of the train.trainable they were saved with.
  was_trainable = ((saved or {}).get("train") or {}).get("trainable", "all") if resuming else t.trainable
  restore_state = abstract_state
  if was_trainable != t.trainable:
    old_train = ml_collections.ConfigDict(t.to_dict())
    old_train.trainable = was_trainable
    restore_state, _ = abstract_train_state(model, make_optimizer(old_train), mesh, config)
  try:
    start, restored = ckpt.restore_latest(**ckpt.train_targets(restore_state, abstract_rng, train_iter))
  except BaseException:   # e.g. no usable checkpoint: stop before metrics.jsonl is touched
    _close_quietly(ckpt.close)
    raise
  if jax.process_index() == 0 and resuming:
    workdir_lib.write_config(config, workdir)
  if restored is None and workdir_lib.has_pretrained(workdir):   # convert import wrote W/pretrained
    state = train_state_from_params(load_pretrained(workdir, abstract_state.params), tx, state_shardings)
    _say(f"starting at step 0 from the imported parameters in {workdir / workdir_lib.PRETRAINED}")
  elif restored is None:
    state = init_train_state(model, tx, mesh, config, jax.random.fold_in(rng, 0))
  else:
    opt_state = restored.opt_state
    if was_trainable != t.trainable:
      opt_state = _carry_trainable(restored, tx, state_shardings, t.trainable, was_trainable, start)
    state = resumed_train_state(restored.meta["step"], restored.params, opt_state)
    rng = jax.random.wrap_key_data(restored.meta["rng"])
    _say(f"resumed from the checkpoint of step {start} in {workdir}")
  if jax.process_index() == 0:
    metrics_lib.truncate_after(workdir, start)
  to_device, evaluate, unigram = _evaluation(config, model, mesh, data, state_shardings)
  writer = metrics_lib.MetricsWriter(workdir, t.steps, model_flops_per_token(config, abstract_state.params, model),
                                     _peak_flops())
  loop = _Loop(config, compiled, to_device, train_iter, evaluate, ckpt, writer, unigram)
  return _run_and_close(loop, state, rng, start, lock, stop)


def _carry_trainable(restored, tx, state_shardings, trainable: str, was_trainable: str, start: int):
  """The restored optimizer state under another train.trainable: kept moments carried over, new ones zero."""
  fresh_opt = jax.jit(tx.init, out_shardings=state_shardings.opt_state)(restored.params)
  opt_state, fresh, dropped = carry_opt_state(restored.opt_state, fresh_opt)
  changes = [f"{len(fresh)} newly trainable parameter arrays start with zero AdamW moments"] * bool(fresh) + \
      [f"{len(dropped)} newly frozen ones drop theirs"] * bool(dropped)
  _say(f"train.trainable={trainable!r} now, {was_trainable!r} when the checkpoint of step {start} was saved: "
       f"parameters, step, RNG, schedule and data position are restored; {', '.join(changes) or 'nothing else'}")
  return opt_state


def _evaluation(config, model, mesh, data, state_shardings):
  """(to_device, evaluate, unigram): host batches onto the mesh, the fixed validation set's summed metrics for
  some parameters, and the unigram baseline's loss on it."""
  replicated, batch_sharding = sharding.replicated(mesh), sharding.batch_sharding(mesh)

  def to_device(batch):
    return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in batch.items()}

  eval_step = jax.jit(make_eval_step(model, config), in_shardings=(state_shardings.params, batch_sharding),
                      out_shardings=replicated)
  host_valid = data_lib.valid_batches(data.valid, config)
  valid = [to_device(b) for b in host_valid]
  unigram = data_lib.unigram_baseline(data.train, host_valid, config.data.seq_len, config.model.vocab_size)

  def evaluate(params):
    sums = None
    for b in valid:
      with sharding.activate(mesh, config):
        out = eval_step(params, b)
      sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    return jax.device_get(sums)

  return to_device, evaluate, unigram


def _run_and_close(loop: _Loop, state, rng, start: int, lock, stop: _StopOnSignal) -> dict:
  """Train from `start` (or only evaluate, if already done), then close the checkpointer, the metrics writer and
  the lock; returns the last validation record."""
  config, t, ckpt, writer = loop.config, loop.config.train, loop.ckpt, loop.writer
  last_record = None
  try:
    if stop.signal:   # came during start-up: nothing ran, so nothing is new to save
      resume = f"a rerun resumes from the checkpoint of step {start}" if start else "a rerun starts it afresh"
      _say(f"stopped by {stop.signal} during start-up, before step {start + 1}: nothing to save; {resume}")
    elif start >= t.steps:
      _say(f"{ckpt.workdir} is already trained to step {start} (train.steps={t.steps}); evaluating only")
      last_record = metrics_lib.valid_record(start, loop.evaluate(state.params), loss_weights(config, start),
                                             unigram_loss=loop.unigram)
    else:
      last_record = _train_loop(loop, state, rng, start, stop)
  except BaseException as e:
    _raise_if_store_failed(e, ckpt)
    _close_quietly(ckpt.close, writer.close, lock and lock.close)   # the error in flight is the one to report
    raise
  try:
    ckpt.close()   # waits for the async save in flight; CheckpointWriteError if it failed
    writer.close()
  except BaseException as e:
    _raise_if_store_failed(e, ckpt)
    _close_quietly(writer.close)
    raise
  finally:
    if lock is not None:
      lock.close()
  if last_record is not None and last_record["step"] == t.steps:
    _say(metrics_lib.final_table(last_record, loop.unigram, config.model.vocab_size))
  return last_record


def _raise_if_store_failed(error: BaseException, ckpt: Checkpointer) -> None:
  """A run whose object store stopped answering ends with one line naming the newest complete checkpoint,
  and asks the store nothing more (no closing: each close would wait on it)."""
  if deadline.given_up() or deadline.watching() and io.store_failure(error):
    raise ckpt.abandon(error) from None


def _close_quietly(*closers) -> None:
  if deadline.given_up():   # every closer would wait on the store that stopped answering
    return
  for close in closers:
    if close:
      try:
        close()
      except Exception as e:  # a full disk fails every writer's flush; one message is enough
        logging.warning("while closing after an error: %s", e)


def _train_loop(loop: _Loop, state, rng, start: int, stop: _StopOnSignal):
  config, ckpt, writer, train_iter = loop.config, loop.ckpt, loop.writer, loop.train_iter
  t = config.train
  bad = jnp.zeros((), jnp.int32)
  pending = None               # (step, metrics, bad) of a log step, read back once the next step is queued
  last_log = (start, time.time())
  paused = 0.0                 # seconds spent in eval and checkpointing, kept out of tokens/s
  valid_record = None
  profile = StepProfiler(t.profile_steps, ckpt.workdir, start)

  def report(p):
    nonlocal last_log, paused
    step, metrics, bad_then = p
    metrics, first_bad = jax.device_get((metrics, bad_then))
    _stop_if_diverged(int(first_bad), ckpt)
    now = time.time()
    per_step = max(now - last_log[1] - paused, 1e-9) / max(step - last_log[0], 1)
    writer.train(step, metrics, loop.tokens_per_step / per_step, per_step)
    last_log, paused = (step, now), 0.0

  stop.training = True
  with contextlib.closing(profile):
    for step in range(start + 1, t.steps + 1):
      profile.before(step)
      state, metrics = loop.compiled(state, loop.to_device(next(train_iter)))
      began = time.time()
      if traced := profile.after(step, (state, metrics)):   # waits for the step: not training time
        _say(traced)
        paused += time.time() - began
      bad = _first_bad_step(bad, metrics["loss"], np.int32(step))
      if pending is not None:
        report(pending)        # step-1 is done or nearly: reading it leaves `step` queued on the device
        pending = None
      if step % t.log_every == 0 or step == t.steps:
        pending = (step, metrics, bad)
      do_eval = step % t.eval_every == 0 or step == t.steps
      if not (do_eval or _save_due(step, t, stop)):
        continue
      if pending is not None:
        report(pending)
        pending = None
      _stop_if_diverged(int(jax.device_get(bad)), ckpt)   # never evaluate or save a diverged state
      if not all_finite((state.params, state.opt_state)):   # they can break a step before the loss does
        _stop_if_diverged(step, ckpt, what="the parameters or optimizer state became")
      began = time.time()
      if do_eval:
        extra = {"unigram_loss": loop.unigram} if step == t.steps else {}
        valid_record = metrics_lib.valid_record(step, loop.evaluate(state.params), loss_weights(config, step),
                                                **extra)
        writer.valid(valid_record)
      saved = _save_due(step, t, stop)   # decided after the evaluation: a signal during it is honoured here
      if saved:
        ckpt.save(step, state, rng, train_iter)
      paused += time.time() - began
      if stop.signal and saved and step < t.steps:
        ckpt.wait_until_finished()   # CheckpointWriteError (exit 2) if the save failed
        if step not in ckpt.steps():
          raise UserError(f"stopped by {stop.signal} after step {step}, but its checkpoint is missing from "
                          f"{ckpt.workdir / 'checkpoints'}; rerun to resume from step {max(ckpt.steps(), default=0)}")
        _say(f"stopped by {stop.signal} after step {step}; checkpoint saved in {ckpt.workdir}; "
             f"rerun the same command to resume")
        return None
  return valid_record


def _peak_flops():
  """Peak FLOP/s of all devices together (dry_run.PEAK_FLOPS), or None where a device's is unknown (CPUs)."""
  peaks = [peak_flops_per_device(d.device_kind) for d in jax.devices()]
  return None if None in peaks else sum(peaks)


def _save_due(step: int, t, stop) -> bool:
  return step % t.checkpoint_every == 0 or step == t.steps or stop.signal is not None


def _stop_if_diverged(first_bad: int, ckpt: Checkpointer, what: str = "the loss became") -> None:
  if first_bad:
    ckpt.wait_until_finished()
    steps = ckpt.steps()
    last = f"the last good checkpoint is step {steps[-1]}" if steps else "no checkpoint was saved"
    again = f"resume from step {steps[-1]}" if steps else "start again from step 0"
    when = f"at step {first_bad}" if what == "the loss became" else f"by step {first_bad}"
    raise TrainingDiverged(f"{what} NaN/inf {when}; stopped without saving ({last}). "
                           f"Lower train.learning_rate or raise train.warmup_steps, then rerun to {again}")
