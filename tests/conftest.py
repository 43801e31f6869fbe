"""Shared fixtures (plain helpers are helpers.py's): tiny configs built in code, a bucket emulator."""
import atexit
import os
import shutil
import tempfile

import pytest

from mtp_jax.cpu_flags import cpu_model   # imports no jax: the XLA flags below still apply

# The suite compiles hundreds of small programs and runs each a few times, so compiling is most of its
# time. LLVM's optimisation passes cost more than they save (a loss-equivalence test 40 s -> 25 s), and
# XLA:CPU's older elemental emitters compile in half the time of its fusion emitters (the decode tests'
# CPU time 88 s -> 43 s, test_attention.py's 91 s -> 54 s). The operations and their IEEE semantics are
# the same. A flag already in XLA_FLAGS is kept; subprocesses inherit them.
for _flag in ("xla_backend_optimization_level=0", "xla_cpu_use_fusion_emitters=false"):
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --{_flag}".strip()

# One persistent compilation cache for the session, shared with the subprocesses: the trainer builds its
# jitted steps afresh on every call, and many tests train the same tiny model (a repeated 3-step run costs
# 2.5 CPU s instead of 5). It starts empty, so every program is still compiled once per session.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _xla_cache = tempfile.mkdtemp(prefix="mtp_jax_tests_xla_")
  atexit.register(shutil.rmtree, _xla_cache, ignore_errors=True)
  os.environ.update(JAX_COMPILATION_CACHE_DIR=_xla_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

# Two test workers (pytest.ini) on one accelerator: neither takes most of its memory up front.
if "PYTEST_XDIST_WORKER" in os.environ:
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from helpers import tiny_config, train_config  # noqa: E402  (after XLA_FLAGS: it imports jax)


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


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
  """The tokenizer and token caches of helpers.train_config's runs, shared by the session (a test that damages
  a cache damages its own copy)."""
  return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def trained(tmp_path_factory, cache_dir):
  """A finished 20-step run of helpers.train_config with checkpoints at 10 and 20, trained once for the
  session: tests read it, or copy it before changing anything."""
  from mtp_jax import train
  workdir = tmp_path_factory.mktemp("trained") / "run"
  train.train_and_evaluate(train_config(cache_dir, steps=20), workdir)
  return workdir
