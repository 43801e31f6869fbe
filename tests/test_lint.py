"""The linter configured in pyproject.toml ([tool.ruff]) passes on the whole tree."""
import importlib.util
import subprocess
import sys

import pytest

from helpers import ROOT


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None,
                    reason="ruff is not installed (it is in requirements-dev.txt)")
def test_ruff_check_passes():
  proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format=concise", "."],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stdout + proc.stderr
