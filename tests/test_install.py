"""mtp_jax as a user gets it: built into a wheel, pip-installed into a fresh venv that holds only what its
metadata asks for (tests/installed_env.py), and run through its console scripts from a directory
outside the clone.

Fast: the installed files, --help of every command, --config by recipe name, `pip check`, and one
`error:` line (naming `pip install 'mtp_jax[pods]'`) for prepare and a gs:// workdir without the extra.
Slow (-m slow): train --config=tiny a few steps, generate, convert export and import, and, with the
[pods] extra installed, prepare.
"""
import json
import os
import subprocess

import pytest

import installed_env as ie

SCRIPTS = ("mtp-jax-train", "mtp-jax-generate", "mtp-jax-convert", "mtp-jax-prepare")


def _venv(tmp_path_factory, extras: tuple[str, ...]):
  root = tmp_path_factory.mktemp("install")
  wheel = ie.build_wheel(root / "wheels")
  try:
    dists = ie.closure(ie.wheel_requirements(wheel, extras))
  except LookupError as e:
    pytest.skip(f"{e} is not installed here (pip install -r requirements-dev.txt)")
  view = ie.link_view(dists.values(), root / "site")
  py = ie.make_venv(root / "venv", [view])
  spec = f"mtp_jax[{','.join(extras)}]" if extras else "mtp_jax"
  r = ie.pip_install(py, root / "wheels", spec)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  work = root / "elsewhere"
  work.mkdir()
  return {"py": py, "venv": root / "venv", "work": work, "wheel": wheel}


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
  """A venv with mtp_jax and its runtime dependencies only (no extra)."""
  return _venv(tmp_path_factory, ())


def run(env, *argv, timeout=600, **extra_env):
  return subprocess.run(list(argv), cwd=env["work"], env=ie.clean_env(env["venv"], **extra_env),
                        capture_output=True, text=True, timeout=timeout)


def one_error_line(r) -> str:
  assert r.returncode == 2, r.stdout + r.stderr
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
  return lines[0]


def test_installed_files_scripts_and_version(runtime):
  py = runtime["py"]
  installed = ie.purelib_of(py) / "mtp_jax"
  assert installed.is_dir() and not installed.is_symlink()
  clone = {p.parent.relative_to(ie.ROOT / "mtp_jax").as_posix() for p in (ie.ROOT / "mtp_jax").rglob("*.py")}
  packages = {p.parent.relative_to(installed).as_posix() for p in installed.rglob("*.py")
              if not p.is_relative_to(installed / "recipes")}
  assert clone == packages, "pyproject.toml's package list misses a sub-package"
  recipes = sorted(p.stem for p in (ie.ROOT / "configs").glob("*.py") if not p.stem.startswith("_"))
  assert sorted(p.stem for p in (installed / "recipes").glob("*.py") if not p.stem.startswith("_")) == recipes
  for script in SCRIPTS:
    assert (runtime["venv"] / "bin" / script).exists(), script
  r = run(runtime, py, "-c", "import mtp_jax, mtp_jax.config as c; print(mtp_jax.__version__, mtp_jax.__file__, "
                             "c.recipe_names())")
  assert r.returncode == 0, r.stderr
  assert r.stdout.split()[0] == runtime["wheel"].name.split("-")[1], r.stdout   # the wheel's name has the version
  assert str(ie.ROOT) not in r.stdout
  check = run(runtime, py, "-m", "pip", "check")
  assert check.returncode == 0, check.stdout + check.stderr


def test_every_command_has_help(runtime):
  for script in SCRIPTS:
    r = run(runtime, script, "--help")
    assert r.returncode == 0, r.stderr
    assert "--" in r.stdout and ("--workdir" in r.stdout or "--output" in r.stdout), (script, r.stdout[:2000])
  r = run(runtime, "mtp-jax-generate", "--help")
  assert 'mtp-jax-generate --workdir=workdirs/default --prompt="def fib(n):" \\\n' in r.stdout, r.stdout[:600]
  assert "--max_new_tokens" in r.stdout


