"""How many heads (Gloeckle et al. 2024, sections 3.3-3.4): n in {1, 2, 4, 8} at parameter parity, on bytes and on pieces.

    python experiments/findings/n_sweep.py --steps=600 --sp_steps=400   # the README's run: 8 models, about an hour on 2 CPU cores
    python experiments/findings/n_sweep.py --recipes=bytes --ns=1,2,4 --seeds=0,1,2 --steps=600   # 3 seeds: mean and 95% interval
    python experiments/findings/n_sweep.py --quick                      # smoke: configs/tiny.py, n in {1, 4}, a few steps

Two recipes, each trained by the library's trainer from the same seed on the same batches (the
data order depends only on the seed, so every n sees the same tokens):
    bytes   configs/default.py     (258 ids, 12 layers of width 128)
    sp      configs/default.py:sp  (2,048 sentencepiece pieces, width 256) with 10 layers, so that at n = 8
                                   the trunk keeps 2 (MIN_TRUNK; the recipe's own trunk at n = 4)
Every model has parallel transformer heads under parity: L layers in all, the trunk's L - n plus one
per head, so each n has n=1's parameter count (the table gives it). Reported per model: validation
next-token loss, bits per byte and top-1 accuracy, every head's loss, the train loss at the fastest
run's wall-clock (per-second comparison) and, at batch 1 over held-out prompts, self-speculative
tokens per forward pass, acceptance and speedup over greedy (output checked identical). n=8 against
n=1 on bytes is the paper's section 3.3 comparison. Rerunning resumes or re-evaluates finished runs;
the bytes runs share workdirs with experiments/findings/sequential_vs_parallel.py (parallel_n4 is the same
model). With --seeds, every n trains once per seed (the seed sets the initialisation and the data order; all
n of one seed read the same batches) and a summary table gives, per n, the mean next-token loss with its 95%
t-interval over seeds and the paired difference from n=1 with its interval; "reproduced" only where that
interval excludes zero in the paper's direction at this size (n > 1 scores worse than n=1, Figure 3), else
"not separable at this budget". Decoding is measured on the first seed's models only. Writes
experiments/findings/results/n_sweep.{md,json,png} (n_sweep_seeds.* with more than one seed).
"""
import math
import os
import sys
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # experiments/, for common/

from common.seed_stats import interval, separable  # noqa: E402
from common.results_io import results_folder, write_results  # noqa: E402
from common.run_metrics import train_curve  # noqa: E402
from parity_runs import decode_batch1, held_out_prompts, run_config  # noqa: E402

RECIPES = {"bytes": None, "sp": "sp"}      # name -> configs/default.py variant
PAPER = ("Paper (Gloeckle et al. 2024): at 7B parameters, n=4 is best with a 32k-token vocabulary (200B tokens of "
         "code, Table 1) and n=8 with bytes (314B bytes), whose 8 heads decode 6.4x faster self-speculatively "
         "(section 3.3); at 0.3-1B parameters MTP scores below next-token prediction (section 3.1, Figure 3).")


MIN_TRUNK = 2    # layers the trunk keeps at the largest n (the sp recipe's own trunk at n = 4)


def verdict(mean: float, half: float) -> str:
  """The paper's direction at this size: n > 1 scores a worse (higher) next-token loss than n=1."""
  if not separable(mean, half):
    return "not separable at this budget"
  return "reproduced (n=1 better)" if mean > 0 else "not reproduced: n>1 better"


def sweep_config(recipe: str, n: int, max_n: int, quick: bool, steps: int, seed: int = 0):
  c = run_config("parallel", n, quick, steps, RECIPES[recipe])
  c.seed = seed
  c.model.n_layers = max(c.model.n_layers, max_n + MIN_TRUNK)    # one depth L for the whole sweep
  return c


