"""Orbax checkpoints of a run: params, optimizer state, step + RNG key, and the grain iterator position.

Layout: W/checkpoints/<step>/{params,opt_state,meta,data}; each item restores on its own, so
`load_params` reads only the parameters. Saving is asynchronous (the arrays are copied to host
before `save` returns, so the next donated train step may reuse their buffers); call
`wait_until_finished()` before exit. A checkpoint that fails to restore (damaged files) is moved to
W/checkpoints_corrupt/<step> with a warning and the previous one is used instead; so is one that holds
NaN/inf parameters or optimizer state (never saved by this trainer, but older runs did). When no
checkpoint is usable, nothing is moved and restoring stops with one error. A save that cannot be
written (read-only or full disk) fails at once with one error; the earlier checkpoints stay intact.
On a bucket whose store stops answering (mtp_jax.deadline), a save in flight is abandoned (orbax commits a
step only once all of it is written) and the error names the newest checkpoint this process knows complete,
without asking the store again; a store failure while restoring moves nothing.
"""
from __future__ import annotations

import contextlib
import errno
import logging as logging_std
import os
import shutil
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from mtp_jax import deadline, io
from mtp_jax import workdir as workdir_lib
from mtp_jax.workdir import step_dirs
from mtp_jax.errors import UserError

CHECKPOINTS = workdir_lib.CHECKPOINTS
CORRUPT = workdir_lib.CORRUPT


class CheckpointWriteError(UserError):
  """A checkpoint could not be written (read-only or full disk, no permission)."""


class NoUsableCheckpoint(UserError):
  """Checkpoints exist, but none restores (damaged files or NaN/inf values)."""


@jax.jit
def _all_finite(tree):
  ok = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(ok)) if ok else jnp.bool_(True)


def all_finite(tree) -> bool:
  """Whether every float in the pytree is finite: one reduction on the devices, one bool to the host."""
  return bool(jax.device_get(_all_finite(tree)))


def _first_line(error: BaseException) -> str:
  return ((str(error).strip().splitlines() or [type(error).__name__])[0])[:200]


def _write_failure(error: BaseException) -> str:
  """The cause of a failed write in a few words (orbax wraps OSErrors into ValueErrors with the text)."""
  for e in (error, error.__cause__, error.__context__):
    if isinstance(e, OSError) and e.errno:
      return os.strerror(e.errno)
  text = str(error)
  for code in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT):
    if os.strerror(code) in text:
      return os.strerror(code)
  return f"{type(error).__name__}: {_first_line(error)}"


def _is_abandoned_read(e, depth: int = 0) -> bool:
  """True for the errors of reads orbax abandoned after a failed restore: the closed loop itself, or
  orbax's read error (the closed loop or the damaged bytes somewhere in its chain)."""
  if e is None or depth > 8:
    return False
  if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
    return True
  if str(e).startswith("Encountered error while reading array index"):
    return True
  return _is_abandoned_read(e.__cause__, depth + 1) or _is_abandoned_read(e.__context__, depth + 1)


class _DamagedMetadataFilter(logging_std.Filter):
  """orbax logs a damaged step's metadata file, its bytes included, once per look at it; the restore that
  then fails names the step and the cause in its one line, so those records say nothing more."""

  def filter(self, record):
    return not ("/orbax/" in record.pathname and
                str(record.msg).startswith(("Failed to json parse Metadata file", "Failed to read Metadata file")))


def _quiet_damaged_metadata() -> None:
  absl_log = logging_std.getLogger("absl")
  if not any(isinstance(f, _DamagedMetadataFilter) for f in absl_log.filters):
    absl_log.addFilter(_DamagedMetadataFilter())


class _AbandonedReadFilter(logging_std.Filter):
  """asyncio logs 'Task exception was never retrieved' for each abandoned read task it collects."""

  def filter(self, record):
    return not (record.exc_info and _is_abandoned_read(record.exc_info[1]))


