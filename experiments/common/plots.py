"""PNG plots beside the results tables: experiments/<group>/results/<name>.png from <name>.json.

    python experiments/common/plots.py            # redraw every results file that has a plotter
    python experiments/common/plots.py memory     # one of them

`results_io.write_results` calls `plot()` too, so a rerun of an experiment redraws its plot.
A plotter is chosen by the file stem's prefix (memory*, speculative*, paper_dry_run*, marginalisation*,
frozen_heads*, induction*, poly_arithmetic*).
"""
import glob
import json
import os
import sys
from collections import defaultdict

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

EXPERIMENTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB, GiB = 2 ** 20, 2 ** 30


def _memory(result, ax):
  by_impl = defaultdict(dict)
  for r in result["rows"]:
    by_impl[r["impl"]][r["n"]] = r["temp_bytes"] / MiB
  for impl, points in by_impl.items():
    ns = sorted(points)
    ax.plot(ns, [points[n] for n in ns], "o-", label=impl)
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("heads n")
  ax.set_ylabel("compiled train-step temporaries (MiB)")
  ax.set_title(f"memory of the multi-token loss ({result['device']}, vocab {result['vocab']})", fontsize=9)
  ax.legend()


def _speculative(result, ax):
  rows = result["rows"]
  batches = [str(r["batch"]) for r in rows]
  x = range(len(rows))
  ax.bar([i - 0.2 for i in x], [r["speedup"] for r in rows], width=0.4, label="speedup over greedy")
  ax.bar([i + 0.2 for i in x], [r["tokens_per_forward"] for r in rows], width=0.4, label="tokens per forward")
  ax.axhline(1.0, color="gray", lw=0.8)
  ax.set_xticks(list(x), batches)
  ax.set_xlabel("batch size")
  ax.set_title(f"self-speculative decoding ({result['device']}; {result['model']})", fontsize=8)
  ax.legend()


def _dry_run(result, ax):
  labels = [f"{r['variant']}\n{r['mesh']['data']}x{r['mesh']['fsdp']}x{r['mesh']['tensor']}" for r in result]
  parts = [("param_bytes_per_device", "params"), ("optimizer_bytes_per_device", "AdamW"), ("temp_bytes", "compiled temp")]
  bottom = [0.0] * len(result)
  for key, label in parts:
    vals = [r[key] / GiB for r in result]
    ax.bar(range(len(result)), vals, bottom=bottom, label=label)
    bottom = [b + v for b, v in zip(bottom, vals)]
  ax.set_xticks(range(len(result)), labels, fontsize=7)
  ax.set_ylabel("GiB per device")
  ax.set_title("7B train step per device (mesh data x fsdp x tensor)", fontsize=9)
  ax.legend()


