"""MTP heads added to a pretrained next-token model: frozen trunk (Medusa-1, Mehra et al.) vs joint training,
against the n=4 model trained from scratch, all through the converter.

    python experiments/findings/frozen_heads.py                  # the full run (2 CPU cores: about 2 hours)
    python experiments/findings/frozen_heads.py --steps=1000 --head_steps=500   # the README's run (about 75 min)
    python experiments/findings/frozen_heads.py --quick          # the same pipeline at toy size (seconds to minutes)
    python experiments/findings/frozen_heads.py --steps=400 --head_steps=200 --seeds=0,1,2 --nofrom_scratch \
        --workdir=workdirs/frozen_heads_seeds --out_name=frozen_heads_seeds      # seeds with the n=1 control

1. train the n=1 default model (`configs/default.py:n1`, with parallel transformer heads: a linear
   head has no Llama form, so the exported model is a 12-layer Llama; the recipe's own head is linear)
2. `convert export` it to a Hugging Face directory, then `convert import --n_future=4 --head_init=copy`
   twice: heads 2..4 start as copies of head 1 (the model's last layer)
3. train the heads with `train.trainable=heads` (trunk, head 1, norm, embeddings frozen) and, on the
   other copy, everything jointly (`train.trainable=all`), for --head_steps steps each with the
   default recipe's data and schedule
4. with --control (default), import the n=1 model again as n=1 and train it --head_steps more steps the
   same way: the joint model's head 1 had that many extra steps, so this is its matched control
5. train the n=4 default (`configs/default.py`, linear heads) from scratch (--nofrom_scratch skips it)
6. for each model: validation per-head loss and acceptance (head i right given heads 1..i-1 right),
   and greedy vs self-speculative decoding at batch 1 on held-out prompts (tokens per forward,
   draft acceptance, speedup = median greedy seconds / median speculative seconds, output identical)

Writes experiments/findings/results/frozen_heads[_quick].json and .md (or under --out_dir).
"""
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # experiments/, for common/

from common.results_io import results_folder, write_results  # noqa: E402
from common.run_metrics import last_valid  # noqa: E402
from mtp_jax.cpu_flags import cpu_model  # noqa: E402
from parity_runs import decode_batch1  # noqa: E402


def recipes(quick: bool, steps: int = 0):
  """(n=1 recipe with parallel heads, n=4 recipe) as ConfigDicts; steps > 0 shortens both recipes."""
  if quick:
    from mtp_jax.recipes.tiny import get_config
    n1, n4 = get_config("bytes"), get_config("bytes")
    for c in (n1, n4):
      c.train.update(steps=6, log_every=3, eval_every=6, eval_batches=1, checkpoint_every=6, warmup_steps=1)
      c.data.max_train_bytes = 100_000
    n1.model.update(n_future=1, n_layers=3)
    n4.model.update(n_future=4, n_layers=4, parity=False, head_type="linear")
  else:
    from mtp_jax.recipes.default import get_config
    n1, n4 = get_config("n1"), get_config()
    if steps:
      for c in (n1, n4):
        c.train.update(steps=steps, eval_every=min(c.train.eval_every, steps),
                       checkpoint_every=min(c.train.checkpoint_every, steps))
  n1.model.head_type = "parallel"
  return n1, n4


def heads_config(workdir, recipe, trainable: str, steps: int):
  """The imported model's config (configs/imported.py) with the recipe's data and schedule."""
  from mtp_jax.recipes.imported import get_config
  c = get_config(str(workdir))
  c.data.update({k: v for k, v in recipe.data.items() if k != "tokenizer"})
  c.train.update(recipe.train.to_dict())
  c.train.update(trainable=trainable, steps=steps, eval_every=steps, checkpoint_every=steps)
  return c