def _drop_closed_loop_noise() -> None:
  """After a failed restore, tensorstore still completes the reads orbax abandoned, on an asyncio loop
  orbax has closed: dozens of tracebacks, through sys.unraisablehook ('Event loop is closed') and through
  the asyncio logger ('Task exception was never retrieved'). They say nothing (the failure was reported):
  drop exactly those, pass everything else on."""
  asyncio_log = logging_std.getLogger("asyncio")
  if not any(isinstance(f, _AbandonedReadFilter) for f in asyncio_log.filters):
    asyncio_log.addFilter(_AbandonedReadFilter())
  previous = sys.unraisablehook
  if getattr(previous, "_drops_closed_loop", False):
    return

  def hook(unraisable):
    if not _is_abandoned_read(unraisable.exc_value):
      previous(unraisable)
  hook._drops_closed_loop = True
  sys.unraisablehook = hook


def with_shardings(abstract, shardings=None):
  """ShapeDtypeStructs that carry shardings, so orbax restores each array where it belongs.

  `shardings`: a matching pytree of jax.sharding.Sharding; default: every array on the first device.
  """
  if shardings is None:
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


class _ReadOnlyNotes(logging_std.Filter):
  """orbax warns, for every read-only manager, that the directory is read only and which saving options that
  overrides: what a reader (generate, export, a notebook) asked for, so not shown."""

  def filter(self, record):
    return "/orbax/" not in record.pathname or "read only" not in record.getMessage().replace("_", " ")