def tokens_per_byte(config, tokenizer) -> float:
  """Tokens per UTF-8 byte over the validation split: nats per token x this / ln 2 = bits per byte."""
  import ml_collections
  from mtp_jax import data
  cfg = ml_collections.ConfigDict(config.data.to_dict())
  cfg.max_train_bytes = 0
  n_tokens = n_bytes = 0
  for text in data.Corpus(cfg).texts("valid"):
    n_tokens += len(tokenizer.encode(text))
    n_bytes += len(text.encode("utf-8"))
  return n_tokens / n_bytes


def loss_at(curve: dict, seconds: float) -> float:
  """The train next-token loss after `seconds` of training (linear between logged steps)."""
  return float(np.interp(seconds, curve["seconds"], curve["loss"]))


def run_one(recipe, n, max_n, a, root, prompts_n, prompt_len, seed=0, decode=True) -> dict:
  from mtp_jax.dry_run import param_counts
  from mtp_jax.generate import load_workdir
  from mtp_jax.model import ModelArgs
  from mtp_jax.train import train_and_evaluate
  config = sweep_config(recipe, n, max_n, a.quick, a.sp_steps if recipe == "sp" and a.sp_steps else a.steps, seed)
  workdir = os.path.join(root, (f"parallel_n{n}" if recipe == "bytes" else f"{recipe}_L{config.model.n_layers}_n{n}")
                         + (f"_seed{seed}" if seed else ""))
  began = time.time()
  final = train_and_evaluate(config, workdir)
  if final is None:   # stopped by a signal: the checkpoint is saved, the table would be partial
    raise SystemExit(f"stopped while training {workdir}; rerun the same command to resume")
  params, config, tokenizer = load_workdir(workdir)
  steps, losses, seconds = train_curve(workdir, config.train.batch_size * config.data.seq_len)
  tpb = tokens_per_byte(config, tokenizer)
  row = {"recipe": recipe, "n": n, "seed": seed, "n_layers": config.model.n_layers, "params": param_counts(params)["params_total"],
         "steps": final["step"], "valid_next_token_loss": final["head_losses"][0],
         "bits_per_byte": final["head_losses"][0] * tpb / math.log(2), "tokens_per_byte": tpb,
         "valid_accuracy": final["head_accuracies"][0], "valid_head_losses": final["head_losses"],
         "train_seconds": seconds[-1], "curve": {"steps": steps, "loss": losses, "seconds": seconds}}
  if n > 1 and decode:
    prompts = held_out_prompts(config, tokenizer, prompts_n, prompt_len)
    row.update(decode_batch1(params, ModelArgs.from_config(config.model), prompts, a.max_new_tokens, a.repeats))
  row["wall_seconds"] = round(time.time() - began, 1)     # training, evaluation and decoding
  print(f"{recipe} n={n} seed={seed}: valid next-token loss {row['valid_next_token_loss']:.4f} "
        f"({row['bits_per_byte']:.3f} bits/byte), speedup {row.get('speedup', 1.0):.2f} "
        f"({time.time() - began:.0f}s)", flush=True)
  return row


def summary(rows, recipe, ns, seeds) -> list:
  """Per n: the next-token loss over seeds and its paired difference from n=1 (same seed, same batches)."""
  by = {(r["n"], r["seed"]): r["valid_next_token_loss"] for r in rows if r["recipe"] == recipe}
  done = [s for s in seeds if all((n, s) in by for n in ns)]
  out = []
  for n in ns:
    vals = [by[(n, s)] for s in done]
    m, h = interval(vals)
    row = {"recipe": recipe, "n": n, "seeds": done, "per_seed": vals, "mean": m, "ci95": h}
    if n != 1 and 1 in ns:
      d = [by[(n, s)] - by[(1, s)] for s in done]
      dm, dh = interval(d)
      row.update(diff_per_seed=d, diff_mean=dm, diff_ci95=dh, verdict=verdict(dm, dh))
    out.append(row)
  return out


