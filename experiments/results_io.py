"""Where experiment scripts put their figures: experiments/results/<name>.json, .md and (where a
plotter exists, see plots.py) .png. MTP_RESULTS_DIR, where set, replaces experiments/results/ (a smoke run
of experiments/gpu_benchmarks.sh writes elsewhere than the committed tables)."""
import json
import os

RESULTS = os.environ.get("MTP_RESULTS_DIR") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def write_results(name: str, result, markdown_lines, results_dir: str = RESULTS) -> None:
  """Write the raw figures as JSON and the table as markdown, and print the table."""
  os.makedirs(results_dir, exist_ok=True)
  with open(os.path.join(results_dir, f"{name}.json"), "w") as f:
    json.dump(result, f, indent=2)
  with open(os.path.join(results_dir, f"{name}.md"), "w") as f:
    f.write("\n".join(markdown_lines) + "\n")
  print("\n".join(markdown_lines))
  from plots import plot   # matplotlib only when writing results
  plot(name, result, results_dir)
