"""io.py: one path type for local and bucket paths, against a real GCS emulator on loopback."""
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import ROOT
from mtp_jax import io
from mtp_jax.errors import UserError


def test_local_paths_expand_user_and_write_whole(tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path))
  p = io.path("~/a/b.txt")
  assert str(p) == str(tmp_path / "a" / "b.txt")
  io.write_text(p, "hello")
  assert p.read_text() == "hello" and sorted(os.listdir(p.parent)) == ["b.txt"]   # no temporary left
  with pytest.raises(UserError, match="two slashes"):
    io.path("gs:/bkt/run")


def test_bucket_files_glob_and_compressed_text(gcs):
  io.write_text("gs://bkt/io/x/one.txt", "one")
  io.write_bytes("gs://bkt/io/x/deep/two.txt", b"two")
  assert io.path("gs://bkt/io/x/one.txt").read_text() == "one"
  assert io.glob("gs://bkt/io/x/**/*.txt") == ["gs://bkt/io/x/deep/two.txt", "gs://bkt/io/x/one.txt"]
  assert io.glob("gs://bkt/io/x/one.txt") == ["gs://bkt/io/x/one.txt"]
  assert io.glob("gs://bkt/io/nothing*") == []
  import gzip
  io.write_bytes("gs://bkt/io/c.jsonl.gz", gzip.compress(b'{"text": "zipped"}\n'))
  with io.open_text("gs://bkt/io/c.jsonl.gz") as f:
    assert f.read() == '{"text": "zipped"}\n'


def test_orbax_round_trip_on_the_emulator(gcs):
  """tensorstore (orbax's array writer) reaches the emulator too: the design rests on this."""
  tree = {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones(5, jnp.int32)}
  mgr = ocp.CheckpointManager("gs://bkt/io/ckpt")
  mgr.save(3, args=ocp.args.StandardSave(tree))
  mgr.wait_until_finished()
  restored = mgr.restore(3, args=ocp.args.StandardRestore(
      {k: ocp.utils.to_shape_dtype_struct(v) for k, v in tree.items()}))
  mgr.close()
  assert mgr.all_steps() == [3]
  for k in tree:
    np.testing.assert_array_equal(restored[k], tree[k])
  assert io.glob("gs://bkt/io/ckpt/3/**/manifest.ocdbt")


def test_a_second_commit_to_an_ocdbt_manifest_on_the_emulator(gcs):
  """Tensorstore reads the manifest's generation from the download's x-goog-generation header and
  writes the next commit on that precondition (the emulator lacks the header; gcs_emulator_server.py
  adds it): a reopened store must take a second write, as a checkpoint save written in two commits does."""
  import tensorstore as ts
  spec = {"driver": "ocdbt", "base": "gs://bkt/io/ocdbt/"}
  ts.KvStore.open(spec).result().write("a", b"1").result()
  again = ts.KvStore.open(spec).result()
  again.write("b", b"2").result()
  assert again.list().result() == [b"a", b"b"] and again.read("a").result().value == b"1"


def test_missing_bucket_is_one_line(gcs):
  io.check_bucket("gs://bkt/run", "--workdir")
  with pytest.raises(UserError, match="the bucket 'nope' does not exist"):
    io.check_bucket("gs://nope/run", "--workdir")


@pytest.mark.slow   # gcsfs retries a refused connection 6 times with backoff: about a minute
def test_unreachable_endpoint_is_one_line():
  # A closed port: what a wrong endpoint or a network outage looks like, in a fresh process.
  env = {**os.environ, "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{_closed_port()}", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
  code = ("from mtp_jax import io, errors\n"
          "try:\n  io.check_bucket('gs://bkt/run', '--workdir')\n"
          "except errors.UserError as e:\n  errors.exit_with(str(e))\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2, out.stderr
  assert out.stderr.startswith("error: --workdir=gs://bkt/run: cannot reach the object store"), out.stderr
  assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def _closed_port():
  from gcs_emulator import free_port
  return free_port()


def test_bucket_lease_refuses_a_second_run_and_takes_over_a_dead_one(gcs):
  import json
  import socket
  lease = io.lock_workdir("gs://bkt/io/leased")
  with pytest.raises(UserError, match="in use by another training run"):
    io.lock_workdir("gs://bkt/io/leased")
  lease.close()
  assert not io.path("gs://bkt/io/leased/.lock").exists()
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  io.write_text("gs://bkt/io/leased/.lock", json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout),
                                                         "renewed": __import__("time").time()}))
  again = io.lock_workdir("gs://bkt/io/leased")     # its holder is gone: stale at once
  assert json.loads(io.path("gs://bkt/io/leased/.lock").read_text())["pid"] == os.getpid()
  again.close()
