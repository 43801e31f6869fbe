"""The paper's parallel heads against DeepSeek-V3's sequential MTP modules, at equal parameters, on the default corpus.

    python experiments/findings/sequential_vs_parallel.py --steps=600         # the README's run: 35 min on 2 CPU cores
    python experiments/findings/sequential_vs_parallel.py                     # the recipe's 2,000 steps: over 2 hours
    python experiments/findings/sequential_vs_parallel.py --quick             # smoke: configs/tiny.py:bytes, a few steps
    python experiments/findings/sequential_vs_parallel.py --steps=600 --out_name=head_topology \
        --runs=parallel:4,causal:4,linear:4,sequential:4             # the paper's appendix B head designs

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
position. Rerunning resumes or re-evaluates finished runs (workdirs under --root). Writes
experiments/findings/results/<out_name>.{md,json,png}.
"""
import json
import os
import sys
import time

from absl import app, flags

from mtp_jax.config import HEAD_TYPES
from parity_runs import decode_batch1, held_out_prompts, run_config
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # experiments/, for common/

from common.results_io import results_folder  # noqa: E402
from common.run_metrics import train_curve  # noqa: E402

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
                          "head_type:n_future per model (head types: parallel, causal, linear, sequential; n >= 2).")


def parse_runs(specs) -> list:
  """['parallel:4', ...] -> [('parallel', 4), ...]; one error line for anything else."""
  runs = []
  for spec in specs:
    head_type, _, n = spec.partition(":")
    if head_type not in HEAD_TYPES or not n.isdigit() or int(n) < 2:
      raise SystemExit(f"error: --runs={spec!r}: write head_type:n_future with head_type one of "
                       f"{', '.join(HEAD_TYPES)} and n_future >= 2, e.g. --runs=parallel:4,sequential:4")
    runs.append((head_type, int(n)))
  return runs


def name_of(head_type: str, n: int) -> str:
  return f"sequential_D{n - 1}" if head_type == "sequential" else f"{head_type}_n{n}"


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
  rows = []
  for head_type, n in parse_runs(_RUNS.value):
    name, config = name_of(head_type, n), run_config(head_type, n, _QUICK.value, _STEPS.value)
    workdir = os.path.join(_ROOT.value, name)
    t0 = time.time()
    final = train_and_evaluate(config, workdir)
    params, config, tokenizer = load_workdir(workdir)
    args = ModelArgs.from_config(config.model)
    steps, losses, seconds = train_curve(workdir, config.train.batch_size * config.data.seq_len)
    row = {"name": name, "head_type": head_type, "n_future": n, "params": param_counts(params)["params_total"],
           "valid_next_token_loss": final["head_losses"][0], "valid_head_losses": final["head_losses"],
           "train_seconds": seconds[-1], "curve": {"steps": steps, "loss": losses, "seconds": seconds},
           **decode_batch1(params, args, held_out_prompts(config, tokenizer, prompts_n, prompt_len),
                           _MAX_NEW.value, _REPEATS.value)}
    rows.append(row)
    print(f"{name}: valid next-token loss {row['valid_next_token_loss']:.4f}, speedup {row['speedup']:.2f}, "
          f"{row['tokens_per_forward']:.2f} tokens/forward, acceptance {row['acceptance']} "
          f"({time.time() - t0:.0f}s)", flush=True)

  device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
  recipe = "configs/tiny.py:bytes (quick)" if _QUICK.value else "configs/default.py"
  linear_note = " (linear heads are not layers: they add n x d^2, see params)" if any(
      r["head_type"] == "linear" for r in rows) else ""
  lines = [f"{' vs '.join(r['name'] for r in rows)}, {device}; {recipe} under parity{linear_note} "
           f"(train.steps={config.train.steps}, seed {config.seed}); decoding at batch 1 over {prompts_n} held-out "
           f"prompts of {prompt_len} tokens, {_MAX_NEW.value} new tokens each, EOS off, median of {_REPEATS.value}.", "",
           "| model | params | valid next-token loss | valid loss per head | train s | greedy tok/s | "
           "speculative tok/s | speedup | tokens/forward | acceptance t+2, t+3, ... | same as greedy |",
           "|---|---:|---:|---|---:|---:|---:|---:|---:|---|---|"]
  for r in rows:
    lines.append(f"| {r['name']} | {r['params']:,} | {r['valid_next_token_loss']:.4f} | "
                 f"{', '.join(f'{x:.3f}' for x in r['valid_head_losses'])} | {r['train_seconds']:.0f} | "
                 f"{r['greedy_tok_s']:.1f} | {r['speculative_tok_s']:.1f} | {r['speedup']:.2f} | "
                 f"{r['tokens_per_forward']:.2f} | {', '.join(f'{a:.2f}' for a in r['acceptance'])} | "
                 f"{'yes' if r['identical_to_greedy'] else 'NO'} |")
  lines += ["", "DeepSeek-V3 reports 85-90% acceptance of the second token (its one module, at 671B scale).",
            "", f"Command: `python experiments/findings/sequential_vs_parallel.py {' '.join(sys.argv[1:])}`",
            "", f"![curves]({out}.png)"]
  os.makedirs(_RESULTS.value, exist_ok=True)
  with open(os.path.join(_RESULTS.value, f"{out}.json"), "w") as f:
    json.dump({"device": device, "recipe": recipe, "rows": rows}, f, indent=2)
  with open(os.path.join(_RESULTS.value, f"{out}.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  plot(rows, os.path.join(_RESULTS.value, f"{out}.png"))
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
