"""Sharded == single device, on 8 simulated CPU devices: every check of tests/sharded_checks.py in one
process (started once for the module), each test reading its own check's result."""
import json
import os
import subprocess
import sys

import pytest

from mtp_jax.errors import UserError
from mtp_jax.sharding import check_divisibility, mesh_shape

HERE = os.path.dirname(os.path.abspath(__file__))


def run_checks(all_meshes: bool = False) -> dict:
  """{check name: "ok" or its traceback} from one 8-device run of every check."""
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", SHARDED_CHECKS_ALL_MESHES="1" if all_meshes else "0")
  r = subprocess.run([sys.executable, os.path.join(HERE, "sharded_checks.py")], env=env, capture_output=True,
                     text=True, timeout=3600)
  lines = [l for l in r.stdout.splitlines() if l.startswith("RESULTS ")]
  assert r.returncode == 0 and lines, r.stdout[-3000:] + r.stderr[-5000:]
  return {**json.loads(lines[-1][len("RESULTS "):]), "log": r.stdout}


@pytest.fixture(scope="module")
def sharded():
  return run_checks()


def check(sharded, name):
  assert sharded[name] == "ok", f"{sharded[name]}\n{sharded['log'][-3000:]}"


def test_train_steps_on_meshes_match_single_device(sharded):
  check(sharded, "train_steps_match_single_device")


def test_sequential_train_steps_on_meshes_match_single_device(sharded):
  check(sharded, "sequential_train_steps_match_single_device")


def test_decoding_on_meshes_matches_single_device(sharded):
  check(sharded, "decode_matches_single_device")


def test_checkpoint_restores_onto_another_mesh(sharded):
  check(sharded, "restore_on_another_mesh")


@pytest.mark.slow   # every check on all four meshes: about 3 min on 2 idle cores
def test_every_check_on_every_mesh():
  results = run_checks(all_meshes=True)
  failed = {k: v for k, v in results.items() if k != "log" and v != "ok"}
  assert not failed, "\n".join(failed.values()) + results["log"][-3000:]


def test_mesh_shape_resolution():
  assert mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
  assert mesh_shape({"data": 2, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
  with pytest.raises(UserError, match="needs 4 devices but 8"):
    mesh_shape({"data": 2, "fsdp": 2, "tensor": 1}, 8)
  with pytest.raises(UserError, match="do not divide"):
    mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)
  with pytest.raises(UserError, match="at most one axis"):
    mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)


def test_divisibility_errors(make_config):
  c = make_config(n_heads=4, n_kv_heads=2)   # batch 2
  with pytest.raises(UserError, match="batch_size=2 is not divisible"):
    check_divisibility(c, (4, 1, 1))
  with pytest.raises(UserError, match="n_kv_heads=2 is not divisible by mesh.tensor=4"):
    check_divisibility(c, (1, 1, 4))
  c.model.vocab_size = 63
  with pytest.raises(UserError, match="vocab_size=63"):
    check_divisibility(c, (1, 1, 2))
