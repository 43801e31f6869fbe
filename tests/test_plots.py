"""experiments/common/plots.py draws every committed results file it has a plotter for."""
import json
import os
import sys

from helpers import ROOT
sys.path.insert(0, os.path.join(ROOT, "experiments"))

from common import plots  # noqa: E402


def test_every_known_results_file_plots(tmp_path):
  drawn = []
  for file in plots.results_files():
    f = os.path.basename(file)
    if plots.plotter_for(f[:-5]):
      with open(file) as fh:
        path = plots.plot(f[:-5], json.load(fh), results_dir=str(tmp_path))
      assert os.path.getsize(path) > 10_000
      drawn.append(f)
  assert {"memory.json", "speculative.json", "paper_dry_run.json"} <= set(drawn)
