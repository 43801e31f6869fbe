"""What the command-line programs accept and print: --config by recipe name, one error line for a
mistake (naming the flag that is wrong, or the extra that is missing), --help as written, and a training
run's console and metrics.jsonl (wall-clock times, model FLOP/s and MFU, a profile when asked, no library
INFO lines)."""
import glob
import json
import os
import re
import subprocess
import sys

import pytest

from mtp_jax import config as config_lib
from mtp_jax import io, metrics
from mtp_jax.config import ConfigError
from mtp_jax.dry_run import peak_flops_per_device
from mtp_jax.errors import UserError

from helpers import ROOT
ENV = {**os.environ, "PYTHONPATH": ROOT}


def cli(module, *argv, cwd=ROOT, timeout=300, **env):
  return subprocess.run([sys.executable, "-m", f"mtp_jax.{module}", *argv], cwd=cwd, env={**ENV, **env},
                        capture_output=True, text=True, timeout=timeout)


def one_error_line(r) -> str:
  assert r.returncode == 2, r.stdout + r.stderr
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
  return lines[0]


# ----------------------------------------------------------------------------- --config

def test_recipe_names_and_files(tmp_path, monkeypatch):
  recipes = config_lib.recipe_dir()
  assert config_lib.recipe_file("tiny") == f"{recipes / 'tiny.py'}"
  assert config_lib.recipe_file("tiny:bytes") == f"{recipes / 'tiny.py'}:bytes"
  assert config_lib.recipe_file("configs/tiny.py:bytes").endswith("configs/tiny.py:bytes")
  mine = tmp_path / "mine.py"
  mine.write_text("from mtp_jax.config import base_config\ndef get_config(arg=None):\n  return base_config()\n")
  assert config_lib.recipe_file(f"{mine}:x") == f"{mine}:x"
  monkeypatch.chdir(tmp_path)   # a clone's path, used where there is no clone (after pip install)
  assert config_lib.recipe_file("configs/default.py:n1") == f"{recipes / 'default.py'}:n1"
  assert config_lib.load("configs/tiny.py:bytes").data.tokenizer == "bytes"
  with pytest.raises(ConfigError, match=r"no recipe named 'tinny'; known recipes: default, .*tiny"):
    config_lib.recipe_file("tinny")
  with pytest.raises(ConfigError, match="no file"):
    config_lib.recipe_file("elsewhere/tiny.py")


def test_resolve_config_flag_forms():
  tiny = str(config_lib.recipe_dir() / "tiny.py")
  argv = ["prog", "--config=tiny:bytes", "--config.train.steps=3", "--workdir=w"]
  assert config_lib.resolve_config_flag(argv) == ["prog", f"--config={tiny}:bytes", "--config.train.steps=3",
                                                  "--workdir=w"]
  assert config_lib.resolve_config_flag(["prog", "--config", "tiny"]) == ["prog", "--config", tiny]


@pytest.mark.parametrize("module, extra", [("main", ["--workdir=w"]), ("prepare", ["--output=o"])])
def test_unknown_recipe_lists_the_known_ones(tmp_path, module, extra):
  line = one_error_line(cli(module, "--config=tinny", *extra, cwd=tmp_path))
  assert "no recipe named 'tinny'" in line and all(n in line for n in config_lib.recipe_names())


def test_a_mistyped_flag_is_not_blamed_on_config(tmp_path):
  line = one_error_line(cli("main", "--config=tiny", "--workdir=w", "--dryrun", cwd=tmp_path))
  assert "dryrun" in line and "dry_run" in line and "--config" not in line
  line = one_error_line(cli("main", "--config=tiny", "--workdir=w", "--config.train.stpes=3", cwd=tmp_path))
  assert "--config.train.stpes" in line and "steps" in line


def test_generate_help_keeps_its_example_and_exits_0():
  r = cli("generate", "--help")
  assert r.returncode == 0, r.stderr
  assert 'mtp-jax-generate --workdir=workdirs/default --prompt="def fib(n):" \\\n' \
         "        --mode=speculative" in r.stdout, r.stdout[:800]


# ----------------------------------------------------------------------------- a missing extra

