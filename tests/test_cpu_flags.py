"""The XLA:CPU flags the trainer sets: added before the backend starts, never over the user's own setting."""
import subprocess
import sys

import jax

from mtp_jax import cpu_flags


def test_a_flag_is_added_once_and_the_users_setting_kept(monkeypatch):
  monkeypatch.setattr("jax._src.xla_bridge.backends_are_initialized", lambda: False)
  monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
  assert cpu_flags.add_xla_flag("xla_cpu_x", "a")
  assert not cpu_flags.add_xla_flag("xla_cpu_x", "b")            # already there: kept
  import os
  assert os.environ["XLA_FLAGS"] == "--xla_backend_optimization_level=0 --xla_cpu_x=a"


def test_nothing_changes_once_a_backend_is_up(monkeypatch):
  jax.devices()
  monkeypatch.setenv("XLA_FLAGS", "")
  assert not cpu_flags.add_xla_flag("xla_cpu_x", "a")
  import os
  assert os.environ["XLA_FLAGS"] == ""


def test_the_training_fusions_reach_a_fresh_process_and_compile():
  """In a fresh process the setter works, XLA accepts the flag, and a train-shaped step compiles and runs."""
  code = ("from mtp_jax import cpu_flags; import os, jax, jax.numpy as jnp; "
          "assert cpu_flags.use_training_fusions(); "
          "f = jax.jit(jax.grad(lambda x: jnp.sum(jax.nn.silu(x @ x.T))));"
          "print(float(f(jnp.ones((8, 8))).sum()), os.environ['XLA_FLAGS'])")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
  assert r.returncode == 0, r.stderr
  assert cpu_flags.TRAINING_FUSIONS[1] in r.stdout
