"""Self-speculative decoding speed: greedy vs speculative on held-out prompts, batch sizes 1, 4, 16.

    python experiments/speed/speculative.py --workdir=workdirs/default            # a trained run
    python experiments/speed/speculative.py --config=configs/tiny.py --random_init --out_name=speculative_smoke

For each batch size, over the same held-out prompts (64 by default, in one call of `batch` rows, each
finished row taking the next prompt; --noserve: `batch` prompts per call): tokens/s of
greedy and of speculative decoding (the same compiled loop, k=1 vs k=n tokens per forward), the
speedup, tokens per forward pass (all rows' tokens / all rows' forward passes, prefill included),
each draft head's acceptance, and C = time of one verify step (a forward over n tokens) / time of
one single-token greedy step (the decode loop's own steps, with the KV cache, from the prompts' end).
Speculative can only win when tokens per forward > C. After a warm-up the two modes run back to
back on each call, and the medians over repeats are reported, so drift on a shared machine hits both
modes alike. EOS is off: every row generates exactly max_new_tokens, so both modes do the same work.
Speculative output is checked to equal greedy's.
Writes experiments/speed/results/<out_name>.md and .json.
"""
import os
import statistics
import sys
import time

from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # experiments/, for common/

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import cli  # noqa: E402
from common import drafts  # noqa: E402
from common.decode_models import with_workdir_draft_vocab  # noqa: E402
from common.prompts import valid_split_prompts  # noqa: E402
from common.results_io import write_results  # noqa: E402
from common.step_timing import decode_step_program  # noqa: E402
from mtp_jax.errors import exit_with  # noqa: E402
from mtp_jax import decode  # noqa: E402
from mtp_jax.cpu_flags import cpu_model  # noqa: E402
from mtp_jax.model import ModelArgs, build_model, init_params  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "workdirs/default", "Trained run to benchmark.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "With --random_init: the recipe to initialise.")
_RANDOM = flags.DEFINE_bool("random_init", False, "Random weights and random-token prompts (smoke test).")
_BATCHES = flags.DEFINE_list("batch_sizes", ["1", "4", "16"], "Batch sizes (each runs over all the prompts).")
_N_PROMPTS = flags.DEFINE_integer("prompts", 64, "Held-out prompts (a multiple of every batch size).")
_SERVE = flags.DEFINE_bool("serve", True, "Decode all prompts in one call, `batch` rows at once, a finished row "
                           "taking the next prompt (continuous batching); --noserve: `batch` prompts per call.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "Tokens per prompt.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "Tokens generated per row (the prompt's prefill, "
                                "the same in both modes, weighs less the more are generated).")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed runs per mode and batch size (after one warm-up).")
_FWD_ITERS = flags.DEFINE_integer("forward_iters", 50, "Steps per timed call when measuring C.")
_FWD_REPEATS = flags.DEFINE_integer("forward_repeats", 21, "Timed pairs (single, verify) when measuring C.")
_SEED = flags.DEFINE_integer("seed", 0, "Prompt selection seed.")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "Text prompts, one per line (\\n escapes), instead of "
                                   "held-out windows; the first --prompts of them are used.")
_CHAT = flags.DEFINE_bool("chat", False, "With --prompt_file: wrap each prompt in the model's chat template.")
_DRAFT = flags.DEFINE_integer("draft_heads", None, "Speculative block k (2..n_future; default n_future): heads 2..k draft.")
_DRAFT_VOCAB = flags.DEFINE_integer("draft_vocab", 0, "Drafts choose among the N most frequent tokens of "
                                    "<workdir>/draft_vocab.npy (decode.with_draft_vocab); 0: the whole vocabulary.")
_KINDS = flags.DEFINE_list("draft", ["chain", "auto"], "Speculative drafting schemes timed side by side per batch "
                           "size: chain (--draft_heads-1 drafts every step), chainK (K-1 drafts every step), auto (chosen per step, "
                           "at most --draft_heads-1; docs/decoding.md), tree, bestfirst; treeN / bestfirstN: a tree of N nodes, "
                           "bestfirstNxK: N nodes among each head's top K; autotreeN: auto, with the static tree of N nodes as one more budget.")
_CARRY = flags.DEFINE_bool("carry_counts", True, "--draft=auto: each call starts from the acceptance counts the "
                           "call before it ended with (decode.run's draft_counts), as a server keeps them across "
                           "requests: no start probe once counts exist. --nocarry_counts: every call starts afresh.")
_OUT = flags.DEFINE_string("out_name", "speculative", "Results file stem under experiments/results/.")


