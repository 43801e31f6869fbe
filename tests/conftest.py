"""Shared fixtures: tiny configs built in code, so tests never depend on recipe files changing."""
import os
import platform
import sys

import pytest

# The suite compiles hundreds of small programs and runs each a few times: LLVM's optimisation passes
# cost more than they save (measured: a loss-equivalence test 40 s -> 25 s, a resume + notebook pair
# 90 s -> 74 s). The operations and their IEEE semantics are the same. Subprocesses inherit it.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mtp_jax.config import base_config  # noqa: E402


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


def tiny_config(**model):
  c = base_config()
  c.model.update(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=128)
  c.model.update(model)
  c.data.seq_len = 16
  c.train.batch_size = 2
  return c


@pytest.fixture
def make_config():
  return tiny_config


@pytest.fixture(scope="session")
def gcs():
  """A gcp-storage-emulator on a free loopback port with bucket `bkt`, for the whole session."""
  from gcs_emulator import GcsEmulator
  with GcsEmulator(buckets=["bkt"]) as emu:
    yield emu
