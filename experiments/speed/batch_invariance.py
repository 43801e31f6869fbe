"""Bit-exact regardless of batch: greedy, chain, tree, bestfirst and auto (autotreeN: with a tree) decoding of the same held-out prompts at batch
1, 8 and 64, token for token against greedy at batch 1.

    python experiments/speed/batch_invariance.py --workdir=workdirs/default --prompts=512
    python experiments/speed/batch_invariance.py --quick      # random tiny model, 24 prompts (the CI smoke run)

Every batch size decodes every prompt in one call, `batch` rows at once, a finished row taking the next
prompt (continuous batching), with the tokenizer's EOS on, so rows finish at different steps, refill and
compact. Prompts are cut to lengths between half of --prompt_len and all of it, so they pad differently. A
row's tokens must not depend on which row it ran in, beside what, or after how many compactions: each row
attends to its own cache only, and greedy verification accepts a draft only where it is head 0's argmax. What
could still move a token is arithmetic: a matrix product whose summation order changes with the number of
rows (vLLM does not promise batch invariance for that reason). This script counts, per drafting scheme and
batch size, the prompts whose tokens equal greedy's at batch 1, and where the first difference falls.
Writes experiments/speed/results/<out_name>.{md,json}.
"""
import os
import sys
import time

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # experiments/, for common/

import jax  # noqa: E402
import numpy as np  # noqa: E402