def load_model():
  """(params, config, held-out prompt token lists)."""
  n_prompts, length = _N_PROMPTS.value, _PROMPT_LEN.value
  rng = np.random.default_rng(_SEED.value)
  if _RANDOM.value:
    config = _CONFIG.value
    if config is None:
      exit_with("--random_init needs --config=configs/<recipe>.py")
    params = jax.jit(lambda k: init_params(build_model(config.model), k))(jax.random.key(0))
    prompts = rng.integers(0, config.model.vocab_size, (n_prompts, length)).tolist()
    return params, config, prompts, "random tokens"
  from mtp_jax.generate import load_workdir
  params, config, tokenizer = load_workdir(_WORKDIR.value)
  if _PROMPT_FILE.value:
    return params, config, file_prompts(tokenizer, n_prompts), os.path.basename(_PROMPT_FILE.value) + (
        " (chat template)" if _CHAT.value else "")
  return params, config, valid_split_prompts(config, tokenizer, n_prompts, length, rng), "valid split"


def file_prompts(tokenizer, n: int) -> list[list[int]]:
  """The first n prompts of --prompt_file as token ids (in the chat template with --chat; BOS as the tokenizer says)."""
  with open(_PROMPT_FILE.value, encoding="utf-8") as f:
    texts = [l.replace("\\n", "\n") for l in f.read().splitlines() if l.strip()]
  if len(texts) < n:
    exit_with(f"--prompt_file={_PROMPT_FILE.value} holds {len(texts)} prompts; --prompts={n} needs that many")
  if _CHAT.value:
    from mtp_jax import chat
    texts = [chat.render(tokenizer, t) for t in texts]
  bos = [tokenizer.bos_id] if getattr(tokenizer, "add_bos", True) and not _CHAT.value else []
  return [bos + tokenizer.encode(t) for t in texts[:n]]


def time_decodes(params, args: ModelArgs, prompts, batch: int, repeats: int, kind: str = "chain") -> dict:
  """Greedy vs speculative over every prompt, `batch` rows at once, runs interleaved: median seconds for
  all prompts, tokens/s and the statistics pooled over the calls."""
  if _SERVE.value:   # one call: rows are refilled from the queue of prompts as they finish
    calls, slots = [decode.pad_prompts(prompts, max(map(len, prompts)))], batch
  else:
    calls, slots = [decode.pad_prompts(prompts[i:i + batch], max(map(len, prompts)))
                    for i in range(0, len(prompts), batch)], None
  kw = dict(max_new_tokens=_MAX_NEW.value, eos_id=-1, slots=slots)
  draft = {"greedy": {}, "speculative": draft_options(kind)}

  modes = ("greedy", "speculative")
  carry = _CARRY.value and draft["speculative"]["draft"] == "auto"
  counts = None   # --carry_counts: the acceptance counts the previous auto call ended with

  def call(m, tokens, lengths):
    nonlocal counts
    out, timing = decode.run(params, args, tokens, lengths, mode=m, **kw, **draft[m],
                             **({"draft_counts": counts} if carry and m == "speculative" else {}))
    if carry and m == "speculative":
      counts = out.draft_counts
    return out, timing

  outs = {m: [call(m, t, l)[0] for t, l in calls] for m in modes}   # compile, warm up
  runs, costs = {m: [0.0] * repeats for m in modes}, None
  for r in range(repeats):
    for i, (tokens, lengths) in enumerate(calls):   # the two modes back to back on each call: drift hits both
      for m in modes:
        outs[m][i], timing = call(m, tokens, lengths)
        runs[m][r] += timing["wall_s"]
        costs = timing.get("draft_costs", costs) if m == "speculative" else costs
  cat = lambda m, field: np.concatenate([getattr(o, field) for o in outs[m]])
  lengths, forwards, accepted = cat("speculative", "lengths"), cat("speculative", "forwards"), cat("speculative", "accepted")
  proposed = np.sum(cat("speculative", "proposed"), axis=0)
  res = {m: {"seconds": statistics.median(t), "tokens_per_s": len(prompts) * _MAX_NEW.value / statistics.median(t)}
         for m, t in runs.items()}
  return {**res, "speedup": res["greedy"]["seconds"] / res["speculative"]["seconds"],
          "tokens_per_forward": float(np.sum(lengths) / np.sum(forwards)),
          "batch_forwards": {m: sum(int(o.steps) + 1 for o in outs[m]) for m in modes},
          "row_forwards_paid": {m: sum(int(o.row_steps) for o in outs[m]) for m in modes},
          "row_forwards_needed": int(np.sum(forwards)),
          "acceptance": [float(a) / p if p else 0.0 for a, p in zip(np.sum(accepted, axis=0), proposed)],
          "budget_steps": np.sum([o.budget_steps for o in outs["speculative"]], axis=0).tolist(), "draft_costs": costs,
          "grows": sum(int(o.grows) for o in outs["speculative"] if o.grows is not None),
          "identical_to_greedy": bool(np.array_equal(cat("speculative", "tokens"), cat("greedy", "tokens")))}


