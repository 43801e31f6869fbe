"""`pip install .` into a fresh venv, then, from a directory outside the clone, train the tiny recipe
for a few steps and generate. The venv reuses this interpreter's installed dependencies (a .pth
file), so the test exercises the package's own metadata and files without downloading JAX again."""
import os
import pathlib
import site
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]

SNIPPET = textwrap.dedent("""
    import json, os, sys, pathlib
    import mtp_jax
    assert not pathlib.Path(mtp_jax.__file__).is_relative_to(pathlib.Path(sys.argv[1])), mtp_jax.__file__
    from mtp_jax import config as config_lib
    from mtp_jax.train import train_and_evaluate
    from mtp_jax.generate import generate, load_workdir
    config = config_lib.load("tiny:bytes")
    config.train.update(steps=3, log_every=1, eval_every=3, checkpoint_every=3)
    config.data.cache_dir = "cache"
    train_and_evaluate(config, "run")
    params, run_config, tok = load_workdir("run")
    out = generate(params, run_config, ["def f("], tok, mode="speculative", max_new_tokens=8)
    print(json.dumps({"recipes": config_lib.recipe_names(), "tokens": out[0]["tokens"]}))
""")


def test_pip_install_then_use_outside_the_clone(tmp_path):
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
  py = venv / "bin" / "python"
  purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           capture_output=True, text=True, check=True).stdout.strip()
  (pathlib.Path(purelib) / "parent_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
  pip = subprocess.run([py, "-m", "pip", "install", "-q", "--no-cache-dir", str(ROOT)], capture_output=True,
                       text=True, timeout=600)
  assert pip.returncode == 0, pip.stderr[-3000:]
  installed = pathlib.Path(purelib) / "mtp_jax"
  clone_files = {p.relative_to(ROOT / "mtp_jax").as_posix() for p in (ROOT / "mtp_jax").rglob("*.py")}
  installed_files = {p.relative_to(installed).as_posix() for p in installed.rglob("*.py")
                     if not p.is_relative_to(installed / "recipes")}
  assert clone_files == installed_files, "pyproject.toml's package list misses a sub-package"
  clone_recipes = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if not p.stem.startswith("_"))
  assert sorted(p.stem for p in (installed / "recipes").glob("*.py") if not p.stem.startswith("_")) == clone_recipes

  work = tmp_path / "elsewhere"
  work.mkdir()
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  r = subprocess.run([py, "-c", SNIPPET, str(ROOT)], cwd=work, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  result = __import__("json").loads(r.stdout.strip().splitlines()[-1])
  assert result["recipes"] == clone_recipes and len(result["tokens"]) == 8
