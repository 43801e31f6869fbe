"""Experiment scripts end to end at toy size (--quick), so they never rot: they run, write the table,
the JSON and the plot, and what they report is self-consistent."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_marginalisation_quick(tmp_path):
  r = subprocess.run([sys.executable, "experiments/marginalisation.py", "--quick", "--k=1,4,all",
                      f"--out_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                     env={**os.environ, "PYTHONPATH": ROOT, "HOME": str(tmp_path)})
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads((tmp_path / "marginalisation_quick.json").read_text())
  ks = [row["k"] for row in res["rows"]]
  assert ks == [1, 4, res["vocab"], 0]                    # three marginals, then head 2 of the n=2 import
  for row in res["rows"]:
    assert 0 <= row["acc_t2"] <= 1 and row["nll_t2"] > 0
  assert (tmp_path / "marginalisation_quick.png").stat().st_size > 10_000
  assert "| predictor |" in (tmp_path / "marginalisation_quick.md").read_text()