def test_config_names_recipes_and_lists_them(runtime):
  line = one_error_line(run(runtime, "mtp-jax-train", "--config=tinny", "--workdir=w"))
  assert "no recipe named 'tinny'" in line and "tiny" in line.split("known recipes:")[1]
  line = one_error_line(run(runtime, "mtp-jax-train", "--config=tiny", "--workdir=w", "--dryrun"))
  assert "dryrun" in line and "--config" not in line


def test_without_pods_prepare_and_gs_workdir_are_one_error_line(runtime):
  assert run(runtime, runtime["py"], "-c", "import apache_beam").returncode != 0   # really not installed
  line = one_error_line(run(runtime, "mtp-jax-prepare", "--config=tiny", "--output=prepared"))
  assert "pip install 'mtp_jax[pods]'" in line and "apache_beam" in line
  line = one_error_line(run(runtime, "mtp-jax-train", "--config=tiny", "--workdir=gs://bucket/run"))
  assert "pip install 'mtp_jax[pods]'" in line and "gcsfs" in line
  assert not (runtime["work"] / "prepared").exists()


@pytest.mark.slow
def test_train_generate_convert_through_the_console_scripts(runtime):
  cache = runtime["work"] / "cache"
  r = run(runtime, "mtp-jax-train", "--config=tiny", "--workdir=run", "--config.train.steps=3",
          "--config.train.log_every=1", "--config.train.eval_every=3", "--config.train.checkpoint_every=3",
          f"--config.data.cache_dir={cache}")
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  assert "step 3/3" in r.stdout and "final validation at step 3" in r.stdout
  assert "Unable to initialize backend" not in r.stderr and "I1" not in r.stderr.split(":")[0], r.stderr[-2000:]
  records = [json.loads(l) for l in (runtime["work"] / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "split" not in r] == [1, 2, 3]

  r = run(runtime, "mtp-jax-generate", "--workdir=run", "--prompt=def f(", "--mode=speculative",
          "--max_new_tokens=8")
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.startswith("--- 'def f('") and json.loads(r.stderr.strip().splitlines()[-1])["new_tokens"] >= 1

  r = run(runtime, "mtp-jax-convert", "export", "--workdir=run", "--to=hf")
  assert r.returncode == 0, r.stderr[-3000:]
  assert (runtime["work"] / "hf" / "model.safetensors").exists()
  r = run(runtime, "mtp-jax-convert", "import", "--from=hf", "--workdir=imported", "--n_future=3")
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.startswith("imported hf into imported") and len(r.stdout.strip().splitlines()) == 1, r.stdout
  assert not r.stderr.strip(), r.stderr[-2000:]   # no orbax INFO lines


@pytest.fixture(scope="module")
def with_pods(tmp_path_factory):
  """A venv with mtp_jax[pods]."""
  return _venv(tmp_path_factory, ("pods",))


@pytest.mark.slow
def test_prepare_with_the_pods_extra(with_pods):
  corpus = with_pods["work"] / "corpus"
  corpus.mkdir()
  for i in range(40):
    (corpus / f"doc{i}.txt").write_text(f"def f{i}(x):\n    return x * {i}\n" * 20)
  r = run(with_pods, "mtp-jax-prepare", "--config=tiny:bytes", "--config.data.source=glob",
          f"--config.data.path={corpus}/*.txt", "--config.data.prepare_shards=2", "--config.data.max_train_bytes=0",
          "--config.data.valid_fraction=0.25", "--output=prepared", "--direct_num_workers=1",
          "--direct_running_mode=in_memory")
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  assert "apitools" not in r.stderr, r.stderr[-2000:]   # Beam's import-time warnings need --verbosity
  summary = json.loads(r.stdout.strip().splitlines()[-1])
  assert summary["files"] == 40
  assert (with_pods["work"] / "prepared").is_dir() and os.listdir(with_pods["work"] / "prepared")
