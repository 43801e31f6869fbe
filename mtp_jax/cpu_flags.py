"""XLA:CPU flags this project sets for its own processes. XLA reads XLA_FLAGS once, when jax starts its
backend, so each setter must run before anything asks jax for a device; a flag the user already put
in XLA_FLAGS is kept, and nothing changes once a backend is up.

Training: XLA:CPU hands dots to YNNPACK; also handing it the elementwise and reduction fusions made the
train step 1.12-1.17x faster on 2 cores with the same losses (experiments/speed/results/cpu_fusions.md). Decoding
is not faster with them (decode steps at batch 16 were 3% slower), so only the trainer sets them.
They cost memory: the scan loss plans 44-52% more temporaries (experiments/memory/results/ce_chunk*.md); a
user who wants the leaner program sets the flag to LIBRARY_FUSION_TYPE_DOT in XLA_FLAGS, which is kept.
The flag is experimental: it is set only on the jaxlib versions it was measured on, since XLA aborts
on a flag it does not know.
"""
from __future__ import annotations

import os
import platform

TRAINING_FUSIONS = ("xla_cpu_experimental_ynn_fusion_type",
                    "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE")
MEASURED_JAXLIB = ("0.10.2",)


def cpu_model() -> str:
  """The CPU's name as /proc/cpuinfo gives it (platform.processor() elsewhere): what timing tables and test
  reports name, since CPUs of one pool differ in speed and in float32 rounding."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine() or "unknown CPU"


def add_xla_flag(name: str, value: str) -> bool:
  """Append --name=value to XLA_FLAGS unless it is there already or a backend has started; True if added."""
  from jax._src import xla_bridge
  flags = os.environ.get("XLA_FLAGS", "")
  if f"--{name}=" in flags or xla_bridge.backends_are_initialized():
    return False
  os.environ["XLA_FLAGS"] = f"{flags} --{name}={value}".strip()
  return True


def use_training_fusions() -> bool:
  """Let YNNPACK run XLA:CPU's elementwise and reduction fusions as well as its dots (training processes)."""
  import jaxlib
  return jaxlib.__version__ in MEASURED_JAXLIB and add_xla_flag(*TRAINING_FUSIONS)
