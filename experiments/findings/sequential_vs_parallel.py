"""The paper's parallel heads against DeepSeek-V3's sequential MTP modules, at equal parameters, on the default corpus.

    python experiments/findings/sequential_vs_parallel.py --steps=600         # the README's run: 35 min on 2 CPU cores
    python experiments/findings/sequential_vs_parallel.py                     # the recipe's 2,000 steps: over 2 hours
    python experiments/findings/sequential_vs_parallel.py --quick             # smoke: configs/tiny.py:bytes, a few steps
    python experiments/findings/sequential_vs_parallel.py --steps=600 --out_name=head_topology \
        --runs=parallel:4,causal:4,linear:4,sequential:4             # the paper's appendix B head designs
    python experiments/findings/sequential_vs_parallel.py --steps=600 --seeds=0,1,2 \
        --out_name=sequential_vs_parallel_seeds --runs=parallel:1,parallel:2,parallel:4,sequential:2,sequential:4,\
sequential:4:uniform,parallel:4:deepseek                             # 3 seeds, n=1, matched head weights both ways

Four models, each trained by the library's trainer from the same recipe (configs/default.py: bytes,
the Python standard library, 12 layers of width 128, 2,000 steps, seed 0) with transformer-layer
heads under parity, so every model has L = 12 layers and the n=1 parameter count (a sequential
module adds its eh_proj, 2d x d, and three norms: the exact counts are in the table):

    parallel n=2, parallel n=4     heads 2..n read the trunk output (Gloeckle et al. 2024)
    sequential D=1, sequential D=3 module k reads module k-1's state and Emb(t+k) (DeepSeek-V3, lambda 0.3)

Reported per model: the final validation next-token loss (head 1: what the model is for), each
head's validation loss, and at batch 1 over held-out prompts greedy vs self-speculative decoding:
tokens/s, speedup, tokens per forward pass and the acceptance of each draft position (a draft is
proposed only when the drafts before it were accepted; the rate is drafts accepted / forward passes).
Plots the training next-token loss per step and per wall-clock second, and the acceptance per
position.

Head weights: parallel heads average their losses (1/n each); DeepSeek-V3's modules add lambda/D each to
the main loss (lambda = 0.3). A run spec's third field swaps them, so that each topology can be compared
at the other's weights: `sequential:4:uniform` (lambda = D: every module weighs as much as the main
loss, the parallel average up to a constant factor, which Adam does not see) and `parallel:4:deepseek`
(head weights 1, 0.3/D, ..., 0.3/D). `parallel:1` is the next-token control.

With --seeds, every model trains once per seed (the seed sets the initialisation and the data order;
every model of one seed reads the same batches) and a summary gives per model the mean and 95%
t-interval over seeds of the next-token loss, its difference from parallel n=1 paired by seed, head 2's
loss and the second-token acceptance; then sequential against parallel paired by seed, at each's own
weights and at matched weights. A difference is called only where its interval excludes zero. Timed
decoding runs on the first seed's models; the acceptance of the other seeds comes from one untimed pass. Rerunning resumes or re-evaluates finished runs (workdirs under --root). Writes
experiments/findings/results/<out_name>.{md,json,png}.
"""
import json
import os
import sys
import time

from absl import app, flags

from mtp_jax.config import HEAD_TYPES
from parity_runs import chain_acceptance, decode_batch1, held_out_prompts, run_config
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # experiments/, for common/

from common.results_io import results_folder  # noqa: E402
from common.run_metrics import train_curve  # noqa: E402
from common.seed_stats import interval, mean_pm, separable  # noqa: E402

