"""A run whose workdir and corpus live on a bucket (a real GCS emulator on loopback): it trains, is
SIGKILLed, resumes with bit-identical losses, and generate decodes from the bucket; nothing of the
run is written locally apart from caches."""
import json
import os
import signal
import subprocess
import sys
import time

from helpers import ROOT
from mtp_jax import io


def _env(tmp_path):
  cache = tmp_path / "cache"
  return {**os.environ, "PYTHONPATH": ROOT, "HOME": str(tmp_path / "home"),
          "JAX_COMPILATION_CACHE_DIR": str(cache / "xla"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _train(tmp_path, workdir, wait=True):
  cmd = [sys.executable, "-m", "mtp_jax.main", f"--config={ROOT}/configs/tiny.py:bytes", f"--workdir={workdir}",
         "--config.data.source=glob", "--config.data.path=gs://bkt/e2e/corpus/**/*.txt",
         f"--config.data.cache_dir={tmp_path / 'cache'}", "--config.train.steps=16",
         "--config.train.checkpoint_every=4", "--config.train.log_every=1", "--config.train.eval_every=100"]
  kw = dict(cwd=tmp_path / "cwd", env=_env(tmp_path), text=True)
  if not wait:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)
  return subprocess.run(cmd, capture_output=True, timeout=600, **kw)


def _losses(workdir):
  lines = io.path(f"{workdir}/metrics.jsonl").read_text().splitlines()
  return [(r["step"], r["loss"], r["head_losses"], r["grad_norm"]) for r in map(json.loads, lines) if "split" not in r]


# It used to fail intermittently with "Malformed StorageGeneration": the emulator sent no
# x-goog-generation header on downloads, which tensorstore needs for a second commit to an OCDBT
# manifest (tests/gcs_emulator_server.py adds it; test_io.py checks that commit on its own).
def test_bucket_workdir_trains_resumes_and_generates(gcs, tmp_path):
  (tmp_path / "cwd").mkdir()
  (tmp_path / "home").mkdir()
  for i in range(30):
    io.write_text(f"gs://bkt/e2e/corpus/d{i % 3}/f{i:02d}.txt", f"def f{i}(x):\n    return x * {i}\n" * (i + 3))
  full = _train(tmp_path, "gs://bkt/e2e/full", wait=False)
  killed = _train(tmp_path, "gs://bkt/e2e/killed", wait=False)
  marker = io.path("gs://bkt/e2e/killed/checkpoints/8/commit_success.txt")
  while not marker.exists():
    assert killed.poll() is None, killed.stdout.read()
    time.sleep(0.2)
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  out, _ = full.communicate(timeout=600)
  assert full.returncode == 0, out[-3000:]
  assert io.path("gs://bkt/e2e/killed/.lock").exists()     # a SIGKILLed run leaves its lease behind ...
  r = _train(tmp_path, "gs://bkt/e2e/killed")               # ... which its own host sees is stale
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from the checkpoint of step" in r.stdout
  assert _losses("gs://bkt/e2e/killed") == _losses("gs://bkt/e2e/full")   # bit-identical, every step
  assert [s for s, *_ in _losses("gs://bkt/e2e/full")] == list(range(1, 17))
  assert not io.path("gs://bkt/e2e/full/.lock").exists()    # released at exit
  names = {p.rsplit("/", 1)[-1] for p in io.glob("gs://bkt/e2e/full/*")}
  assert {"config.json", "metrics.jsonl"} <= names and any(n.startswith("events.out.tfevents") for n in names)

  g = subprocess.run([sys.executable, "-m", "mtp_jax.generate", "--workdir=gs://bkt/e2e/full", "--prompt=def f",
                      "--max_new_tokens=12"], cwd=tmp_path / "cwd", env=_env(tmp_path), capture_output=True,
                     text=True, timeout=600)
  assert g.returncode == 0, g.stderr[-3000:]
  assert g.stdout.startswith("--- 'def f'") and '"new_tokens": 12' in g.stdout + g.stderr
  # Nothing local but the caches: no stray gs:/ directory, nothing in the working directory or HOME.
  assert os.listdir(tmp_path / "cwd") == [] and os.listdir(tmp_path / "home") == []
  assert sorted(os.listdir(tmp_path)) == ["cache", "cwd", "home"]


def test_missing_bucket_workdir_is_one_line(gcs, tmp_path):
  r = subprocess.run([sys.executable, "-m", "mtp_jax.main", f"--config={ROOT}/configs/tiny.py:bytes",
                      "--workdir=gs://no-such-bucket/run", f"--config.data.cache_dir={tmp_path}"],
                     cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
  assert r.returncode == 2, r.stderr[-2000:]
  errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "the bucket 'no-such-bucket' does not exist" in errors[0], r.stderr[-2000:]
  assert "Traceback" not in r.stderr
