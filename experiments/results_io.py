"""The results helper (common/results_io.py) under its old name, for the scripts still at experiments/
top level: they write to experiments/results/. This file goes when they move into a group."""
from common.results_io import results_folder, write_results  # noqa: F401

RESULTS = results_folder(__file__)
