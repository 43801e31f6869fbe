"""Every notebook in experiments/notebooks runs top to bottom as a Colab user runs it: in a fresh Python
environment that does not have mtp_jax, from a directory outside the clone, so its install cell
pip-installs the package (from a copy of this clone, via MTP_JAX_SOURCE) before anything else runs. Its
`parameters` cell is overridden by tiny values, as papermill would; any cell error, including a failed
assert, fails. The environment holds the runtime and [notebooks] dependencies only (tests/installed_env.py),
as a Colab runtime holds its own packages."""
import json
import os
import re
import subprocess
import tomllib

import nbformat
import pytest
from packaging.requirements import Requirement

import installed_env as ie

from helpers import ROOT
NOTEBOOKS = os.path.join(ROOT, "experiments", "notebooks")

TINY = {
    "01_quickstart.ipynb": {"STEPS": 30, "MAX_NEW_TOKENS": 24, "MEMORY_VOCAB": 4096, "MEMORY_SEQ_LEN": 128},
    "02_pretrained_heads.ipynb": {"TRAIN_WINDOWS": 8, "VALID_WINDOWS": 4, "SEQ_LEN": 64, "STEPS": 4, "BATCH": 4,
                                  "CE_POSITIONS": 16, "DRAFT_VOCAB": 512, "MAX_NEW_TOKENS": 8},
    "03_sharding.ipynb": {"STEPS": 4, "SIZE_7B": ["n4"]},
}

RUNNER = """
import sys, nbformat
from nbclient import NotebookClient
book = nbformat.read(sys.argv[1], as_version=4)
NotebookClient(book, timeout=900, kernel_name="python3", resources={"metadata": {"path": "."}}).execute()
nbformat.write(book, sys.argv[2])
"""


def _with_parameters(book, values: dict):
  """Insert a cell after the one tagged `parameters` that sets `values` (papermill's convention)."""
  at = next(i for i, c in enumerate(book.cells) if "parameters" in c.metadata.get("tags", []))
  code = "\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items())
  book.cells.insert(at + 1, nbformat.v4.new_code_cell(code))
  return book


def _source(book) -> str:
  """The repository the install cell installs from by default."""
  install = next(c for c in book.cells if c.cell_type == "code" and c.source.startswith("# Install"))
  return re.search(r'^SOURCE = "git\+https://github.com/([^"]+)"$', install.source, re.M).group(1)


def test_every_notebook_has_tiny_parameters():
  assert sorted(f for f in os.listdir(NOTEBOOKS) if f.endswith(".ipynb")) == sorted(TINY)


@pytest.mark.parametrize("name", sorted(TINY))
def test_badge_opens_this_notebook_from_the_repository_it_installs(name):
  book = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  first = book.cells[0]
  assert first.cell_type == "markdown" and "Time" in first.source
  badge = re.search(r"\(https://colab\.research\.google\.com/github/(.+?)/blob/main/(.+?)\)", first.source)
  assert badge and badge.group(2) == f"experiments/notebooks/{name}" and badge.group(1) == _source(book)


@pytest.mark.parametrize("name", sorted(TINY))
def test_stored_outputs_render_and_stay_small(name):
  """The notebooks are stored executed (default parameters, CPU), so GitHub and Colab show results unrun."""
  path = os.path.join(NOTEBOOKS, name)
  book = nbformat.read(path, as_version=4)
  code = [c for c in book.cells if c.cell_type == "code"]
  assert any("backend:" in o.get("text", "") for c in code for o in c.outputs)
  assert not [o for c in code for o in c.outputs if o.output_type == "error"]
  assert os.path.getsize(path) < 250_000


@pytest.fixture(scope="module")
def runtime_packages(tmp_path_factory):
  """What a fresh runtime has: mtp_jax's runtime and [notebooks] dependencies (not mtp_jax), linked."""
  project = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]
  reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["notebooks"]]
  try:
    dists = ie.closure(reqs)
  except LookupError as e:
    pytest.skip(f"{e} is not installed here (pip install -r requirements-dev.txt)")
  return ie.link_view(dists.values(), tmp_path_factory.mktemp("runtime") / "site")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """What the install cell installs from: the clone's files as a fresh clone has them."""
  return ie.source_copy(tmp_path_factory.mktemp("source") / "mtp_jax")


# Notebook 02 fetches SmolLM2-135M into its fresh runtime and trains heads on it (two minutes and more), notebook 03
# runs the mesh checks on 8 host devices: both run with -m slow. CI's real-model checks are tests/test_real_model.py
# (the notebook's library calls: tests/test_feature_heads.py), its mesh checks tests/test_sharding.py.
RUNS = [pytest.param(n, marks=pytest.mark.slow) if n.startswith(("02_", "03_")) else n for n in sorted(TINY)]


@pytest.mark.parametrize("name", RUNS)
def test_notebook_runs_from_a_fresh_runtime(name, tmp_path, runtime_packages, source):
  py = ie.make_venv(tmp_path / "venv", [runtime_packages])
  content = tmp_path / "content"   # Colab's working directory: no clone above it
  content.mkdir()
  book = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  book = _with_parameters(book, dict(TINY[name], WORKDIR=str(tmp_path / "run")))
  book.cells.append(nbformat.v4.new_code_cell("import mtp_jax; print(mtp_jax.__file__)"))
  nbformat.write(book, content / "in.ipynb")
  env = ie.clean_env(tmp_path / "venv", MTP_JAX_SOURCE=str(source), MPLBACKEND="Agg",
                     JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla"))
  r = subprocess.run([py, "-c", RUNNER, "in.ipynb", "out.ipynb"], cwd=content, env=env, capture_output=True,
                     text=True, timeout=1800)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
  done = nbformat.read(content / "out.ipynb", as_version=4)
  errors = [o for c in done.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
  assert not errors
  where = "".join(o.get("text", "") for o in done.cells[-1].outputs)
  assert str(tmp_path / "venv") in where and ROOT not in where, where   # the installed package, not the clone