from common import cli, drafts  # noqa: E402
from common.decode_models import tiny_drafting_model  # noqa: E402
from common.prompts import valid_split_prompts  # noqa: E402
from common.results_io import results_folder, write_results  # noqa: E402
from mtp_jax import decode  # noqa: E402
from mtp_jax.cpu_flags import cpu_model  # noqa: E402
from mtp_jax.model import ModelArgs  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "workdirs/default", "Trained run to decode with.")
_N_PROMPTS = flags.DEFINE_integer("prompts", 512, "Held-out prompts.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "Longest prompt in tokens (each is cut to a length in "
                                   "[prompt_len / 2, prompt_len]).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens generated per prompt at most (EOS on).")
_BATCHES = flags.DEFINE_list("batch_sizes", ["1", "8", "64"], "Rows decoded at once.")
_DRAFTS = flags.DEFINE_list("draft", ["chain", "tree", "bestfirst", "auto"], "Speculative drafting schemes beside "
                            "greedy.")
_AUTO_COSTS = flags.DEFINE_list("auto_costs", [], "auto / autotreeN: this cost table (C per budget: chains of "
                                 "0..n_future-1 drafts, then the tree, which auto without a tree leaves out) instead "
                                 "of the timed one, so that budgets this CPU's costs never choose are decoded too.")
_SEED = flags.DEFINE_integer("seed", 0, "Prompt selection seed.")
_QUICK = flags.DEFINE_bool("quick", False, "A random tiny model and 24 random prompts at batch 1 and 8; auto with "
                           "a fixed cost table and counts that fade fast (its budget falls and grows back often).")
_OUT_DIR = flags.DEFINE_string("out_dir", results_folder(__file__), "Results folder.")
_OUT = flags.DEFINE_string("out_name", "", "Results stem (default: batch_invariance[_quick]).")


def load(rng):
  """(params, args, prompts, eos id, where the weights and prompts came from)."""
  if _QUICK.value:
    params, config = tiny_drafting_model()
    prompts = [rng.integers(1, 48, rng.integers(4, 17)).tolist() for _ in range(24)]
    return params, ModelArgs.from_config(config.model), prompts, 0, "random init (heads copies of head 0), random tokens"
  from mtp_jax.generate import load_workdir
  params, config, tokenizer = load_workdir(_WORKDIR.value)
  prompts = valid_split_prompts(config, tokenizer, _N_PROMPTS.value, _PROMPT_LEN.value, rng)
  half = _PROMPT_LEN.value // 2
  prompts = [p[:int(rng.integers(half, _PROMPT_LEN.value + 1))] for p in prompts]
  return params, ModelArgs.from_config(config.model), prompts, tokenizer.eos_id, f"{_WORKDIR.value}, valid split"


def decode_all(params, args, prompts, mode: str, draft, batch: int, max_new: int, eos: int):
  """Every prompt in one call, `batch` rows at once: (tokens [N, max_new] PAD past each end, stats)."""
  tokens, lengths = decode.pad_prompts(prompts, max(map(len, prompts)))
  kw = {} if draft is None else drafts.draft_options(draft)
  tree = 1 if kw.get("tree_nodes") else 0   # autotreeN: one more budget, the tree
  if kw.get("draft") == "auto" and _QUICK.value:
    kw.update(draft_costs=[1.0, 1.05, 1.1, 1.15, 2.0][:4 + tree], draft_decay=0.5, draft_explore=3)
  elif kw.get("draft") == "auto" and _AUTO_COSTS.value:   # the chains' costs, then the tree's where it has one
    kw.update(draft_costs=[float(c) for c in _AUTO_COSTS.value][:args.n_future + tree])
  decode.run(params, args, tokens, lengths, mode=mode, max_new_tokens=max_new, eos_id=eos, slots=batch, **kw)
  out, timing = decode.run(params, args, tokens, lengths, mode=mode, max_new_tokens=max_new, eos_id=eos, slots=batch,
                           **kw)
  return np.asarray(out.tokens), {"wall_s": timing["wall_s"], "tokens": int(np.sum(out.lengths)),
                                  "tokens_per_forward": float(np.sum(out.lengths) / np.sum(out.forwards)),
                                  "budget_steps": np.asarray(out.budget_steps).tolist()}


def compare(ref: np.ndarray, got: np.ndarray) -> dict:
  """Prompts identical to the reference, and the first differing (prompt, position) if any."""
  same = np.all(ref == got, axis=1)
  first = None
  if not same.all():
    r = int(np.argmin(same))
    first = [r, int(np.argmax(ref[r] != got[r]))]
  return {"identical": int(same.sum()), "first_difference": first}


def main(_):
  rng = np.random.default_rng(_SEED.value)
  params, args, prompts, eos, source = load(rng)
  batches = [1, 8] if _QUICK.value else [int(b) for b in _BATCHES.value]
  max_new = 16 if _QUICK.value else _MAX_NEW.value
  for d in _DRAFTS.value:     # a bad --draft is one error line (cli.run) before anything compiles
    decode.Request("speculative", **drafts.draft_options(d), flag="--").check_model(args)
  device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
  if jax.devices()[0].platform == "cpu":
    device += f" ({cpu_model()})"
  schemes = [("greedy", None)] + [("speculative", d) for d in _DRAFTS.value]
  ref = None
  rows = []
  for mode, draft in schemes:
    for b in batches:
      t0 = time.time()
      toks, stats = decode_all(params, args, prompts, mode, draft, b, max_new, eos)
      ref = toks if ref is None else ref
      row = {"scheme": draft or mode, "batch": b, **stats, **compare(ref, toks)}
      rows.append(row)
      print(f"{row['scheme']:6s} batch {b:3d}: {row['identical']}/{len(prompts)} identical to greedy at batch "
            f"{batches[0]}, {stats['tokens_per_forward']:.2f} tokens/forward, steps per budget "
            f"{stats['budget_steps']} ({time.time() - t0:.0f}s)", flush=True)
  lens = sorted(map(len, prompts))
  result = {"device": device, "weights": source, "n_prompts": len(prompts), "prompt_lengths": [lens[0], lens[-1]],
            "max_new_tokens": max_new, "eos_id": eos, "rows": rows,
            "all_identical": all(r["identical"] == len(prompts) for r in rows)}
  lines = [f"Batch invariance, {device}; weights: {source}; {len(prompts)} prompts of {lens[0]}-{lens[-1]} tokens, "
           f"up to {max_new} new tokens each (EOS on); every batch size decodes every prompt in one call with "
           "continuous batching. Reference: greedy at batch " + str(batches[0]) + ".", "",
           "| scheme | batch | prompts identical to the reference | first difference (prompt, position) | "
           "tokens | tokens/forward | seconds |", "|---|---:|---:|---|---:|---:|---:|"]
  for r in rows:
    first = "none" if r["first_difference"] is None else f"{r['first_difference'][0]}, {r['first_difference'][1]}"
    lines.append(f"| {r['scheme']} | {r['batch']} | {r['identical']}/{len(prompts)} | {first} | {r['tokens']} | "
                 f"{r['tokens_per_forward']:.2f} | {r['wall_s']:.1f} |")
  lines += ["", f"All identical: {'yes' if result['all_identical'] else 'NO'}.", "",
            f"Command: `python experiments/speed/batch_invariance.py {' '.join(sys.argv[1:])}`"]
  write_results(_OUT.value or ("batch_invariance_quick" if _QUICK.value else "batch_invariance"), result, lines,
                _OUT_DIR.value)
  if not result["all_identical"]:
    sys.exit(1)


if __name__ == "__main__":
  cli.run(main)