class Checkpointer:
  """The CheckpointManager of one workdir, with fallback past damaged checkpoints."""

  def __init__(self, workdir, keep: int = 3, read_only: bool = False):
    # orbax wants absolute paths; the README passes a relative --workdir
    self.workdir, self.read_only = io.absolute(workdir), read_only
    if read_only and not any(isinstance(f, _ReadOnlyNotes) for f in logging.get_absl_logger().filters):
      logging.get_absl_logger().addFilter(_ReadOnlyNotes())
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only,
                                           enable_async_checkpointing=not read_only,
                                           cleanup_tmp_directories=not read_only)
    if io.is_remote(self.workdir):
      deadline.bound_tensorstore_retries()
    _quiet_damaged_metadata()   # orbax reads every step's metadata here already
    self.manager = ocp.CheckpointManager(self.workdir / CHECKPOINTS, options=options)
    self._in_flight, self._broken = None, False
    self._complete, self._wanted = None, None   # the newest step known committed; the last step asked for

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  @staticmethod
  def train_targets(abstract_state, abstract_rng_data, data_iter) -> dict:
    """Restore args for everything `save` writes; the data iterator is reset in place."""
    meta = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=abstract_state.step.sharding),
            "rng": abstract_rng_data}
    return {"params": ocp.args.StandardRestore(abstract_state.params),
            "opt_state": ocp.args.StandardRestore(abstract_state.opt_state),
            "meta": ocp.args.StandardRestore(meta),
            "data": grain.checkpoint.CheckpointRestore(data_iter)}

  def save(self, step: int, state, rng, data_iter) -> None:
    """Start an async save of `state` (step.TrainState), the RNG key and the data iterator position.

    Refuses NaN/inf state, and checks first that the directory takes the write: orbax creates the step
    directory in a background thread, and a failure there leaves its other threads waiting 300 s."""
    self._wanted = step
    self.wait_until_finished()   # orbax waits for the previous save anyway; first, so its space counts
    if not all_finite((state.params, state.opt_state)):
      raise NoUsableCheckpoint(f"refusing to save step {step}: its parameters or optimizer state hold NaN/inf")
    self._check_writable(step, sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state))))
    # The key lives on one device; a multi-host save needs global arrays: replicate it like the step.
    meta = {"step": state.step, "rng": jax.device_put(np.asarray(jax.random.key_data(rng)), state.step.sharding)}
    try:
      self.manager.save(step, args=ocp.args.Composite(
          params=ocp.args.StandardSave(state.params),
          opt_state=ocp.args.StandardSave(state.opt_state),
          meta=ocp.args.StandardSave(meta),
          data=grain.checkpoint.CheckpointSave(data_iter)), force=True)
    except Exception as e:
      self._failed(step, e)
    self._in_flight = step

  def _check_writable(self, step: int, state_bytes: int) -> None:
    """A probe file and the free space (local filesystems: a bucket path needs neither check)."""
    root = self.workdir / CHECKPOINTS
    if "://" in str(root):
      return
    probe = root / f".write-test-{os.getpid()}"
    try:
      root.mkdir(parents=True, exist_ok=True)
      probe.write_bytes(b"x")
      probe.unlink()
      free = shutil.disk_usage(root).free
    except OSError as e:
      self._failed(step, e)
    need = int(state_bytes * 1.1) + (1 << 16)   # arrays + metadata, iterator state, OCDBT manifests
    if free < need:
      self._failed(step, OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: it needs about {need / 2**20:.1f} "
                                             f"MiB, {free / 2**20:.1f} MiB are free"))

  def _failed(self, step, error: BaseException):
    """Drop the partial step directory and stop with one line; committed checkpoints are never touched."""
    self._broken = True
    if isinstance(error, deadline.StoreUnavailable) or deadline.given_up():
      raise self.abandon(error) from None
    if io.is_remote(self.workdir):   # the store is not listed again: it may be what failed
      raise self.abandon(error, f"cannot write the checkpoint of step {step} in {self.workdir / CHECKPOINTS} "
                                f"({io.store_failure(error) or _write_failure(error)})") from None
    root = self.workdir / CHECKPOINTS
    for tmp in root.glob(f"{step}.orbax-checkpoint-tmp*") if root.is_dir() else []:
      shutil.rmtree(tmp, ignore_errors=True)
    step = "?" if step is None else step
    kept = step_dirs(self.workdir)
    cause = _write_failure(error)
    if isinstance(error, OSError) and error.errno == errno.ENOSPC and error.strerror:
      cause = error.strerror
    resume = f"resume from step {kept[-1]}" if kept else "start from step 0"
    raise CheckpointWriteError(
        f"cannot write the checkpoint of step {step} in {root} ({cause}); the earlier checkpoints "
        f"{'(steps ' + ', '.join(map(str, kept)) + ') are intact' if kept else 'are none'}. Free space or make "
        f"it writable, then rerun the same command to {resume}")

  def restore_latest(self, **targets):
    """Restore the named items (orbax restore args) of the newest good checkpoint: (step, items) or (0, None).

    A checkpoint is good when it restores and its params / opt_state are finite. Newer bad ones are
    quarantined (skipped when read_only); if none is good, NoUsableCheckpoint, and nothing is moved."""
    bad = []
    _drop_closed_loop_noise()   # before the first read: the abandoned reads may be collected at any time
    for step in reversed(self.steps()):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(**targets))
      except Exception as e:  # any damage: unreadable metadata, truncated arrays, missing files
        self._raise_if_store_failed(step, e)
        bad.append((step, f"unreadable ({type(e).__name__}: {_first_line(e)})"))
        continue
      if not all_finite([restored.get(k) for k in ("params", "opt_state") if k in targets]):
        bad.append((step, "unusable (it holds NaN/inf parameters or optimizer state)"))
        continue
      for s, why in bad:
        self._quarantine(s, why)
      self._complete = step
      return step, restored
    if bad:
      root = self.workdir / CHECKPOINTS
      raise NoUsableCheckpoint(
          f"no usable checkpoint in {root} ({'; '.join(f'step {s}: {why}' for s, why in bad)}); nothing was "
          f"changed. Restore them from a copy, or move {root} away to start again from step 0")
    return 0, None

  def _raise_if_store_failed(self, step: int, error: BaseException) -> None:
    """A read that failed because the store did not answer says nothing about the checkpoint: never
    quarantine for it."""
    if isinstance(error, deadline.StoreUnavailable):
      raise error
    failure = io.store_failure(error) if io.is_remote(self.workdir) else None
    if failure or deadline.silent_for() > 0:
      raise deadline.StoreUnavailable(
          f"cannot read the checkpoint of step {step} in {self.workdir / CHECKPOINTS}: "
          f"{failure or 'the object store does not answer'}; nothing was changed. Rerun the same command once "
          f"the store answers") from None

  def abandon(self, error: BaseException, head: str | None = None) -> deadline.StoreUnavailable:
    """The error that ends a run whose store failed: `head` (or the error's own line), the saves abandoned,
    and the newest checkpoint this process knows complete; the store is not asked (it may not answer)."""
    if getattr(error, "from_abandon", False):
      return error
    self._broken = True
    flight = self._in_flight
    if flight is not None and flight != self._complete:
      with contextlib.suppress(Exception):
        if not self.manager.is_saving_in_progress():
          self.manager.check_for_errors()
          self._complete = flight
    if head is None:
      head = str(error) if isinstance(error, UserError) else (
          f"{self.workdir}: {io.store_failure(error) or f'{type(error).__name__}: {_first_line(error)}'}")
    lost = sorted({s for s in (flight, self._wanted) if s is not None and s > (self._complete or 0)})
    done = self._complete
    out = deadline.StoreUnavailable(
        f"{head}; "
        + (f"the save of step{'s' * (len(lost) > 1)} {', '.join(map(str, lost))} did not finish and was "
           f"abandoned; " if lost else "")
        + (f"the checkpoint of step {done} is complete" if done else "no checkpoint of this run is complete yet")
        + f". Rerun the same command once the store answers to {f'resume from step {done}' if done else 'start'}")
    out.from_abandon = True
    return out

  def _quarantine(self, step: int, why: str) -> None:
    """why: 'unreadable (...)' or 'unusable (...)'."""
    src = self.workdir / CHECKPOINTS / str(step)
    if self.read_only:  # a reader must not move files: just skip it
      print(f"warning: checkpoint {src} is {why}; using the previous one", flush=True)
      return
    dst = self.workdir / CORRUPT / str(step)
    try:
      io.move_tree(src, dst)
    except OSError as e:   # e.g. a read-only workdir: leave it where it is, skip it all the same
      print(f"warning: checkpoint step {step} is {why} and could not be moved away ({e.strerror}); using the "
            f"previous one", flush=True)
      return
    self.manager.reload()
    print(f"warning: checkpoint step {step} is {why}; moved it to {dst} and falling back to the previous "
          f"checkpoint", flush=True)

  def wait_until_finished(self) -> None:
    """Wait for the save in flight; CheckpointWriteError if it failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      self._failed(self._in_flight, e)
    if self._in_flight is not None:
      self._complete = self._in_flight

  def close(self) -> None:
    if self._broken or deadline.given_up():   # its failure was reported; orbax would only repeat it
      return
    self.wait_until_finished()
    self.manager.close()


def load_pretrained(workdir, abstract):
  """The parameters `convert import` wrote in W/pretrained, restored into `abstract` (ShapeDtypeStructs, with
  shardings if given)."""
  if all(getattr(a, "sharding", None) is None for a in jax.tree.leaves(abstract)):
    abstract = with_shardings(abstract)
  path = io.absolute(workdir) / workdir_lib.PRETRAINED
  try:
    with ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(path, abstract)
  except Exception as e:
    raise UserError(f"{path} is unreadable or does not match {workdir_lib.CONFIG_FILE} "
                    f"({type(e).__name__}: {_first_line(e)[:160] if str(e) else ''}); import again")


def load_params(workdir):
  """(params, config) of a run's latest good checkpoint, params only (for generate.py and notebooks);
  of W/pretrained when `convert import` wrote the workdir and no training has saved yet."""
  from mtp_jax.model import abstract_params, build_model   # model code only where it is needed

  io.check_bucket(workdir, "--workdir")   # a store that does not answer: one line in seconds
  config = workdir_lib.read_config(workdir)
  abstract, _ = abstract_params(build_model(config.model))
  ckpt = Checkpointer(workdir, read_only=True) if (io.path(workdir) / CHECKPOINTS).is_dir() else None
  if ckpt is None or not ckpt.steps():
    if workdir_lib.has_pretrained(workdir):   # an imported model not trained yet (convert import)
      return load_pretrained(workdir, abstract), config
    raise UserError(f"{workdir} has no checkpoint yet; train first (python -m mtp_jax.main "
                    f"--config=... --workdir={workdir}) or pass another workdir")
  try:
    step, restored = ckpt.restore_latest(params=ocp.args.StandardRestore(with_shardings(abstract)))
  finally:
    ckpt.close()
  logging.info("loaded params of step %d from %s", step, workdir)
  return restored.params, config