def _marginalisation(result, ax):
  if "pool" in result:   # the per-seed differences, summarised over seeds
    for i, r in enumerate(result["rows"]):
      ax.scatter([i] * len(r["per_seed"]), r["per_seed"], color="tab:gray", s=12)
      ax.errorbar([i], [r["interval"][0]], yerr=[[r["interval"][1]], [r["interval"][1]]], fmt="o", capsize=4)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(result["rows"])), [r["difference"].replace(" - ", "\n- ") for r in result["rows"]],
                  fontsize=6)
    ax.set_ylabel("t+2 nll: head 2 - exact marginal (nats)")
    ax.set_title("head 2 against the exact marginal: seeds (gray), mean and 95% t-interval", fontsize=8)
    return
  rows = result["rows"]
  names = [r["predictor"].replace(" (", "\n(").replace(", top", "\ntop") for r in rows]
  bars = ax.bar(range(len(rows)), [r["nll_t2"] for r in rows],
                color=["tab:blue" if r["k"] else "tab:orange" for r in rows])
  for b, r in zip(bars, rows):
    ax.annotate(f"acc {r['acc_t2']:.3f}, " + (f"+{r['extra_positions']} pos." if r["k"] else "0 extra"),
                (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=6)
  ax.set_xticks(range(len(rows)), names, fontsize=6)
  ax.set_ylabel("nll of x(t+2), nats (lower is better)")
  ax.set_title(f"x(t+2): marginalised n=1 (blue) vs MTP head 2 (orange), {result['positions']:,} positions "
               f"in {result['windows']} windows", fontsize=8)


def _frozen_heads(result, ax):
  kinds = [k for k in ("frozen", "joint", "n4") if k in result]
  width = 0.8 / len(kinds)
  for j, k in enumerate(kinds):
    acc = result[k]["head_acceptance"]
    ax.bar([i + j * width for i in range(len(acc))], acc, width,
           label=f"{k}: {result[k]['tokens_per_forward']:.2f} tok/fwd, {result[k]['speedup']:.2f}x")
  ax.set_xticks([i + 0.4 - width / 2 for i in range(len(result[kinds[0]]["head_acceptance"]))],
                [f"head {i + 1}" for i in range(len(result[kinds[0]]["head_acceptance"]))])
  ax.set_ylabel("validation acceptance")
  ax.set_title("heads on a pretrained n=1 trunk: frozen vs joint vs n=4 from scratch", fontsize=9)
  ax.legend(fontsize=7)


def _induction(result, ax):
  for n, style in ((1, "o-"), (2, "s-")):
    rows = [r for r in result["rows"] if r["n"] == n]
    sizes = sorted({r["params"] for r in rows})
    mean = lambda key: [np.mean([r[key] for r in rows if r["params"] == p]) for p in sizes]   # over model seeds
    line, = ax.plot(sizes, mean("induction_accuracy"), style, label=f"n={n}")
    if len(rows) > len(sizes):
      ax.plot([r["params"] for r in rows], [r["induction_accuracy"] for r in rows], style[0], color=line.get_color(),
              alpha=0.3, label=f"n={n}, each seed")
    ax.plot(sizes, mean("first_mention_accuracy"), style[0] + ":",
            color=line.get_color(), alpha=0.6, label=f"n={n}, first mentions (control)")
  ax.set_xscale("log")
  ax.set_ylim(0, 1)
  ax.set_xlabel("parameters")
  ax.set_ylabel("accuracy on a name's second byte")
  ax.set_title(f"induction on generated stories, {result['steps']} steps per model", fontsize=9)
  ax.legend(fontsize=7)


def _poly_arithmetic(result, ax):
  runs = {}
  for r in result["rows"]:   # several seeds: each run's mean over them
    runs.setdefault(r["run"], []).append(r["by_k"])
  for run, by_ks in runs.items():
    ks = [x["k"] for x in by_ks[0]]
    mean = lambda key: np.mean([[x[key] for x in by_k] for by_k in by_ks], axis=0)
    line, = ax.plot(ks, mean("coefficient_accuracy"), "o-", label=f"{run} coefficients")
    ax.plot(ks, mean("exact_match"), "s--", color=line.get_color(), label=f"{run} exact")
  ax.axvspan(result["train_ops"] + 0.5, result["test_ops"] + 0.5, color="gray", alpha=0.15, label="out of domain")
  ax.axhline(1 / 7, color="gray", lw=0.8)
  ax.set_ylim(0, 1)
  ax.set_xlabel("operations in the expression")
  ax.set_ylabel("test accuracy")
  ax.set_title(f"polynomial arithmetic in F_7[X]/(X^5), {result['steps']} steps per model", fontsize=9)
  ax.legend(fontsize=6, ncol=2)


PLOTTERS = {"memory": _memory, "poly_arithmetic": _poly_arithmetic, "induction": _induction, "speculative": _speculative, "paper_dry_run": _dry_run,
            "marginalisation": _marginalisation, "frozen_heads": _frozen_heads}


def plotter_for(name: str):
  for prefix in sorted(PLOTTERS, key=len, reverse=True):
    if name.startswith(prefix):
      return PLOTTERS[prefix]
  return None


def results_files() -> list:
  """Every committed results JSON: experiments/<group>/results/*.json."""
  return sorted(glob.glob(os.path.join(EXPERIMENTS, "*", "results", "*.json")))


def plot(name: str, result, results_dir: str):
  """Draw results_dir/<name>.png; returns its path, or None when no plotter knows the name."""
  fn = plotter_for(name)
  if fn is None:
    return None
  fig, ax = plt.subplots(figsize=(7, 4))
  fn(result, ax)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  path = os.path.join(results_dir, f"{name}.png")
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def main(names):
  for file in results_files():
    stem = os.path.basename(file)[:-5]
    if names and stem not in names:
      continue
    with open(file) as f:
      path = plot(stem, json.load(f), os.path.dirname(file))
    if path:
      print(f"wrote {path}")


if __name__ == "__main__":
  main(sys.argv[1:])