def summary_table(summ, steps) -> list:
  pm = lambda m, h: f"{m:.4f}" if math.isnan(h) else f"{m:.4f} ± {h:.4f}"
  lines = [f"**{summ[0]['recipe']}**, {steps} steps, seeds {', '.join(map(str, summ[0]['seeds']))} (mean ± 95% t-interval "
           "over seeds; the difference is paired by seed: the same batches for every n):", "",
           "| n | valid next-token loss | per seed | n - (n=1) | per seed | paper at this size | verdict |",
           "|---:|---:|---|---:|---|---|---|"]
  for r in summ:
    per = ", ".join(f"{x:.4f}" for x in r["per_seed"])
    if r["n"] == 1:
      lines.append(f"| 1 | {pm(r['mean'], r['ci95'])} | {per} | (control) | | | |")
    else:
      lines.append(f"| {r['n']} | {pm(r['mean'], r['ci95'])} | {per} | {r['diff_mean']:+.4f}"
                   + ("" if math.isnan(r["diff_ci95"]) else f" ± {r['diff_ci95']:.4f}")
                   + f" | {', '.join(f'{x:+.4f}' for x in r['diff_per_seed'])} | n=1 better below 1B (Fig. 3) | {r['verdict']} |")
  return lines + [""]


def table(rows, recipe) -> list:
  rows = [r for r in rows if r["recipe"] == recipe]
  budget = min(r["train_seconds"] for r in rows)
  lines = [f"**{recipe}** ({rows[0]['steps']} steps, {rows[0]['n_layers']} layers in every model; train loss at {budget:.0f} s = the fastest run's "
           f"training time):", "",
           "| n | params | valid next-token loss | bits/byte | top-1 acc | valid loss per head | train s | "
           f"train loss at {budget:.0f} s | tokens/forward | speedup | acceptance t+2, t+3, ... | same as greedy |",
           "|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|---|"]
  for r in rows:
    spec = ("1.00 | 1.00 | | (n=1 decodes greedily)" if r["n"] == 1 else "| | | (not decoded)" if "speedup" not in r else
            f"{r['tokens_per_forward']:.2f} | {r['speedup']:.2f} | {', '.join(f'{x:.2f}' for x in r['acceptance'])} | "
            f"{'yes' if r['identical_to_greedy'] else 'NO'}")
    lines.append(f"| {r['n']} | {r['params']:,} | {r['valid_next_token_loss']:.4f} | {r['bits_per_byte']:.3f} | "
                 f"{r['valid_accuracy']:.3f} | {', '.join(f'{x:.3f}' for x in r['valid_head_losses'])} | "
                 f"{r['train_seconds']:.0f} | {loss_at(r['curve'], budget):.4f} | {spec} |")
  return lines + [""]