def grown(row: dict) -> str:
  """' (g grows)' where --draft=auto grew its budget back g times, else ''."""
  return f" ({row['grows']} grows)" if row.get("grows") else ""


def draft_options(kind: str) -> dict:
  """decode.run's draft keywords for a --draft entry (common/drafts.py), --draft_heads the cap."""
  return drafts.draft_options(kind, _DRAFT.value)


def verify_cost(params, args: ModelArgs, prompts, repeats: int) -> dict:
  """C: seconds of one speculative step (a cached forward over a block of n tokens with every head,
  and its verification) over one greedy step (a cached single-token forward with head 0): the decode
  loop's own step function, run `forward_iters` times from the prompts' prefill in one program."""
  iters = _FWD_ITERS.value
  tokens, lengths = map(jnp.asarray, decode.pad_prompts(prompts, max(map(len, prompts))))
  make = lambda mode: decode_step_program(params, args, mode, tokens, lengths, iters, _MAX_NEW.value, _DRAFT.value)
  fns = {"single": make("greedy"), "verify": make("speculative")}
  times = {k: [] for k in fns}
  for f in fns.values():
    jax.block_until_ready(f())                                         # compile + warm up
  for _ in range(repeats):
    for k, f in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f())
      times[k].append((time.perf_counter() - t0) / iters)
  med = {k: statistics.median(v) for k, v in times.items()}
  # C from each repeat's own pair (timed back to back), so a burst of load on this shared machine
  # spoils one ratio, not the whole estimate.
  ratio = statistics.median(v / s for s, v in zip(times["single"], times["verify"]))
  return {"single_step_s": med["single"], "verify_step_s": med["verify"], "C": ratio}


def with_draft_vocab(params, args: ModelArgs):
  """params drafting among the --draft_vocab most frequent tokens the workdir ranks (draft_vocab.npy)."""
  if not _DRAFT_VOCAB.value:
    return params
  if _RANDOM.value:
    exit_with("--draft_vocab reads the ranking a workdir holds; it does not go with --random_init")
  return with_workdir_draft_vocab(params, args.vocab_size, _WORKDIR.value, _DRAFT_VOCAB.value)