def held_out_prompts(config, tokenizer, n: int, length: int) -> list:
  import ml_collections
  from mtp_jax import data
  cfg = ml_collections.ConfigDict(config.data.to_dict())
  prompts = []
  for text in data.Corpus(cfg).texts("valid"):
    ids = tokenizer.encode(text[len(text) // 3:])[:length]   # from inside a file: code, not its header
    if len(ids) == length:
      prompts.append(ids)
    if len(prompts) == n:
      break
  return prompts


def decode_speed(workdir, prompts, max_new: int, repeats: int) -> dict:
  """Batch 1, greedy and speculative back to back per prompt (parity_runs.decode_batch1), as median total
  seconds over repeats."""
  from mtp_jax.generate import load_workdir
  from mtp_jax.model import ModelArgs
  params, config, _ = load_workdir(str(workdir))
  r = decode_batch1(params, ModelArgs.from_config(config.model), prompts, max_new, repeats)
  tokens = len(prompts) * max_new
  return {"greedy_s": tokens / r["greedy_tok_s"], "speculative_s": tokens / r["speculative_tok_s"],
          "speedup": r["speedup"], "tokens_per_forward": r["tokens_per_forward"],
          "draft_acceptance": r["acceptance"], "identical_to_greedy": r["identical_to_greedy"]}


def train(config, workdir) -> float:
  from mtp_jax.train import train_and_evaluate
  began = time.time()
  train_and_evaluate(config, workdir)
  return time.time() - began


def define_flags():
  """The flags (defined when run as a script, so tests can import this module)."""
  flags.DEFINE_bool("quick", False, "toy sizes: checks the pipeline, measures nothing")
  flags.DEFINE_string("workdir", None, "where the runs go (default workdirs/frozen_heads[_quick]; seed s > 0 under "
                      "<workdir>/seed<s>)")
  flags.DEFINE_string("out_dir", None, "results directory (default: results/ beside this script)")
  flags.DEFINE_string("out_name", None, "results file stem (default frozen_heads[_quick])")
  flags.DEFINE_integer("steps", 0, "train.steps of the n=1 and n=4 recipes (default: theirs, 2000)")
  flags.DEFINE_integer("head_steps", None, "steps of head training (default: 1000; quick: 4)")
  flags.DEFINE_list("seeds", ["0"], "config.seed of every run (init and batches); paired by seed in the summary")
  flags.DEFINE_bool("control", True, "also train the n=1 model --head_steps more steps (imported as n=1, every "
                    "weight trained, the heads' schedule): the matched control for the joint model's head 1")
  flags.DEFINE_bool("from_scratch", True, "also train the n=4 recipe from scratch (n_sweep covers it over seeds)")
  flags.DEFINE_integer("prompts", None, "held-out prompts (default 16; quick: 2)")
  flags.DEFINE_integer("max_new_tokens", None, "default 128; quick: 8")
  flags.DEFINE_integer("repeats", None, "timed repeats per mode (default 5; quick: 1)")


def run_seed(seed: int, root: str, q: bool, steps: int, head_steps: int, control: bool, from_scratch: bool,
             n_prompts: int, max_new: int, repeats: int) -> dict:
  """Every model of one seed, trained (or resumed) under root, and its validation and decoding figures."""
  from mtp_jax import interop
  from mtp_jax import tokenizer as tokenizer_lib
  n1, n4 = recipes(q, steps)
  n1.seed = n4.seed = seed
  w = {k: os.path.join(root, k) for k in ("n1", "n1_hf", "frozen", "joint", "n1_more", "n4")}
  seconds = {"n1": train(n1, w["n1"])}
  if not os.path.exists(w["n1_hf"]):
    interop.export_workdir(w["n1"], w["n1_hf"])
  runs = [("frozen", "heads", 4), ("joint", "all", 4)] + ([("n1_more", "all", 1)] if control else [])
  for kind, trainable, n_future in runs:
    if not os.path.exists(os.path.join(w[kind], "config.json")):
      interop.import_checkpoint(w["n1_hf"], w[kind], n_future=n_future, head_init="copy")
    c = heads_config(w[kind], n1, trainable, head_steps)
    c.seed = seed
    seconds[kind] = train(c, w[kind])
  decoded = ["frozen", "joint"]
  if from_scratch:
    seconds["n4"] = train(n4, w["n4"])
    decoded.append("n4")
  prompts = held_out_prompts(n1, tokenizer_lib.load_tokenizer(w["n1"]), n_prompts, 64 if not q else 16)
  rows = {}
  for kind in ["n1"] + [k for k, _, _ in runs] + (["n4"] if from_scratch else []):
    v = last_valid(w[kind])
    # seconds this process trained: a finished workdir is resumed and only evaluated (the command's wall
    # time is the whole cost)
    rows[kind] = {"seconds_in_this_run": round(seconds[kind], 1), "valid_step": v["step"],
                  "head_losses": v["head_losses"],
                  "head_acceptance": v.get("head_acceptance", [])}
    if kind in decoded:
      rows[kind].update(decode_speed(w[kind], prompts, max_new, repeats))
  return rows


def summary(per_seed: dict, head_steps: int) -> list:
  """Markdown: means over seeds with 95% intervals, and the paired differences that carry the conclusions."""
  from common.seed_stats import interval, mean_pm, separable
  seeds = sorted(per_seed)
  have = lambda k: all(k in per_seed[s] for s in seeds)
  val = lambda k, f: [f(per_seed[s][k]) for s in seeds]
  lines = [f"Over seeds {', '.join(map(str, seeds))} (mean ± 95% t-interval; differences paired by seed, each seed's "
           "models sharing its n=1 model and its batches):", "",
           "| model | next-token loss | head 2 loss | head 2 acceptance | tokens/forward | speedup |",
           "|---|---:|---:|---:|---:|---:|"]
  names = {"n1": "n=1", "n1_more": f"n=1 + {head_steps} more steps (control)",
           "frozen": f"n=1 + 3 heads, frozen trunk ({head_steps} steps)",
           "joint": f"n=1 + 3 heads, joint ({head_steps} steps)", "n4": "n=4 from scratch"}
  for k in ("n1", "n1_more", "frozen", "joint", "n4"):
    if not have(k):
      continue
    cells = [mean_pm(*interval(val(k, lambda r: r["head_losses"][0])))]
    multi = len(per_seed[seeds[0]][k]["head_losses"]) > 1
    cells.append(mean_pm(*interval(val(k, lambda r: r["head_losses"][1]))) if multi else "")
    cells.append(mean_pm(*interval(val(k, lambda r: r["head_acceptance"][1])), 3) if multi else "")
    dec = "tokens_per_forward" in per_seed[seeds[0]][k]
    cells.append(mean_pm(*interval(val(k, lambda r: r["tokens_per_forward"])), 2) if dec else "")
    cells.append(mean_pm(*interval(val(k, lambda r: r["speedup"])), 2) + "x" if dec else "")
    lines.append(f"| {names[k]} | " + " | ".join(cells) + " |")
  pairs = [("joint", "n1_more", "next-token loss", lambda r: r["head_losses"][0],
            "what joint training costs in next-token loss against n=1 trained the same extra steps"),
           ("joint", "frozen", "head 2 loss", lambda r: r["head_losses"][1], "what joint training does to head 2's loss"),
           ("joint", "frozen", "tokens/forward", lambda r: r["tokens_per_forward"], "what joint training does to the tokens per forward"),
           ("frozen", "n1", "next-token loss", lambda r: r["head_losses"][0],
            "the frozen trunk's next-token loss is the n=1 model's")]
  lines += ["", "| difference | per seed | mean ± 95% interval | verdict |", "|---|---|---:|---|"]
  for a, b, what, f, claim in pairs:
    if not (have(a) and have(b)) or (what == "tokens/forward" and "tokens_per_forward" not in per_seed[seeds[0]][a]):
      continue
    d = [f(per_seed[s][a]) - f(per_seed[s][b]) for s in seeds]
    m, h = interval(d)
    verdict = "separable" if separable(m, h) else "not separable at this budget"
    if b == "n1":   # the check: a frozen trunk cannot move the next-token loss
      verdict = "equal: the check holds" if not any(d) else "DIFFERS: the frozen trunk moved"
    lines.append(f"| {what}: {names[a]} - {names[b]} | {', '.join(f'{x:+.4f}' for x in d)} | "
                 f"{mean_pm(m, h, sign=True)} | {verdict}: {claim} |")
  return lines


def main(_):
  a = flags.FLAGS
  q = a.quick
  head_steps = a.head_steps or (4 if q else 1000)
  n_prompts, max_new, repeats = a.prompts or (2 if q else 16), a.max_new_tokens or (8 if q else 128), \
      a.repeats or (1 if q else 5)
  name = a.out_name or ("frozen_heads_quick" if q else "frozen_heads")
  base = os.path.abspath(a.workdir or os.path.join("workdirs", "frozen_heads_quick" if q else "frozen_heads"))
  out_dir = a.out_dir or results_folder(__file__)
  try:
    seeds = [int(x) for x in a.seeds]
  except ValueError:
    raise SystemExit(f"error: --seeds={','.join(a.seeds)}: give integers, e.g. --seeds=0,1,2")
  began = time.time()
  per_seed = {}
  for seed in seeds:
    root = base if seed == 0 else os.path.join(base, f"seed{seed}")   # seed 0 keeps the single-run layout
    per_seed[seed] = run_seed(seed, root, q, a.steps, head_steps, a.control, a.from_scratch, n_prompts, max_new,
                              repeats)
  n1_steps = recipes(q, a.steps)[0].train.steps
  first = per_seed[seeds[0]]
  result = {"quick": q, "head_steps": head_steps, "n1_steps": n1_steps, "seeds": seeds, "prompts": n_prompts,
            "max_new_tokens": max_new, "repeats": repeats, "per_seed": {str(s): r for s, r in per_seed.items()},
            "wall_s": round(time.time() - began, 1),
            **{k: v for k, v in first.items() if k in ("n1", "frozen", "joint", "n4")}}   # seed 0's, as before
  label = {"frozen": f"n=1 + 3 heads, frozen trunk ({head_steps} steps)",
           "joint": f"n=1 + 3 heads, joint ({head_steps} steps)", "n4": "n=4 default from scratch"}
  v1 = first["n1"]
  md = [f"# MTP heads on a pretrained trunk{' (quick: toy sizes, not a measurement)' if q else ''}", "",
        f"Command: `python experiments/findings/frozen_heads.py {' '.join(sys.argv[1:])}`; n=1"
        f"{' and n=4' if a.from_scratch else ''} trained {n1_steps} steps; batch-1 decoding of "
        f"{n_prompts} held-out prompts, {max_new} new tokens, median of {repeats}; 1 x cpu "
        f"({cpu_model()}); wall time {(time.time() - began) / 60:.0f} min.", ""]
  if len(seeds) > 1 or a.control:
    md += summary(per_seed, head_steps) + ["", f"Seed {seeds[0]} alone:", ""]
  md += [f"n=1 baseline: valid loss {v1['head_losses'][0]:.4f} at step {v1['valid_step']}.", "",
         "| model | valid loss per head | acceptance per head | tokens/forward | speedup | same as greedy |",
         "|---|---|---|---|---|---|"]
  for kind in ("frozen", "joint", "n4"):
    if kind in first:
      r = first[kind]
      md.append(f"| {label[kind]} | {' '.join(f'{x:.3f}' for x in r['head_losses'])} | "
                f"{' '.join(f'{x:.3f}' for x in r['head_acceptance'])} | {r['tokens_per_forward']:.2f} | "
                f"{r['speedup']:.2f}x | {r['identical_to_greedy']} |")
  write_results(name, result, md, out_dir)


if __name__ == "__main__":
  define_flags()
  app.run(main)