_QUICK = flags.DEFINE_bool("quick", False, "Smoke run: tiny model, a few steps, two short prompts.")
_ROOT = flags.DEFINE_string("root", "workdirs/sequential_vs_parallel", "Where the four runs' workdirs go.")
_STEPS = flags.DEFINE_integer("steps", 0, "Override train.steps (0: the recipe's).")
_PROMPTS = flags.DEFINE_integer("prompts", 8, "Held-out prompts decoded at batch 1.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "Tokens per prompt.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Tokens generated per prompt (EOS off).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed passes over the prompts per mode (after a warm-up).")
_OUT = flags.DEFINE_string("out_name", "", "Results stem (default: sequential_vs_parallel[_quick]).")
_RESULTS = flags.DEFINE_string("results_dir", results_folder(__file__), "Results folder.")

_RUNS = flags.DEFINE_list("runs", ["parallel:2", "parallel:4", "sequential:2", "sequential:4"],
                          "head_type:n_future[:weights] per model (head types: parallel, causal, linear, sequential; "
                          "n >= 2, or parallel:1 for the next-token control; weights: own, uniform or deepseek).")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds (init and data order); timed decoding on the first.")

WEIGHTS = ("own", "uniform", "deepseek")
DEEPSEEK_LAMBDA = 0.3


def parse_runs(specs) -> list:
  """['parallel:4', 'sequential:4:uniform', ...] -> [('parallel', 4, 'own'), ...]; one error line otherwise."""
  runs = []
  for spec in specs:
    head_type, n, weights = (spec.split(":") + ["own"])[:3] if spec.count(":") in (1, 2) else ("", "", "")
    ok = (head_type in HEAD_TYPES and n.isdigit() and weights in WEIGHTS
          and (int(n) >= 2 or (int(n) == 1 and head_type == "parallel" and weights == "own"))
          and not (weights == "uniform" and head_type != "sequential")
          and not (weights == "deepseek" and head_type == "sequential"))
    if not ok:
      raise SystemExit(f"error: --runs={spec!r}: write head_type:n_future[:weights] with head_type one of "
                       f"{', '.join(HEAD_TYPES)}, n_future >= 2 (parallel:1 for n=1), weights 'uniform' only for "
                       f"sequential and 'deepseek' only for the other types, e.g. --runs=parallel:4,sequential:4:uniform")
    runs.append((head_type, int(n), weights))
  return runs


def name_of(head_type: str, n: int, weights: str = "own") -> str:
  base = f"sequential_D{n - 1}" if head_type == "sequential" else f"{head_type}_n{n}"
  return base if weights == "own" else f"{base}_{weights}"


def apply_weights(config, weights: str) -> None:
  """Give a run the other topology's head weights (see the module docstring)."""
  n = config.model.n_future
  if weights == "uniform":
    config.loss.mtp_lambda = str(float(n - 1))
  elif weights == "deepseek":
    config.loss.head_weights = ",".join(["1"] + [repr(DEEPSEEK_LAMBDA / (n - 1))] * (n - 1))


def summary(rows, seeds) -> tuple:
  """Per model over seeds, and sequential vs parallel paired by seed (see the module docstring)."""
  by = {(r["name"], r["seed"]): r for r in rows}
  names = list(dict.fromkeys(r["name"] for r in rows))
  done = [s for s in seeds if all((m, s) in by for m in names)]
  control = "parallel_n1" if "parallel_n1" in names else None
  models = []
  for m in names:
    per = [by[(m, s)] for s in done]
    row = {"name": m, "seeds": done, "loss_per_seed": [r["valid_next_token_loss"] for r in per]}
    row["loss"] = interval(row["loss_per_seed"])
    if control and m != control:
      row["diff_n1_per_seed"] = [r["valid_next_token_loss"] - by[(control, s)]["valid_next_token_loss"]
                                 for r, s in zip(per, done)]
      row["diff_n1"] = interval(row["diff_n1_per_seed"])
    if per[0]["n_future"] > 1:
      row["head2_loss"] = interval([r["valid_head_losses"][1] for r in per])
      row["acceptance_t2_per_seed"] = [r["acceptance"][0] for r in per]
      row["acceptance_t2"] = interval(row["acceptance_t2_per_seed"])
    models.append(row)
  pairs = []
  for m in names:
    first = by[(m, done[0])]
    n, weights = first["n_future"], first["weights"]
    if first["head_type"] != "sequential":
      continue
    for pw in ("own", "deepseek"):
      p = name_of("parallel", n, pw)
      if p not in names or (weights == "uniform" and pw == "deepseek"):
        continue             # own with own, and each side at the other's weights; both swapped is no pair
      pair = {"sequential": m, "parallel": p, "weights": "sequential's" if pw == "deepseek" else
              "parallel's" if weights == "uniform" else "each its own"}
      for key, get in (("next_token", lambda r: r["valid_next_token_loss"]),
                       ("head2", lambda r: r["valid_head_losses"][1])):
        d = [get(by[(m, s)]) - get(by[(p, s)]) for s in done]
        pair[key + "_per_seed"], pair[key] = d, interval(d)
      pairs.append(pair)
  return models, pairs


def summary_lines(models, pairs, steps) -> list:
  def verdict(mean, half, lower_wins, higher_wins):
    return (lower_wins if mean < 0 else higher_wins) if separable(mean, half) else "not separable at this budget"
  seeds = models[0]["seeds"]
  lines = [f"**{steps} steps, seeds {', '.join(map(str, seeds))}**: mean ± 95% t-interval over seeds; differences "
           "are paired by seed (every model of a seed reads the same batches).", "",
           "| model | valid next-token loss | per seed | minus n=1 | verdict vs n=1 | head 2 loss | "
           "acceptance t+2 | per seed |", "|---|---:|---|---:|---|---:|---:|---|"]
  for r in models:
    per = ", ".join(f"{x:.4f}" for x in r["loss_per_seed"])
    diff = (mean_pm(*r["diff_n1"], sign=True), verdict(*r["diff_n1"], "better than n=1", "n=1 better")) \
        if "diff_n1" in r else ("(control)", "")
    acc = (mean_pm(*r["head2_loss"], digits=3), mean_pm(*r["acceptance_t2"], digits=3),
           ", ".join(f"{x:.3f}" for x in r["acceptance_t2_per_seed"])) if "head2_loss" in r else ("", "", "")
    lines.append(f"| {r['name']} | {mean_pm(*r['loss'])} | {per} | {diff[0]} | {diff[1]} | {' | '.join(acc)} |")
  lines += ["", "Sequential minus parallel, paired by seed (negative: sequential lower):", "",
            "| sequential | parallel | head weights | next-token loss | head 2 loss | verdict (next token) |",
            "|---|---|---|---:|---:|---|"]
  for p in pairs:
    lines.append(f"| {p['sequential']} | {p['parallel']} | {p['weights']} | {mean_pm(*p['next_token'], sign=True)} | "
                 f"{mean_pm(*p['head2'], sign=True)} | "
                 f"{verdict(*p['next_token'], 'sequential better', 'parallel better')} |")
  return lines + [""]


def plot(rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for r in rows:
    axes[0].plot(r["curve"]["steps"], r["curve"]["loss"], label=r["name"])
    axes[1].plot(r["curve"]["seconds"], r["curve"]["loss"], label=r["name"])
    axes[2].plot(range(2, len(r["acceptance"]) + 2), r["acceptance"], marker="o", label=r["name"])
  axes[0].set(xlabel="step", ylabel="train next-token loss (nats)", title="per step")
  axes[1].set(xlabel="train seconds", ylabel="train next-token loss (nats)", title="per wall-clock second")
  axes[2].set(xlabel="draft position (token t+i)", ylabel="acceptance", title="acceptance at batch 1", ylim=(0, 1))
  for ax in axes:
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(_):
  import jax
  from mtp_jax.dry_run import param_counts
  from mtp_jax.generate import load_workdir
  from mtp_jax.model import ModelArgs
  from mtp_jax.train import train_and_evaluate

  out = _OUT.value or ("sequential_vs_parallel_quick" if _QUICK.value else "sequential_vs_parallel")
  prompts_n, prompt_len = (2, 16) if _QUICK.value else (_PROMPTS.value, _PROMPT_LEN.value)
  runs = parse_runs(_RUNS.value)
  if not all(x.isdigit() for x in _SEEDS.value):
    raise SystemExit(f"error: --seeds={','.join(_SEEDS.value)}: write non-negative integers, e.g. --seeds=0,1,2")
  seeds = [int(x) for x in _SEEDS.value]
  rows = []
  for seed in seeds:                       # seed-major: a stopped batch keeps whole seeds
    for head_type, n, weights in runs:
      name, config = name_of(head_type, n, weights), run_config(head_type, n, _QUICK.value, _STEPS.value)
      config.seed = seed
      apply_weights(config, weights)
      workdir = os.path.join(_ROOT.value, name + (f"_seed{seed}" if seed else ""))
      t0 = time.time()
      final = train_and_evaluate(config, workdir)
      if final is None:   # stopped by a signal: the checkpoint is saved, the table would be partial
        raise SystemExit(f"stopped while training {workdir}; rerun the same command to resume")
      params, config, tokenizer = load_workdir(workdir)
      args = ModelArgs.from_config(config.model)
      steps, losses, seconds = train_curve(workdir, config.train.batch_size * config.data.seq_len)
      row = {"name": name, "seed": seed, "head_type": head_type, "n_future": n, "weights": weights,
             "params": param_counts(params)["params_total"],
             "valid_next_token_loss": final["head_losses"][0], "valid_head_losses": final["head_losses"],
             "train_seconds": seconds[-1], "curve": {"steps": steps, "loss": losses, "seconds": seconds}}
      prompts = held_out_prompts(config, tokenizer, prompts_n, prompt_len)
      if n == 1:
        row.update(tokens_per_forward=1.0, acceptance=[], speedup=1.0, identical_to_greedy=True)
      elif seed == seeds[0]:
        row.update(decode_batch1(params, args, prompts, _MAX_NEW.value, _REPEATS.value))
      else:
        row.update(chain_acceptance(params, args, prompts, _MAX_NEW.value))
      rows.append(row)
      print(f"{name} seed {seed}: valid next-token loss {row['valid_next_token_loss']:.4f}, "
            f"{row['tokens_per_forward']:.2f} tokens/forward, acceptance {row['acceptance']} "
            f"({time.time() - t0:.0f}s)", flush=True)

  device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
  recipe = "configs/tiny.py:bytes (quick)" if _QUICK.value else "configs/default.py"
  linear_note = " (linear heads are not layers: they add n x d^2, see params)" if any(
      r["head_type"] == "linear" for r in rows) else ""
  models, pairs = summary(rows, seeds) if len(seeds) > 1 else ([], [])
  all_rows, rows = rows, [r for r in rows if r["seed"] == seeds[0]]
  lines = [f"{' vs '.join(r['name'] for r in rows)}, {device}; {recipe} under parity{linear_note} "
           f"(train.steps={config.train.steps}, seeds {', '.join(map(str, seeds))}); decoding at batch 1 over {prompts_n} held-out "
           f"prompts of {prompt_len} tokens, {_MAX_NEW.value} new tokens each, EOS off, median of {_REPEATS.value}.", "",
           *(summary_lines(models, pairs, config.train.steps) if models else []),
           f"Seed {seeds[0]}, every model:", "",
           "| model | params | valid next-token loss | valid loss per head | train s | greedy tok/s | "
           "speculative tok/s | speedup | tokens/forward | acceptance t+2, t+3, ... | same as greedy |",
           "|---|---:|---:|---|---:|---:|---:|---:|---:|---|---|"]
  for r in rows:
    if r["n_future"] == 1:
      lines.append(f"| {r['name']} | {r['params']:,} | {r['valid_next_token_loss']:.4f} | "
                   f"{r['valid_head_losses'][0]:.3f} | {r['train_seconds']:.0f} | | | | 1.00 | | (decodes greedily) |")
      continue
    lines.append(f"| {r['name']} | {r['params']:,} | {r['valid_next_token_loss']:.4f} | "
                 f"{', '.join(f'{x:.3f}' for x in r['valid_head_losses'])} | {r['train_seconds']:.0f} | "
                 f"{r['greedy_tok_s']:.1f} | {r['speculative_tok_s']:.1f} | {r['speedup']:.2f} | "
                 f"{r['tokens_per_forward']:.2f} | {', '.join(f'{a:.2f}' for a in r['acceptance'])} | "
                 f"{'yes' if r['identical_to_greedy'] else 'NO'} |")
  lines += ["", "DeepSeek-V3 reports 85-90% acceptance of the second token (its one module, at 671B scale); "
            "a row here is compared with it, not called a reproduction.",
            "", f"Command: `python experiments/findings/sequential_vs_parallel.py {' '.join(sys.argv[1:])}`",
            "", f"![curves]({out}.png)"]
  os.makedirs(_RESULTS.value, exist_ok=True)
  with open(os.path.join(_RESULTS.value, f"{out}.json"), "w") as f:
    json.dump({"device": device, "recipe": recipe, "seeds": seeds, "models": models, "pairs": pairs,
               "rows": all_rows}, f, indent=2)
  with open(os.path.join(_RESULTS.value, f"{out}.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  plot(rows, os.path.join(_RESULTS.value, f"{out}.png"))
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
