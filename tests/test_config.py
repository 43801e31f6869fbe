"""Bad configs fail before any compile with one clear line; the dry run reports what it promises."""
import json
import os
import subprocess
import sys

import pytest

from mtp_jax.config import ConfigError, validate
from mtp_jax.dry_run import dry_run

from helpers import ROOT, main_command


@pytest.mark.parametrize("change, words", [
    ({"n_future": 0}, "n_future"),
    ({"d_model": 30}, "not divisible by model.n_heads"),
    ({"n_kv_heads": 3}, "does not divide model.n_heads"),
    ({"n_future": 5, "n_layers": 4}, "parity"),
    ({"head_type": "tree"}, "head_type"),
    ({"remat": "some"}, "remat"),
    ({"attention": "flash"}, "model.attention"),
])
def test_bad_model_fields(make_config, change, words):
  with pytest.raises(ConfigError, match=words):
    validate(make_config(**change))


def test_bad_loss_and_train_fields(make_config):
  c = make_config()
  c.loss.chunk_size = 5
  with pytest.raises(ConfigError, match="does not divide data.seq_len"):
    validate(c)
  c = make_config()
  c.loss.impl = "vmap"
  with pytest.raises(ConfigError, match="loss.impl"):
    validate(c)
  c = make_config()
  c.train.steps = 0
  with pytest.raises(ConfigError, match="train.steps"):
    validate(c)


def test_parity_off_allows_more_heads_than_layers(make_config):
  validate(make_config(n_future=6, n_layers=2, parity=False))


@pytest.mark.parametrize("flags, words", [
    (["--config.model.n_future=0"], "n_future"),
    (["--config.model.head_type=tree"], "head_type"),
    (["--config.modle.n_future=2"], "modle"),
    (["--config.train.steps=many"], "steps"),
    (["--config.mesh.data=2"], "needs 2 devices but 1"),           # mesh vs device count, before compile
    (["--config.mesh.data=-1", "--config.mesh.fsdp=3"], "do not divide"),
    (["--config.model.attention=splash"], "not available on backend 'cpu'; it has: auto, xla, blockwise"),
])
def test_cli_rejects_bad_config_in_one_line(tmp_path, flags, words):
  r = main_command("--config=configs/tiny.py", f"--workdir={tmp_path}", "--dry_run", *flags)
  assert r.returncode == 2, r.stderr
  errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and words in errors[0], r.stderr
  assert "Traceback" not in r.stderr
  assert not os.listdir(tmp_path)          # nothing written for a refused run


def test_cli_rejects_missing_config_file(tmp_path):
  r = main_command("--config=configs/nope.py", f"--workdir={tmp_path}")
  assert r.returncode == 2 and "nope.py" in r.stderr and "Traceback" not in r.stderr


def test_dry_run_report(make_config, tmp_path):
  c = make_config(n_future=2)
  report = dry_run(c, str(tmp_path))
  saved = json.load(open(tmp_path / "dry_run.json"))
  assert saved == report
  for key in ("params_total", "params_trunk", "params_heads", "params_embedding", "flops_per_token",
              "temp_bytes", "argument_bytes", "output_bytes"):
    assert report[key] > 0, key
  assert report["params_total"] == (report["params_trunk"] + report["params_heads"] + report["params_embedding"]
                                    + c.model.d_model)   # + the shared final norm


def test_cli_dry_run_plans_with_the_memory_schedule(tmp_path):
  """On CPU, `main --dry_run` plans with XLA's memory-minimising schedule (as accelerators schedule);
  it lowers an fsdp=8 step's temporaries, and a schedule the user set in XLA_FLAGS is kept and reported."""
  reports = {}
  for name, flag in (("default", ""), ("user_concurrency", "--xla_cpu_enable_concurrency_optimized_scheduler=true")):
    workdir = tmp_path / name
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8 {flag}")
    r = subprocess.run([sys.executable, "-m", "mtp_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
                        "--dry_run", "--config.mesh.data=1", "--config.mesh.fsdp=8", "--config.train.batch_size=8",
                        "--config.model.remat=full"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    reports[name] = json.load(open(workdir / "dry_run.json"))
  assert reports["default"]["cpu_schedule"] == "memory"
  assert reports["user_concurrency"]["cpu_schedule"] == "concurrency"
  assert reports["default"]["temp_bytes"] < reports["user_concurrency"]["temp_bytes"]