def test_missing_extras_are_one_line_naming_pods(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "gcsfs", None)   # import gcsfs -> ImportError, as when not installed
  with pytest.raises(UserError, match=r"gs://b/run: a gs:// path needs gcsfs, .* pip install 'mtp_jax\[pods\]'"):
    io.path("gs://b/run")
  import fsspec.compression  # noqa: F401  registered now, with zstandard present: hiding it below must not leak
  monkeypatch.setitem(sys.modules, "zstandard", None)   # into fsspec's codecs for later tests in this worker
  (tmp_path / "a.jsonl.zst").write_bytes(b"")
  with pytest.raises(UserError, match=r"needs zstandard.*mtp_jax\[pods\]"):
    io.open_text(tmp_path / "a.jsonl.zst")


def test_a_codec_fsspec_lacks_is_one_line_not_raw_bytes(monkeypatch, tmp_path):
  import fsspec.compression
  import fsspec.utils
  monkeypatch.delitem(fsspec.utils.compressions, "zst")   # as when fsspec was imported without zstandard
  (tmp_path / "a.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")
  with pytest.raises(UserError, match=r"a.jsonl.zst: fsspec has no .zst codec in this process"):
    io.open_text(tmp_path / "a.jsonl.zst")


def test_prepare_without_beam_is_one_line(tmp_path):
  code = ("import sys; sys.modules['apache_beam'] = None; sys.argv[0] = 'mtp-jax-prepare'; "
          "from mtp_jax.prepare import run; run()")
  r = subprocess.run([sys.executable, "-c", code, "--config=tiny", f"--output={tmp_path / 'out'}"], cwd=tmp_path,
                     env=ENV, capture_output=True, text=True, timeout=300)
  line = one_error_line(r)
  assert "mtp-jax-prepare needs apache_beam" in line and "pip install 'mtp_jax[pods]'" in line
  assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- a run's output

def test_peak_flops_table():
  assert peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
  assert peak_flops_per_device("NVIDIA H100 PCIe") == 756e12
  assert peak_flops_per_device("NVIDIA L40S") == 362e12 and peak_flops_per_device("NVIDIA L4") == 121e12
  assert peak_flops_per_device("TPU v5 lite") == 197e12 and peak_flops_per_device("TPU v4") == 275e12
  assert peak_flops_per_device("cpu") is None


def test_mfu_and_time_in_the_records(tmp_path, capsys):
  w = metrics.MetricsWriter(tmp_path, 10, flops_per_token=1e9, peak_flops=4e12)
  m = {"loss": 2.0, "head_losses": [2.0], "head_accuracies": [0.1], "head_acceptance": [1.0], "lr": 1e-3,
       "grad_norm": 1.0}
  rec = w.train(5, m, tokens_per_sec=1000.0, seconds_per_step=0.1)
  w.close()
  assert rec["flops_per_sec"] == 1e12 and rec["mfu"] == 0.25 and abs(rec["time"] - __import__("time").time()) < 60
  assert re.match(r"\d\d:\d\d:\d\d  step  5/10 .* MFU 25\.0%", capsys.readouterr().out)
  assert json.loads((tmp_path / "metrics.jsonl").read_text())["mfu"] == 0.25


def test_train_cli_output_records_and_profile(tmp_path):
  """The CLI's console and metrics.jsonl on CPU, with a profile of steps 2..3."""
  r = cli("main", "--config=tiny:bytes", f"--workdir={tmp_path / 'run'}", "--config.train.steps=4",
          "--config.train.log_every=1", "--config.train.eval_every=4", "--config.train.checkpoint_every=4",
          "--config.train.profile_steps=2:3", f"--config.data.cache_dir={tmp_path / 'cache'}",
          "--config.data.max_train_bytes=100000", cwd=tmp_path, timeout=600, JAX_PLATFORMS="")
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  steps = [l for l in r.stdout.splitlines() if re.match(r"\d\d:\d\d:\d\d  step ", l)]
  assert len(steps) == 4 and all("GFLOP/s" in l or "TFLOP/s" in l for l in steps), r.stdout
  assert "profile of steps 2..3 written to" in r.stdout
  assert glob.glob(str(tmp_path / "run" / "plugins" / "profile" / "*" / "*.xplane.pb"))
  records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert all("time" in x for x in records) and all(x["flops_per_sec"] > 0 for x in records if "split" not in x)
  # library INFO lines (orbax, jax's TPU probe) only with --verbosity
  assert "Unable to initialize backend" not in r.stderr and not re.search(r"^I\d{4} ", r.stderr, re.M), r.stderr
