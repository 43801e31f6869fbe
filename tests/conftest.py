"""Shared fixtures (plain helpers are helpers.py's): tiny configs built in code, a bucket emulator."""
import os
import platform

import pytest

# The suite compiles hundreds of small programs and runs each a few times: LLVM's optimisation passes
# cost more than they save (measured: a loss-equivalence test 40 s -> 25 s, a resume + notebook pair
# 90 s -> 74 s). The operations and their IEEE semantics are the same. Subprocesses inherit it.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

from helpers import tiny_config  # noqa: E402  (after XLA_FLAGS: it imports jax)


def cpu_model() -> str:
  """The CPU's name as /proc/cpuinfo gives it (platform.processor() elsewhere), for the report header."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine() or "unknown CPU"


def pytest_report_header(config):
  """Float32 results differ in their last bits between CPUs (tests/tolerances.py): name the one this ran on."""
  return f"cpu: {cpu_model()}, {os.cpu_count()} cores"


@pytest.fixture
def make_config():
  return tiny_config


@pytest.fixture(scope="session")
def gcs():
  """A gcp-storage-emulator on a free loopback port with bucket `bkt`, for the whole session."""
  from gcs_emulator import GcsEmulator
  with GcsEmulator(buckets=["bkt"]) as emu:
    yield emu
