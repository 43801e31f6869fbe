"""Every notebook in experiments/notebooks runs top to bottom (nbclient), with its `parameters` cell
overridden by tiny values, as papermill would; any cell error, including a failed assert, fails."""
import json
import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "experiments", "notebooks")

TINY = {
    "01_quickstart.ipynb": {"STEPS": 30, "MAX_NEW_TOKENS": 24},
    "02_pretrained_heads.ipynb": {"STEPS": 6, "MAX_NEW_TOKENS": 16},
    "03_sharding.ipynb": {"STEPS": 4, "SIZE_7B": ["n4"]},
}


def _with_parameters(book, values: dict):
  """Insert a cell after the one tagged `parameters` that sets `values` (papermill's convention)."""
  at = next(i for i, c in enumerate(book.cells) if "parameters" in c.metadata.get("tags", []))
  code = "\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items())
  book.cells.insert(at + 1, nbformat.v4.new_code_cell(code))
  return book


def test_every_notebook_has_tiny_parameters():
  assert sorted(f for f in os.listdir(NOTEBOOKS) if f.endswith(".ipynb")) == sorted(TINY)


@pytest.mark.parametrize("name", sorted(TINY))
def test_notebook_runs(name, tmp_path):
  book = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  assert book.cells[0].cell_type == "markdown" and "Time" in book.cells[0].source
  values = dict(TINY[name], WORKDIR=str(tmp_path / "run"))
  book = _with_parameters(book, values)
  env_cache = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla"), "MPLBACKEND": "Agg"}
  os.environ.update(env_cache)   # the kernel inherits this process's environment
  client = NotebookClient(book, timeout=600, kernel_name="python3", resources={"metadata": {"path": NOTEBOOKS}})
  client.execute()
  errors = [o for c in book.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
  assert not errors