def main(_):
  params, config, prompts, source = load_model()
  args = ModelArgs.from_config(config.model)
  params = with_draft_vocab(params, args)
  decode.Request("speculative", draft_heads=_DRAFT.value, flag="--").check_model(args)   # bad flags: one error line
  for kind in _KINDS.value:                                                                 # (cli.run)
    decode.Request("speculative", **draft_options(kind), flag="--").check_model(args)
  if args.n_future < 2:
    exit_with(f"model.n_future={args.n_future}: speculative decoding needs draft heads (n >= 2)")
  if _FWD_ITERS.value * args.n_future >= _MAX_NEW.value:   # C's steps must not finish the generation
    exit_with(f"--forward_iters={_FWD_ITERS.value}: {_FWD_ITERS.value} speculative steps could finish the "
          f"{_MAX_NEW.value} tokens; keep forward_iters * n_future < --max_new_tokens")
  device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
  if jax.devices()[0].platform == "cpu":
    device += f" ({cpu_model()})"
  rows = []
  cost = {}
  for b, kind in ((b, kind) for b in map(int, _BATCHES.value) for kind in _KINDS.value):
    t0 = time.time()
    cost = verify_cost(params, args, prompts[:b], _FWD_REPEATS.value) if kind == _KINDS.value[0] else cost
    row = {"batch": b, "draft": kind, **time_decodes(params, args, prompts, b, _REPEATS.value, kind), **cost}
    rows.append(row)
    print(f"batch {b:3d} {kind}: budget steps {row['budget_steps']}, costs {row['draft_costs']}, greedy {row['greedy']['tokens_per_s']:8.1f} tok/s, speculative "
          f"{row['speculative']['tokens_per_s']:8.1f} tok/s, speedup {row['speedup']:.2f}, "
          f"{row['tokens_per_forward']:.2f} tokens/forward, C={row['C']:.2f} (single {row['single_step_s'] * 1e3:.3f} ms, "
          f"verify {row['verify_step_s'] * 1e3:.3f} ms) ({time.time() - t0:.0f}s)", flush=True)

  model_desc = (f"n_future={args.n_future}{f' (draft_heads={_DRAFT.value})' if _DRAFT.value else ''}, "
                f"head_type={args.head_type}, d_model={args.d_model}, "
                f"{f'drafts among the {_DRAFT_VOCAB.value} most frequent tokens, ' if _DRAFT_VOCAB.value else ''}"
                f"n_layers={args.n_layers}, vocab={args.vocab_size}")
  origin = "random init" if _RANDOM.value else _WORKDIR.value
  result = {"device": device, "model": model_desc, "weights": origin, "prompts": source,
            "prompt_len": _PROMPT_LEN.value, "max_new_tokens": _MAX_NEW.value, "repeats": _REPEATS.value, "rows": rows}
  n_draft = (_DRAFT.value or args.n_future) - 1
  lens = sorted(map(len, prompts))
  prompt_desc = f"{lens[0]} tokens" if lens[0] == lens[-1] else f"{lens[0]}-{lens[-1]} tokens"
  heads = " | ".join(f"head {i + 2}" for i in range(n_draft))
  lines = [f"Self-speculative greedy decoding vs greedy, {device}; {model_desc}; weights: {origin}; prompts: "
           f"{prompt_desc} ({source}); {_MAX_NEW.value} new tokens per row, EOS off; medians of "
           f"{_REPEATS.value} interleaved runs.", "",
           f"| batch | draft | greedy tok/s | speculative tok/s | speedup | tokens/forward | batch forwards g/s | "
           f"row forwards needed/paid | C | "
           f"speedup / (tokens/forward / C) | step cost | {heads} acceptance | steps with 0..{n_draft} drafts | same as greedy |",
           "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * n_draft + "---|---|"]
  for r in rows:
    acc = " | ".join([f"{a:.2f}" for a in r["acceptance"]] + ["—"] * (n_draft - len(r["acceptance"])))   # chainK: fewer
    lines.append(f"| {r['batch']} | {r['draft']} | {r['greedy']['tokens_per_s']:.1f} | {r['speculative']['tokens_per_s']:.1f} | "
                 f"{r['speedup']:.2f} | {r['tokens_per_forward']:.2f} | {r['batch_forwards']['greedy']}/"
                 f"{r['batch_forwards']['speculative']} | "
                 f"{r['row_forwards_needed'] / r['row_forwards_paid']['speculative']:.2f} | {r['C']:.2f} | "
                 f"{r['speedup'] / (r['tokens_per_forward'] / r['C']):.2f} | {r['tokens_per_forward'] / r['speedup']:.2f} | {acc} | "
                 f"{'/'.join(map(str, r['budget_steps']))}{grown(r)} | "
                 f"{'yes' if r['identical_to_greedy'] else 'NO'} |")
  how = ("in one call, `batch` rows at once: as a row finishes, the next prompt takes it (continuous batching)"
         if _SERVE.value else "`batch` per call")
  carried = (" --draft=auto carries its acceptance counts from each call to the next (the warm-up's into the "
             "first timed call): no start probe once counts exist." if _CARRY.value else
             " --draft=auto starts every call afresh, with a probe of every draft.")
  lines += ["", f"Every batch size decodes the same {len(prompts)} prompts, {how}.{carried} "
            "tokens/forward: all rows' tokens / all rows' forward passes (prefill included). "
            "batch forwards: forward passes the whole batch ran, the first prefill included (refills are one-row prefills). "
            "row forwards needed/paid (speculative): the rows' own forward passes over the rows x passes the batch "
            "computed; below 1 where finished rows still rode along (once no prompt waits, the loop halves the batch "
            "when half its rows are done). "
            "C: one speculative step (a verify forward over n tokens, all heads) / one single-token greedy step, "
            "the decode loop's own steps "
            "(median of the repeats' ratios, each pair timed back to back). "
            "step cost: what this scheme's step cost in greedy steps over the whole generation, drafting and the "
            "tree's selection included (tokens/forward / speedup): where a step costs one greedy step (an "
            "accelerator, bound by reading the weights), the speedup would be the tokens per forward. "
            "Acceptance of head i: drafts accepted / drafts proposed (a draft needs every earlier one accepted). "
            "draft: chain (every step drafts with every head), chainK (K-1 drafts every step) or auto (the drafts "
            "per step chosen from the measured step costs and the acceptance so far; docs/decoding.md); steps with "
            "0..k drafts: the speculative calls' forward passes by budget (grows: times auto's budget grew back, "
            "its heads catching up); autotreeN: auto with the static tree of N nodes as one more budget, whose steps "
            "come last. C is the chain's.",
            "", f"Command: `python experiments/speed/speculative.py {' '.join(sys.argv[1:])}`"]
  write_results(_OUT.value, result, lines)


if __name__ == "__main__":
  cli.run(main)
