"""Where in a generation drafts are accepted: tokens per forward by position, and in repeated text against fresh.

    python experiments/speed/acceptance_by_position.py --workdir=workdirs/default      # about 1 min
    python experiments/speed/acceptance_by_position.py --quick --out_dir=/tmp/x         # random toy model (a test)

Tokens per forward on held-out prompts depends on how long the generations run: a small model's long
greedy generation falls into loops that its heads predict well. This script measures that directly. It
decodes `--prompts` held-out prompts greedily (`--prompt_len` tokens, `--max_new_tokens` new, EOS off), and
decodes them again speculatively with a chain of every draft head. The forward passes of the two must agree
with the replay below (a check, not a result).

Each generation's chain is replayed on the finished sequence (`mtp_jax.draft_trace`, exact for greedy
output), so every verify step is known by where it starts and how many tokens it emits. Steps are grouped by
where they start (`--bucket` new tokens a group) and by whether they start inside a repeat. A token is in a
repeat when the `--ngram` tokens ending at it already occurred earlier in the prompt or the generation.
A group's tokens per forward = the tokens its steps emitted / its steps. The prefill's token is left out.
Writes experiments/speed/results/<out_name>.{md,json}.
"""
import os
import sys
import time

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # experiments/, for common/

import jax  # noqa: E402
import numpy as np  # noqa: E402

from common import cli  # noqa: E402
from common.decode_models import tiny_drafting_model  # noqa: E402
from common.prompts import valid_split_prompts  # noqa: E402
from common.results_io import results_folder, write_results  # noqa: E402
from mtp_jax.errors import exit_with  # noqa: E402
from mtp_jax import decode  # noqa: E402
from mtp_jax.cpu_flags import cpu_model  # noqa: E402
from mtp_jax.draft_trace import draft_trace, in_repeats  # noqa: E402
from mtp_jax.model import ModelArgs  # noqa: E402
from mtp_jax.workdir import read_draft_vocab  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "workdirs/default", "Trained run to decode with.")
_N_PROMPTS = flags.DEFINE_integer("prompts", 64, "Held-out prompts.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "Tokens per prompt.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "Tokens generated per prompt (EOS off).")
_BUCKET = flags.DEFINE_integer("bucket", 32, "New tokens per group of positions.")
_NGRAM = flags.DEFINE_integer("ngram", 8, "A token is in a repeat when the n tokens ending at it occurred before.")
_SEED = flags.DEFINE_integer("seed", 0, "Prompt selection seed.")
_DRAFT_VOCAB = flags.DEFINE_integer("draft_vocab", 0, "Drafts choose among the N most frequent tokens of "
                                    "<workdir>/draft_vocab.npy, in the decode loop and the replay; 0: the whole vocabulary.")
_QUICK = flags.DEFINE_bool("quick", False, "A random tiny model (heads copies of head 0) and 8 random prompts.")
_OUT_DIR = flags.DEFINE_string("out_dir", results_folder(__file__), "Results folder.")
_OUT = flags.DEFINE_string("out_name", "", "Results stem (default: acceptance_by_position[_quick]).")


def load(rng):
  """(params, config, prompts, where the weights and prompts came from)."""
  if _QUICK.value:
    params, config = tiny_drafting_model()
    prompts = [rng.integers(1, 48, 8).tolist() for _ in range(8)]
    return params, config, prompts, "random init (heads copies of head 0), random tokens"
  from mtp_jax.generate import load_workdir
  params, config, tokenizer = load_workdir(_WORKDIR.value)
  prompts = valid_split_prompts(config, tokenizer, _N_PROMPTS.value, _PROMPT_LEN.value, rng)
  return params, config, prompts, f"{_WORKDIR.value}, valid split"


def step_table(params, config, prompts, generations, ngram: int):
  """Every verify step of every generation: (start index in the generation, tokens emitted, starts in a repeat),
  and the replay's forward passes per generation."""
  steps, forwards = [], []
  for prompt, new in zip(prompts, generations):
    trace = draft_trace(params, config, prompt, new)
    forwards.append(trace["forward_passes"])
    rep = in_repeats(list(prompt) + list(new), len(prompt), ngram)
    steps += [(i, n, bool(rep[i])) for i, n in trace["steps"]]
  return np.asarray(steps, np.int64), forwards


def summarize(steps: np.ndarray, bucket: int, max_new: int) -> dict:
  """Tokens per forward of the steps [S, 3] by position group and by whether a step starts in a repeat."""
  groups = []
  for lo in range(0, max_new, bucket):
    sel = (steps[:, 0] >= lo) & (steps[:, 0] < lo + bucket)
    if sel.any():
      groups.append({"from": lo, "to": min(lo + bucket, max_new), "steps": int(sel.sum()),
                     "tokens_per_forward": float(steps[sel, 1].mean()), "in_repeat": float(steps[sel, 2].mean())})
  kinds = {}
  for name, sel in (("in a repeat", steps[:, 2] == 1), ("fresh", steps[:, 2] == 0), ("all", steps[:, 2] >= 0)):
    if sel.any():
      kinds[name] = {"steps": int(sel.sum()), "tokens_per_forward": float(steps[sel, 1].mean())}
  return {"by_position": groups, "by_kind": kinds}