def plot(rows, recipes, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(len(recipes), 3, figsize=(15, 4 * len(recipes)), squeeze=False)
  for ax_row, recipe in zip(axes, recipes):
    for r in (r for r in rows if r["recipe"] == recipe):
      label = f"n={r['n']}" + (f" seed {r['seed']}" if r.get("seed") else "")
      ax_row[0].plot(r["curve"]["steps"], r["curve"]["loss"], label=label)
      ax_row[1].plot(r["curve"]["seconds"], r["curve"]["loss"], label=label)
      ax_row[2].plot(range(1, r["n"] + 1), r["valid_head_losses"], marker="o", label=label)
    ax_row[0].set(xlabel="step", ylabel="train next-token loss (nats)", title=f"{recipe}: per step")
    ax_row[1].set(xlabel="train seconds", ylabel="train next-token loss (nats)", title=f"{recipe}: per wall-clock second")
    ax_row[2].set(xlabel="head i (predicts t+i)", ylabel="valid loss (nats)", title=f"{recipe}: every head")
    for ax in ax_row:
      ax.legend()
      ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def define_flags():
  """The flags (defined when run as a script, so tests can import this module)."""
  flags.DEFINE_bool("quick", False, "toy model and steps: checks the pipeline, measures nothing")
  flags.DEFINE_integer("steps", 0, "train steps per model (0: the recipe's; quick: 4)")
  flags.DEFINE_integer("sp_steps", 0, "train steps of the sp models (0: as --steps)")
  flags.DEFINE_string("ns", "1,2,4,8", "comma list of head counts (quick: 1,4)")
  flags.DEFINE_string("recipes", "bytes,sp", f"comma list among {', '.join(RECIPES)}")
  flags.DEFINE_string("root", None, "workdirs (default workdirs/sequential_vs_parallel, shared with it)")
  flags.DEFINE_string("out_dir", results_folder(__file__), "results directory")
  flags.DEFINE_integer("prompts", 8, "held-out prompts decoded at batch 1")
  flags.DEFINE_integer("prompt_len", 64, "tokens per prompt")
  flags.DEFINE_integer("max_new_tokens", 128, "tokens generated per prompt (EOS off)")
  flags.DEFINE_integer("repeats", 3, "timed passes over the prompts per mode")
  flags.DEFINE_string("seeds", "0", "comma list of seeds (init and data order); decoding uses the first")


def main(_):
  a = flags.FLAGS
  recipes = a.recipes.split(",")
  if any(r not in RECIPES for r in recipes) or not all(x.isdigit() and int(x) >= 1 for x in a.ns.split(",")):
    raise SystemExit(f"error: --recipes={a.recipes} --ns={a.ns}: recipes are among {', '.join(RECIPES)}, "
                     f"ns are positive integers, e.g. --recipes=bytes,sp --ns=1,2,4,8")
  ns = [1, 4] if a.quick else sorted({int(x) for x in a.ns.split(",")})
  seeds = [int(x) for x in a.seeds.split(",")]
  if a.quick:
    a.steps, a.max_new_tokens, a.repeats = 4, 8, 1
  prompts_n, prompt_len = (2, 16) if a.quick else (a.prompts, a.prompt_len)
  name = ("n_sweep_seeds" if len(seeds) > 1 else "n_sweep") + ("_quick" if a.quick else "")
  root = os.path.abspath(a.root or os.path.join("workdirs", "n_sweep_quick" if a.quick else "sequential_vs_parallel"))

  import jax
  rows = [run_one(recipe, n, max(ns), a, root, prompts_n, prompt_len, seed, decode=seed == seeds[0])
          for seed in seeds for recipe in recipes for n in ns]      # seed-major: a stopped sweep keeps whole seeds
  device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
  md = [f"# Heads n at parameter parity{' (quick: toy sizes, not a measurement)' if a.quick else ''}", "",
        f"Command: `python experiments/findings/n_sweep.py {' '.join(sys.argv[1:])}`; {device}; parallel transformer heads "
        f"under parity, seeds {', '.join(map(str, seeds))}, the recipe's batches (steps per recipe below). Validation: the recipe's "
        f"eval batches (next-token loss, top-1 accuracy; bits/byte = nats per token x tokens per byte of the "
        f"validation text / ln 2). Decoding at batch 1 over {prompts_n} held-out prompts of {prompt_len} tokens, "
        f"{a.max_new_tokens} new tokens each, EOS off, median of {a.repeats}. Wall-clock of this invocation "
        f"(training, evaluation and decoding of the runs it did not find finished): "
        f"{sum(r['wall_seconds'] for r in rows) / 60:.0f} min.", ""]
  summaries = []
  for recipe in recipes:
    if len(seeds) > 1:
      summ = summary(rows, recipe, ns, seeds)
      summaries += summ
      md += summary_table(summ, rows[[r["recipe"] for r in rows].index(recipe)]["steps"])
    md += table([r for r in rows if r["seed"] == seeds[0]], recipe)
  md += [PAPER, "", f"![n sweep]({name}.png)"]
  write_results(name, {"quick": a.quick, "device": device, "ns": ns, "recipes": recipes, "seeds": seeds,
                       "summary": summaries, "rows": rows}, md, a.out_dir)
  plot(rows, recipes, os.path.join(a.out_dir, f"{name}.png"))


if __name__ == "__main__":
  define_flags()
  app.run(main)
