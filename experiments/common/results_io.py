"""Where experiment scripts put their figures: <name>.json, .md and (where a plotter exists, see plots.py)
.png in the results/ folder beside the script, e.g. experiments/memory/results/ for
experiments/memory/memory.py. MTP_RESULTS_DIR, where set, replaces every script's results/ folder (a smoke
run of experiments/speed/gpu_benchmarks.sh writes elsewhere than the committed tables)."""
import json
import os
import sys


def results_folder(script: str) -> str:
  """The folder the script at path `script` writes its results to: MTP_RESULTS_DIR, else its results/."""
  return os.environ.get("MTP_RESULTS_DIR") or os.path.join(os.path.dirname(os.path.abspath(script)), "results")


def write_results(name: str, result, markdown_lines, results_dir: str | None = None) -> None:
  """Write the raw figures as JSON and the table as markdown, and print the table. Without a folder they
  go to results_folder() of the file that calls this."""
  out = results_dir or results_folder(sys._getframe(1).f_globals["__file__"])
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, f"{name}.json"), "w") as f:
    json.dump(result, f, indent=2)
  with open(os.path.join(out, f"{name}.md"), "w") as f:
    f.write("\n".join(markdown_lines) + "\n")
  print("\n".join(markdown_lines))
  from common.plots import plot   # matplotlib only when writing results
  plot(name, result, out)
