"""`--config.train.profile_steps=a:b`: a jax.profiler trace of training steps a..b, in the workdir.

The trace goes where TensorBoard looks for profiles, W/plugins/profile/<time>/ (`tensorboard --logdir W`,
Profile tab, with tensorboard-plugin-profile), as <host>.xplane.pb and <host>.trace.json.gz (Perfetto
opens the latter). It brackets whole steps: it starts before step a is dispatched and stops once step b
has finished on the device, so JAX's asynchronous dispatch does not cut it short. A resumed run traces
what is left of the range. On a bucket workdir the trace is written locally, then uploaded whole.
"""
from __future__ import annotations

import shutil
import tempfile

import jax

from mtp_jax import io
from mtp_jax.config import profile_range

PROFILES = ("plugins", "profile")   # under the workdir: TensorBoard's place for them


class StepProfiler:

  def __init__(self, spec: str, workdir, start_step: int):
    self.range = profile_range(spec)
    if self.range and self.range[1] <= start_step:   # resumed past it
      self.range = None
    self.workdir = io.path(workdir)
    self.logdir = None

  def before(self, step: int) -> None:
    """Call before dispatching `step`."""
    if self.range and self.logdir is None and self.range[0] <= step <= self.range[1]:
      self.first = step
      self.logdir = tempfile.mkdtemp(prefix="mtp_jax_profile_") if io.is_remote(self.workdir) else str(self.workdir)
      jax.profiler.start_trace(self.logdir)

  def after(self, step: int, outputs) -> str | None:
    """Call after dispatching `step` with its outputs; returns a line to print once the trace is written."""
    if self.logdir is None or step < self.range[1]:
      return None
    jax.block_until_ready(outputs)
    return self._stop(step)

  def _stop(self, last: int) -> str:
    jax.profiler.stop_trace()
    logdir, self.logdir, self.range = self.logdir, None, None
    where = self.workdir.joinpath(*PROFILES)
    if io.is_remote(self.workdir):
      try:
        io.put_tree(f"{logdir}/{'/'.join(PROFILES)}", where)
      finally:
        shutil.rmtree(logdir, ignore_errors=True)
    return f"profile of steps {self.first}..{last} written to {where} (tensorboard --logdir {self.workdir})"

  def close(self) -> None:
    """End a trace the run left open (it stopped inside the range); keeps what was traced."""
    if self.logdir is not None:
      try:
        self._stop(self.first)
      except Exception:   # closing after another error: that error is the one to report
        pass