def main(_):
  rng = np.random.default_rng(_SEED.value)
  params, config, prompts, source = load(rng)
  args = ModelArgs.from_config(config.model)
  if args.n_future < 2:
    exit_with(f"{_WORKDIR.value} has no draft heads (model.n_future={args.n_future}): nothing to accept")
  vocab = None
  if _DRAFT_VOCAB.value:
    if _QUICK.value:
      exit_with("--draft_vocab reads the ranking a workdir holds; it does not go with --quick")
    vocab = read_draft_vocab(_WORKDIR.value, _DRAFT_VOCAB.value)
    params = decode.with_draft_vocab(params, vocab, args.vocab_size)
  max_new = 24 if _QUICK.value else _MAX_NEW.value
  bucket = 8 if _QUICK.value else _BUCKET.value
  if bucket < 1 or _NGRAM.value < 1:
    exit_with(f"--bucket={bucket} and --ngram={_NGRAM.value} must be positive")
  if max_new < 2:
    exit_with(f"--max_new_tokens={max_new}: the prefill emits the first token, so verify steps need 2 or more")
  t0 = time.time()
  tokens, lengths = decode.pad_prompts(prompts, max(map(len, prompts)))
  kw = dict(max_new_tokens=max_new, eos_id=-1)
  greedy, _ = decode.run(params, args, tokens, lengths, mode="greedy", **kw)
  spec, _ = decode.run(params, args, tokens, lengths, mode="speculative", draft="chain", **kw)
  if not np.array_equal(np.asarray(greedy.tokens), np.asarray(spec.tokens)):
    exit_with("speculative decoding differs from greedy: a bug; report it")
  generations = [np.asarray(greedy.tokens)[r, :max_new].tolist() for r in range(len(prompts))]
  steps, forwards = step_table(params, config, prompts, generations, _NGRAM.value)
  if forwards != np.asarray(spec.forwards).tolist():
    exit_with("the replay's forward passes differ from the decode loop's: a bug; report it")
  summary = summarize(steps, bucket, max_new)
  device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
  if jax.devices()[0].platform == "cpu":
    device += f" ({cpu_model()})"
  whole = float(sum(map(len, generations)) / sum(forwards))
  per_prompt = np.asarray([len(g) / f for g, f in zip(generations, forwards)])
  spread = {"min": float(per_prompt.min()), "p25": float(np.percentile(per_prompt, 25)),
            "median": float(np.median(per_prompt)), "p75": float(np.percentile(per_prompt, 75)),
            "max": float(per_prompt.max()), "mean": float(per_prompt.mean()),
            "sem": float(per_prompt.std(ddof=1) / np.sqrt(len(per_prompt))) if len(per_prompt) > 1 else 0.0}
  result = {"device": device, "weights": source, "n_prompts": len(prompts), "prompt_len": len(prompts[0]),
            "max_new_tokens": max_new, "bucket": bucket, "ngram": _NGRAM.value, "n_future": args.n_future,
            "head_type": args.head_type, "draft_vocab": _DRAFT_VOCAB.value,
            "tokens_per_forward_with_prefill": whole,
            "per_prompt": spread, "per_prompt_values": per_prompt.tolist(), **summary, "wall_s": time.time() - t0}
  lines = [f"Tokens per forward by position in the generation; {device}; weights: {source}; {len(prompts)} prompts of "
           f"{len(prompts[0])} tokens, {max_new} new tokens each (EOS off), a chain of {args.n_future - 1} drafts "
           f"(every draft head, head_type={args.head_type}"
           + (f", drafts among the {len(vocab):,} most frequent tokens" if vocab is not None else "")
           + f"). A step starts in a repeat when the {_NGRAM.value} tokens ending at its first token "
           "occurred earlier in the prompt or the generation. The decode loop's forward passes equal the replay's "
           f"for every prompt; over whole generations, prefill included: {whole:.2f} tokens per forward.", "",
           "| new tokens | steps | tokens/forward | steps starting in a repeat |", "|---|---:|---:|---:|"]
  for g in summary["by_position"]:
    lines.append(f"| {g['from']}-{g['to'] - 1} | {g['steps']} | {g['tokens_per_forward']:.2f} | {g['in_repeat']:.2f} |")
  lines += ["", "| steps | count | tokens/forward |", "|---|---:|---:|"]
  for name, k in summary["by_kind"].items():
    lines.append(f"| {name} | {k['steps']} | {k['tokens_per_forward']:.2f} |")
  lines += ["", "Per prompt (whole generations, prefill included): "
            + ", ".join(f"{k} {spread[k]:.2f}" for k in ("min", "p25", "median", "p75", "max"))
            + f"; mean {spread['mean']:.2f} +- {spread['sem']:.2f} (standard error over the prompts)."]
  lines += ["", f"Wall time {result['wall_s']:.0f} s. Command: `python experiments/speed/acceptance_by_position.py "
            f"{' '.join(a for a in sys.argv[1:] if not a.startswith('--out_dir'))}`"]
  write_results(_OUT.value or ("acceptance_by_position_quick" if _QUICK.value else "acceptance_by_position"), result,
                lines, _OUT_DIR.value)


if __name__ == "__main__":
  cli.run(main)
