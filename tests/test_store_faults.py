"""An object store that stops answering (a real GCS emulator on loopback, killed by the test) ends a bucket run
with one line within the deadline, a signal within seconds, and the rerun resumes exactly once the store is
back; a store that never answers ends a command in seconds (mtp_jax/deadline.py)."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from helpers import ROOT
from gcs_emulator import GcsEmulator, free_port
from mtp_jax import deadline, io

STEPS, EVERY = 12, 4


@pytest.fixture
def store(tmp_path):
  """An emulator of its own (the test kills it), holding a small corpus."""
  emu = GcsEmulator(buckets=["bkt"]).start()
  for i in range(12):
    io.write_text(f"gs://bkt/corpus/f{i:02d}.txt", f"def f{i}(x):\n    return x * {i}\n" * (i + 3))
  yield emu
  if emu.proc is None:
    emu.restart()
  emu.stop()


def _env(tmp_path, emu=None, **extra):
  env = {**os.environ, "PYTHONPATH": ROOT, "HOME": str(tmp_path / "home"),
         "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  if emu is not None:
    env.update(emu.env)
  return {**env, **extra}


def _main(tmp_path, workdir, env, log, steps=STEPS):
  cmd = [sys.executable, "-m", "mtp_jax.main", f"--config={ROOT}/configs/tiny.py:bytes", f"--workdir={workdir}",
         "--config.data.source=glob", "--config.data.path=gs://bkt/corpus/*.txt",
         f"--config.data.cache_dir={tmp_path / 'cache'}", f"--config.train.steps={steps}",
         f"--config.train.checkpoint_every={EVERY}", "--config.train.log_every=1", "--config.train.eval_every=100"]
  return subprocess.Popen(cmd, cwd=tmp_path, env=env, text=True, stdout=open(f"{log}.out", "w"),
                          stderr=open(f"{log}.err", "w"))


def _losses(workdir):
  lines = io.path(f"{workdir}/metrics.jsonl").read_text().splitlines()
  return {r["step"]: (r["loss"], r["head_losses"], r["grad_norm"]) for r in map(json.loads, lines) if "split" not in r}


def _wait_for(condition, proc, what, timeout=300):
  began = time.time()
  while not condition():
    assert proc.poll() is None, f"the run ended before {what}"
    assert time.time() - began < timeout, f"no {what} in {timeout} s"
    time.sleep(0.05)


def _ended(proc, log, since, within):
  """(exit status, seconds from `since` to the end, the stderr's error lines) of a run that must end in time."""
  try:
    proc.wait(timeout=within + 30)
  except subprocess.TimeoutExpired:
    proc.kill()
    pytest.fail(f"the run still went on {within + 30} s after the store went away")
  took = time.time() - since
  err = open(f"{log}.err").read()
  assert "Traceback" not in err, err[-3000:]
  return proc.returncode, took, [line for line in err.splitlines() if line.startswith("error:")]


def _resume_exactly(tmp_path, emu, workdir, step, steps=STEPS):
  """With the store back, rerun: it resumes from `step` and logs the losses it logged before the fault."""
  emu.restart()
  before = _losses(workdir)
  log = tmp_path / "resumed"
  again = _main(tmp_path, workdir, _env(tmp_path, emu), log, steps)
  assert again.wait(timeout=600) == 0, open(f"{log}.err").read()[-3000:]
  assert f"resumed from the checkpoint of step {step} in {workdir}" in open(f"{log}.out").read()
  after = _losses(workdir)
  assert sorted(after) == list(range(1, steps + 1))
  redone = [s for s in before if s > step]
  assert redone, "nothing was logged after the checkpoint before the store went away"
  assert {s: after[s] for s in before} == before   # bit-identical, the steps trained again included
  assert not io.path(f"{workdir}/.lock").exists()


@pytest.mark.parametrize("limit", [10, pytest.param(None, marks=pytest.mark.slow)])
def test_store_gone_during_a_save_ends_the_run_and_the_rerun_resumes_exactly(store, tmp_path, limit):
  """The store dies while the step-8 checkpoint is being written: the run ends within the deadline (10 s,
  or the default, 45 s: within a minute) with one line saying the save was abandoned and step 4 is intact;
  the rerun resumes from 4."""
  (tmp_path / "home").mkdir()
  workdir, log = "gs://bkt/run", tmp_path / "faulted"
  limit_env = {deadline.DEADLINE_ENV: str(limit)} if limit else {}
  limit = limit or deadline.DEFAULT_DEADLINE_S
  run = _main(tmp_path, workdir, _env(tmp_path, store, **limit_env), log)
  step8 = os.path.join(store.files, "bkt", "run", "checkpoints", "8")
  _wait_for(lambda: os.path.isdir(step8), run, "the save of step 8")
  store.halt()   # in the middle of the asynchronous save: its commit marker is not written yet
  gone = time.time()
  assert not os.path.exists(os.path.join(step8, "commit_success.txt"))
  status, took, errors = _ended(run, log, gone, within=limit)
  assert status == 2 and len(errors) == 1, errors
  assert took < min(limit + deadline.PROBE_EVERY_S + deadline.PROBE_TIMEOUT_S + 10, 60), took
  assert "has not answered for" in errors[0] and f"MTP_STORE_DEADLINE={limit:g})" in errors[0]
  assert "the save of step 8 did not finish and was abandoned" in errors[0], errors[0]
  assert "the checkpoint of step 4 is complete" in errors[0] and "resume from step 4" in errors[0]
  assert "waiting for gs://bkt/run" in open(f"{log}.err").read()    # it said what it waited for
  _resume_exactly(tmp_path, store, workdir, step=4)


def test_sigterm_while_the_store_is_gone_ends_at_once(store, tmp_path):
  """The store dies after the step-8 checkpoint; a SIGTERM then ends the run within seconds (not the
  deadline, 45 s) with one line, and the rerun resumes exactly from step 8."""
  (tmp_path / "home").mkdir()
  workdir, log = "gs://bkt/run", tmp_path / "faulted"
  run = _main(tmp_path, workdir, _env(tmp_path, store), log, steps=2 * STEPS)
  # Step 8 is complete for the run once it starts the save of step 12 (it waits for the previous save
  # first); step 8's commit marker alone is not enough: orbax may still be finishing that save when the
  # store dies. The run goes on to 24 steps, so it is still training when the signal comes.
  step12 = os.path.join(store.files, "bkt", "run", "checkpoints", "12")
  _wait_for(lambda: os.path.isdir(step12), run, "the save of step 12")
  store.halt()
  assert not os.path.exists(os.path.join(step12, "commit_success.txt"))
  time.sleep(1)
  run.send_signal(signal.SIGTERM)
  signalled = time.time()
  status, took, errors = _ended(run, log, signalled, within=deadline.STOP_GRACE_S)
  assert status == 2 and len(errors) == 1, errors
  assert took < deadline.STOP_GRACE_S + deadline.PROBE_TIMEOUT_S + 10, took
  assert errors[0].startswith("error: stopped by SIGTERM: the object store at") and "has not answered" in errors[0]
  assert "the checkpoint of step 8 is complete" in errors[0] and "resume from step 8" in errors[0], errors[0]
  _resume_exactly(tmp_path, store, workdir, step=8, steps=2 * STEPS)


def test_a_store_that_never_answers_ends_a_command_in_seconds(gcs, tmp_path):
  """No store at the address (main, convert import), or the listing reachable but tensorstore's endpoint
  not: one line, well before gcsfs's own retries (35 s a call) or tensorstore's (minutes) would end."""
  dead = f"http://127.0.0.1:{free_port()}"
  runs = {
      "main": ([sys.executable, "-m", "mtp_jax.main", f"--config={ROOT}/configs/tiny.py:bytes",
                "--workdir=gs://bkt/never", f"--config.data.cache_dir={tmp_path}"],
               {"STORAGE_EMULATOR_HOST": dead, "TENSORSTORE_GCS_HTTP_URL": dead}),
      "convert": ([sys.executable, "-m", "mtp_jax.convert", "import",
                   f"--from={ROOT}/tests/fixtures/pretrained/hf_gqa_untied", "--workdir=gs://bkt/never"],
                  {"STORAGE_EMULATOR_HOST": dead, "TENSORSTORE_GCS_HTTP_URL": dead}),
      "arrays only": ([sys.executable, "-m", "mtp_jax.main", f"--config={ROOT}/configs/tiny.py:bytes",
                       "--workdir=gs://bkt/never", f"--config.data.cache_dir={tmp_path}"],
                      {"TENSORSTORE_GCS_HTTP_URL": dead}),
  }
  began = time.time()
  procs = {name: subprocess.Popen(cmd, cwd=tmp_path, env=_env(tmp_path, gcs, **env), text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
           for name, (cmd, env) in runs.items()}
  for name, p in procs.items():
    out, err = p.communicate(timeout=120)
    took = time.time() - began
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert p.returncode == 2 and len(errors) == 1 and "Traceback" not in err, (name, err[-3000:])
    assert f"the object store at {dead}" in errors[0] and "does not answer (connection refused)" in errors[0], name
    assert "waiting for gs://bkt/never" in err, name
    assert took < 60, (name, took)
  assert "checkpoint arrays, TENSORSTORE_GCS_HTTP_URL" in errors[0]
  assert not io.path("gs://bkt/never").exists()


# A command whose main thread swallows the interruption (as a library's `except BaseException` might) and
# waits on: the watch itself prints the one line and ends the process. Its store is a bare HTTP server.
_STUCK = """
import http.server, os, threading
from absl import flags
from mtp_jax import deadline, errors
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # 501s: answers
os.environ["STORAGE_EMULATOR_HOST"] = os.environ["TENSORSTORE_GCS_HTTP_URL"] = f"http://127.0.0.1:{server.server_port}"
threading.Thread(target=server.serve_forever, daemon=True).start()

def main(argv):
  with deadline.watch({"--workdir": "gs://bkt/x"}):
    server.shutdown()
    server.server_close()
    while True:
      try:
        threading.Event().wait()
      except deadline.StoreUnavailable:
        pass

errors.run_cli(main, flags.FLAGS)
"""


def test_the_watch_interrupts_any_wait_and_a_signal_shortens_it(store, monkeypatch, tmp_path):
  """In one process: a wait on nothing is interrupted at the deadline once the store is gone; after a stop
  signal, at STOP_GRACE_S; a store that comes back in time is waited for. In a command whose main thread
  does not come back, the watch ends the process with the same line."""
  stuck = subprocess.Popen([sys.executable, "-c", _STUCK], cwd=tmp_path, text=True, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, env=_env(tmp_path, MTP_STORE_DEADLINE="2"))
  stuck_began = time.time()
  monkeypatch.setenv(deadline.DEADLINE_ENV, "3")
  began = time.time()
  with pytest.raises(deadline.StoreUnavailable, match=r"^gs://bkt/run: the object store at http://127.0.0.1:\d+ has "
                     r"not answered for \d s \(connection refused\); that is the deadline \(MTP_STORE_DEADLINE=3\)$"):
    with deadline.watch({"--workdir": "gs://bkt/run"}):
      store.halt()
      threading.Event().wait()
  assert 3 <= time.time() - began < 3 + deadline.PROBE_EVERY_S + 2
  assert not deadline.given_up()   # a new start may ask the store again

  store.restart()
  monkeypatch.setenv(deadline.DEADLINE_ENV, "60")
  with pytest.raises(deadline.StoreUnavailable, match="^stopped by SIGTERM: .* so nothing more could be saved"):
    with deadline.watch({"--workdir": "gs://bkt/run"}):
      assert not deadline.given_up()
      store.halt()
      began = time.time()
      deadline.stop_requested("SIGTERM")
      threading.Event().wait()
  assert time.time() - began < deadline.STOP_GRACE_S + deadline.PROBE_EVERY_S + 2

  store.restart()            # the listing answers, tensorstore's endpoint (a bare HTTP server here) goes away
  import http.server
  arrays = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
  threading.Thread(target=arrays.serve_forever, daemon=True).start()
  monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", f"http://127.0.0.1:{arrays.server_port}")
  monkeypatch.setenv(deadline.DEADLINE_ENV, "3")
  with pytest.raises(deadline.StoreUnavailable, match=rf"object store at http://127.0.0.1:{arrays.server_port} "
                                                      r"\(checkpoint arrays, TENSORSTORE_GCS_HTTP_URL\) has not"):
    with deadline.watch({"--workdir": "gs://bkt/run"}):
      arrays.shutdown()
      arrays.server_close()
      threading.Event().wait()
  monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", store.url)

  monkeypatch.setenv(deadline.DEADLINE_ENV, "12")
  with deadline.watch({"--workdir": "gs://bkt/run"}):
    store.halt()
    time.sleep(3)
    store.restart()          # back within the deadline: the run goes on
    time.sleep(4)
  assert not deadline.given_up()

  _, err = stuck.communicate(timeout=60)
  errors = [line for line in err.splitlines() if line.startswith("error:")]
  assert stuck.returncode == 2 and len(errors) == 1 and "Traceback" not in err, err[-3000:]
  assert errors[0].startswith("error: gs://bkt/x: the object store at http://127.0.0.1:") and "(connection " \
      "refused); that is the deadline (MTP_STORE_DEADLINE=2)" in errors[0], errors
  assert time.time() - stuck_began < 2 + deadline.PROBE_EVERY_S + deadline.HARD_EXIT_S + 15
