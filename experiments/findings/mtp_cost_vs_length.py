"""MTP's cost against training length: next-token validation loss of n = 1, 2, 4 at several lengths, 3 seeds.

    python experiments/findings/mtp_cost_vs_length.py                 # the committed run: 9 runs, about an hour on one core
    python experiments/findings/mtp_cost_vs_length.py --quick         # smoke: tiny model, a few steps

The issue it answers: on bytes the n=4 model's next-token loss trails n=1's by less the longer it trains
(experiments/findings/n_sweep.py). Does the gap close, or cross, at a fixed small size?

One warmup-stable-decay (WSD) run per (n, seed): linear warmup, a constant learning rate, and at each
length L a branch that copies the state at step L - round(decay_fraction * L) and decays the learning rate
linearly to zero over the remaining steps, on the same batches the main run would have seen. The model a
branch evaluates is therefore exactly the model of a WSD schedule of total length L; the longest length is
the main run's own decay. AdamW as mtp_jax/step.py builds it (global-norm clip, then Adam with decoupled
weight decay on matrices only), written with the learning rate as an argument of the step so that one
compiled step serves every schedule. Loss and model are the library's (mtp_jax.loss, mtp_jax.model).

Model: the byte recipe (configs/default.py) shrunk so 9 runs fit about an hour of one CPU core: width 64,
6 layers (parallel transformer heads under parity, so n=4 keeps a 2-layer trunk and every n has the same
parameter count), 4 attention heads, windows of 128 bytes, batch 8. Every n of one seed reads the same
batches in the same order (the data order depends only on the seed), so the n - 1 gaps are paired.

Reported: per (n, length, seed) the validation next-token loss (the recipe's first eval_batches batches
of held-out windows), the matmul work (experiments/common/matmul_work.py, forward + backward + recomputation,
x2 FLOPs per multiply-accumulate); per length the paired gap n - 1 with its mean and 95% t-interval over
seeds; the gap per FLOP (n=1's loss interpolated in log FLOPs at n's FLOPs); and the fitted trend
gap = a + b * log2(steps), b's interval from the per-seed slopes (t over seeds), and where the line
crosses zero. Writes experiments/findings/results/mtp_cost_vs_length.{md,json,png}; finished runs are kept in
<workdir>/runs.jsonl, so a rerun resumes with the runs still missing.
"""
import json
import math
import os
import sys
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # experiments/, for common/

from common.matmul_work import matmul_macs  # noqa: E402
from common.seed_stats import interval, separable  # noqa: E402
from common.results_io import results_folder, write_results  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "tiny model and steps: checks the pipeline, measures nothing")
flags.DEFINE_string("ns", "1,2,4", "comma list of head counts, parallel heads; N_causal or N_linear for the paper's other "
                    "topologies, e.g. 4_causal (n=1 is the control and always runs; quick: 1,2)")
flags.DEFINE_bool("train_control", True, "train missing n=1 runs; false: report with the n=1 runs another "
                  "invocation records in the same workdir (two invocations, one per core)")
flags.DEFINE_integer("late_lengths", 3, "the second trend fit uses the longest this many lengths")
flags.DEFINE_string("name", "mtp_cost_vs_length", "results file stem (quick: <name>_quick)")
flags.DEFINE_string("seeds", "0,1,2", "comma list of seeds (init and data order; quick: 0,1)")
flags.DEFINE_string("lengths", "40,80,160,320,640", "comma list of training lengths in steps (quick: 4,8)")
flags.DEFINE_float("decay_fraction", 0.2, "share of each length spent in the linear decay to zero")
flags.DEFINE_integer("warmup_steps", 20, "linear warmup (must be below the first decay's start)")
flags.DEFINE_float("learning_rate", 4e-3, "peak learning rate (configs/default.py's)")
flags.DEFINE_integer("d_model", 64, "model width")
flags.DEFINE_integer("n_layers", 6, "total depth L under parity (n=4 keeps L - 4 trunk layers)")
flags.DEFINE_integer("seq_len", 128, "bytes scored per window")
flags.DEFINE_integer("batch_size", 8, "windows per step")
flags.DEFINE_integer("eval_batches", 16, "validation batches (fixed, held-out windows)")
flags.DEFINE_string("workdir", None, "where finished runs are recorded (default workdirs/mtp_cost_vs_length[_quick])")
flags.DEFINE_string("out_dir", results_folder(__file__), "results directory")

PAPER = ("Paper (Gloeckle et al. 2024, Figure 3 and section 3.1): at 0.3-1B parameters on code, n=4 scores below "
         "n=1 and the gap closes with model size, turning into a gain from about 3B; the paper does not vary the "
         "training length at a fixed size. DeepSeek-V3 reports MTP gains at 16B-671B.")


def parse_variant(v: str) -> tuple:
  """'4' -> (4, 'parallel'), '4_causal' -> (4, 'causal')."""
  n, _, head_type = v.partition("_")
  return int(n), head_type or "parallel"


def label(v: str) -> str:
  n, head_type = parse_variant(v)
  return f"n={n}" + ("" if head_type == "parallel" else f" {head_type}")


def variant_of(run: dict) -> str:
  return run.get("variant") or str(run["n"])


def make_config(n: int, seed: int, head_type: str = "parallel"):
  from mtp_jax.config import validate
  if FLAGS.quick:
    from mtp_jax.recipes.tiny import get_config
    c = get_config("bytes")
    c.model.update(n_layers=max(3, n + 1), max_seq_len=64)
    c.data.update(seq_len=32, max_train_bytes=100_000)
    c.train.update(batch_size=4, eval_batches=1)
  else:
    from mtp_jax.recipes.default import get_config
    c = get_config()
    c.model.update(d_model=FLAGS.d_model, n_layers=FLAGS.n_layers, n_heads=4, n_kv_heads=2,
                   d_ff=FLAGS.d_model * 11 // 4 // 8 * 8, max_seq_len=FLAGS.seq_len)
    c.data.update(seq_len=FLAGS.seq_len)
    c.train.update(batch_size=FLAGS.batch_size, eval_batches=FLAGS.eval_batches)
  c.model.update(head_type=head_type, n_future=n, parity=True)
  c.train.update(learning_rate=FLAGS.learning_rate, warmup_steps=FLAGS.warmup_steps, steps=max(lengths()))
  c.seed = seed
  validate(c)
  return c


def lengths():
  return sorted({int(x) for x in ("4,8" if FLAGS.quick else FLAGS.lengths).split(",")})


def decay_start(length: int) -> int:
  return length - max(1, round(FLAGS.decay_fraction * length))


def stable_lr(step: int) -> float:
  """Learning rate of step `step` (1-based) before any decay: linear warmup, then constant."""
  return FLAGS.learning_rate * min(1.0, step / max(FLAGS.warmup_steps, 1))


def decay_lr(step: int, length: int) -> float:
  start = decay_start(length)
  return stable_lr(start) * (length - step + 1) / (length - start)   # linear to lr/(L-start) at the last step


_COMPILED = {}


def compiled(key: tuple, c):
  """(model, optimizer, init, train_step, eval_step) of head count n, jitted once and shared by every seed
  (the seed changes the data order and the initial parameters, never the computation)."""
  if key in _COMPILED:
    return _COMPILED[key]
  import jax
  import optax
  from mtp_jax.loss import make_loss_fn
  from mtp_jax.model import build_model, init_params
  from mtp_jax.step import make_eval_step
  t = c.train
  model = build_model(c.model)
  tx = optax.chain(optax.clip_by_global_norm(t.grad_clip), optax.scale_by_adam(b1=t.b1, b2=t.b2),
                   optax.add_decayed_weights(t.weight_decay, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)))
  loss_fn = make_loss_fn(model, c)

  @jax.jit
  def train_step(params, opt_state, batch, lr):
    grads = jax.grad(lambda p: loss_fn(p, batch)[0])(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return jax.tree.map(lambda p, u: p - lr * u, params, updates), opt_state

  _COMPILED[key] = (model, tx, jax.jit(lambda key: init_params(model, key)), train_step,
                  jax.jit(make_eval_step(model, c)))
  return _COMPILED[key]


def run_one(v: str, seed: int) -> dict:
  import jax
  from mtp_jax import data as data_lib

  began = time.time()
  n, head_type = parse_variant(v)
  c = make_config(n, seed, head_type)
  t = c.train
  data = data_lib.build(c)
  it = iter(data_lib.train_dataset(data.train, c))
  batches = [next(it) for _ in range(max(lengths()))]          # batch of step s is batches[s - 1]
  valid = data_lib.valid_batches(data.valid, c)
  model, tx, init, train_step, eval_step = compiled((n, head_type), c)
  params = init(jax.random.fold_in(jax.random.key(seed), 0))

  def next_token_loss(params) -> float:
    sums = [jax.device_get(eval_step(params, b)) for b in valid]
    return float(sum(s["nll"][0] for s in sums) / sum(s["tokens"][0] for s in sums))

  opt_state = jax.jit(tx.init)(params)
  results = {}
  todo = {decay_start(L): L for L in lengths()}
  final = max(lengths())
  for step in range(1, final + 1):
    if step - 1 in todo and todo[step - 1] != final:             # branch: decay a copy to length L
      L = todo[step - 1]
      p, o = params, opt_state                                    # the step donates nothing: no copy needed
      for s in range(step, L + 1):
        p, o = train_step(p, o, batches[s - 1], decay_lr(s, L))
      results[L] = next_token_loss(p)
      print(f"{label(v)} seed={seed} L={L}: valid next-token loss {results[L]:.4f} ({time.time() - began:.0f}s)", flush=True)
    lr = decay_lr(step, final) if step > decay_start(final) else stable_lr(step)
    params, opt_state = train_step(params, opt_state, batches[step - 1], lr)
  results[final] = next_token_loss(params)
  print(f"{label(v)} seed={seed} L={final}: valid next-token loss {results[final]:.4f} ({time.time() - began:.0f}s)",
        flush=True)
  try:
    flops = 2 * matmul_macs(c.model, c.data.seq_len) * t.batch_size * c.data.seq_len
  except ValueError:                                            # matmul_work counts transformer-layer heads only
    flops = None
  n_params = sum(x.size for x in jax.tree.leaves(params))
  return {"n": n, "head_type": head_type, "variant": v, "seed": seed, "params": int(n_params), "flops_per_step": flops,
          "valid_next_token_loss": {str(L): results[L] for L in lengths()},
          "train_steps_run": final + sum(L - decay_start(L) for L in lengths() if L != final),
          "wall_seconds": round(time.time() - began, 1)}


def analyse(runs: list, ns: list, seeds: list, Ls: list) -> dict:
  """ns: variants ('1' first, then '2', '4', '4_causal', ...); every gap is paired with n=1 of the same seed."""
  loss = {(variant_of(r), r["seed"]): r["valid_next_token_loss"] for r in runs}
  flops = {variant_of(r): r["flops_per_step"] for r in runs}
  done = [s for s in seeds if all((n, s) in loss for n in ns)]
  out = {"seeds_complete": done, "per_length": [], "trend": {}}
  for L in Ls:
    row = {"steps": L}
    for n in ns:
      vals = [loss[(n, s)][str(L)] for s in done]
      row[f"n{n}"] = {"per_seed": vals, "mean": interval(vals)[0], "ci95": interval(vals)[1]} if vals else None
      if n != "1" and vals:
        gaps = [loss[(n, s)][str(L)] - loss[("1", s)][str(L)] for s in done]
        row[f"gap_n{n}"] = {"per_seed": gaps, "mean": interval(gaps)[0], "ci95": interval(gaps)[1]}
        # per FLOP: n=1's loss at n's FLOPs, interpolated linearly in log FLOPs (None past n=1's longest run)
        xs = [math.log(flops["1"] * l) for l in Ls]
        if flops[n] and math.log(flops[n] * L) <= xs[-1]:
          g = [loss[(n, s)][str(L)] - float(np.interp(math.log(flops[n] * L), xs, [loss[("1", s)][str(l)] for l in Ls]))
               for s in done]
          row[f"gap_per_flop_n{n}"] = {"per_seed": g, "mean": interval(g)[0], "ci95": interval(g)[1]}
      base = str(parse_variant(n)[0])
      if n != base and base in ns and vals:     # another topology against parallel heads of the same n, same seed
        d = [loss[(n, s)][str(L)] - loss[(base, s)][str(L)] for s in done]
        row[f"vs_parallel_n{n}"] = {"per_seed": d, "mean": interval(d)[0], "ci95": interval(d)[1]}
    out["per_length"].append(row)
  late = Ls[-FLAGS.late_lengths:] if 2 <= FLAGS.late_lengths < len(Ls) else None
  for key, fitted in (("trend", Ls), ("trend_late", late)):
    out[key] = {}
    if not fitted or not done:
      continue
    logs = np.log2(np.asarray(fitted, float))
    for n in ns[1:]:
      gaps = np.asarray([[loss[(n, s)][str(L)] - loss[("1", s)][str(L)] for L in fitted] for s in done])
      per_seed = [np.polyfit(logs, g, 1) for g in gaps]
      b, a = np.polyfit(logs, gaps.mean(0), 1)
      bm, bh = interval([float(x[0]) for x in per_seed])
      out[key][f"n{n}"] = {"fit": "gap = a + b * log2(steps), on the seed-mean gaps", "lengths": fitted,
                           "a": float(a), "b": float(b), "b_per_seed": [float(x[0]) for x in per_seed],
                           "a_per_seed": [float(x[1]) for x in per_seed], "b_mean": bm, "b_ci95": bh,
                           "zero_crossing_steps": 2 ** (-a / b) if b < 0 < a else None}
  return out


def crossing(tr: dict, longest: int) -> str:
  x = tr["zero_crossing_steps"]
  if x is None:
    return "never (b >= 0)" if tr["b"] >= 0 else "already below zero"
  return f"{x:,.0f} steps" if x < 1000 * longest else f"beyond {1000 * longest:,} steps"


def markdown(res: dict, command: str) -> list:
  ns, Ls, an = res["ns"], res["lengths"], res["analysis"]
  seeds = an["seeds_complete"]
  md = [f"# MTP's cost against training length{' (quick: toy sizes, not a measurement)' if res['quick'] else ''}", "",
        f"Command: `{command}`. {res['device']}, CPU {res['cpu']}. {res['model']}. One warmup-stable-decay run per "
        f"(n, seed): warmup {res['warmup_steps']} steps to lr {res['learning_rate']}, constant, and a linear decay to "
        f"zero over the last {res['decay_fraction']:.0%} of each length, branched from the stable run (each length's "
        f"model is exactly that of its own WSD schedule). Seeds {', '.join(map(str, seeds))} (init and data order; every "
        f"n of a seed reads the same batches, so gaps are paired). Validation: next-token loss (nats/byte) on "
        f"{res['valid_tokens']} held-out bytes. Wall time of the runs: {res['wall_minutes']:.0f} min "
        f"(one core shared with other jobs).", "",
        "Per step: validation next-token loss, mean ± 95% t-interval over seeds; the gap is n - n=1 paired by seed "
        "(positive: MTP costs next-token loss).", "",
        "| steps | " + " | ".join(f"{label(n)} loss" for n in ns) + " | " + " | ".join(f"gap {label(n)}" for n in ns[1:])
        + " | " + " | ".join(f"gap {label(n)} per FLOP" for n in ns[1:]) + " |",
        "|---:|" + "---:|" * (2 * len(ns) - 1 + len(ns) - 1)]
  f = lambda d: "—" if not d else (f"{d['mean']:.4f} ± {d['ci95']:.4f}" if not math.isnan(d["ci95"]) else f"{d['mean']:.4f}")
  for row in an["per_length"]:
    md.append(f"| {row['steps']} | " + " | ".join(f(row.get(f"n{n}")) for n in ns) + " | "
              + " | ".join(f(row.get(f"gap_n{n}")) for n in ns[1:]) + " | "
              + " | ".join(f(row.get(f"gap_per_flop_n{n}")) for n in ns[1:]) + " |")
  others = [n for n in ns if n != str(parse_variant(n)[0]) and str(parse_variant(n)[0]) in ns]
  if others:
    md += ["", "Against parallel heads of the same n, paired by seed (positive: parallel heads have the lower "
           "next-token loss; 'separable' where the 95% interval excludes zero):", "",
           "| steps | " + " | ".join(f"{label(n)} - parallel" for n in others) + " |", "|---:|" + "---:|" * len(others)]
    for row in an["per_length"]:
      cells = []
      for n in others:
        d = row.get(f"vs_parallel_n{n}")
        sep = d and separable(d["mean"], d["ci95"])
        cells.append(f(d) + (" (separable)" if sep else " (not separable)" if d else ""))
      md.append(f"| {row['steps']} | " + " | ".join(cells) + " |")
  md += ["", "Matmul work per step (experiments/common/matmul_work.py, FLOPs = 2 x multiply-accumulates): "
         + ", ".join(f"{label(n)} {res['flops_per_step'][n] / 1e9:.2f} GFLOP ({res['flops_per_step'][n] / res['flops_per_step']['1']:.2f}x n=1)"
                     for n in ns if res["flops_per_step"].get(n))
         + ". Gap per FLOP: n's loss at L steps minus n=1's loss interpolated (linear in log FLOPs) at the same FLOPs; "
           "— where that lies past n=1's longest run.", "",
         "Trend: gap = a + b log2(steps) fitted to the seed-mean gaps, over every length and over the longest "
         f"{FLAGS.late_lengths}; b's interval is the t-interval of the per-seed slopes (the same fit per seed). "
         "Where the line crosses zero is an extrapolation of that line, nothing more.", "",
         "| n | lengths fitted | a (nats) | b (nats per doubling) | b 95% interval | per-seed b | line crosses zero at |",
         "|---:|---|---:|---:|---|---|---:|"]
  for n in ns[1:]:
    for key in ("trend", "trend_late"):
      tr = an.get(key, {}).get(f"n{n}")
      if tr:
        lo, hi = tr["b_mean"] - tr["b_ci95"], tr["b_mean"] + tr["b_ci95"]
        md.append(f"| {label(n)} | {tr['lengths'][0]}-{tr['lengths'][-1]} | {tr['a']:.4f} | {tr['b']:+.4f} | "
                  f"[{lo:+.4f}, {hi:+.4f}] | {', '.join(f'{x:+.4f}' for x in tr['b_per_seed'])} | "
                  f"{crossing(tr, max(Ls))} |")
  md += ["", PAPER, "", f"![mtp cost vs length]({res['name']}.png)"]
  return md


def plot(res: dict, path: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  ns, an = res["ns"], res["analysis"]
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
  Ls = [r["steps"] for r in an["per_length"]]
  for i, n in enumerate(ns):
    m = [r[f"n{n}"]["mean"] if r.get(f"n{n}") else np.nan for r in an["per_length"]]
    e = [r[f"n{n}"]["ci95"] if r.get(f"n{n}") else np.nan for r in an["per_length"]]
    axes[0].errorbar(Ls, m, yerr=e, marker="o", capsize=3, label=label(n), color=f"C{i}")
    if res["flops_per_step"].get(n):
      axes[1].errorbar([res["flops_per_step"][n] * L for L in Ls], m, yerr=e, marker="o", capsize=3, label=label(n),
                       color=f"C{i}")
    if n != "1":
      g = [r[f"gap_n{n}"]["mean"] if r.get(f"gap_n{n}") else np.nan for r in an["per_length"]]
      ge = [r[f"gap_n{n}"]["ci95"] if r.get(f"gap_n{n}") else np.nan for r in an["per_length"]]
      axes[2].errorbar(Ls, g, yerr=ge, marker="o", capsize=3, label=f"{label(n)} - n=1", color=f"C{i}")
      for key, style in (("trend", ":"), ("trend_late", "--")):
        tr = an.get(key, {}).get(f"n{n}")
        if tr:
          xs = np.geomspace(tr["lengths"][0], max(Ls) * 8, 50)
          axes[2].plot(xs, tr["a"] + tr["b"] * np.log2(xs), style, color=f"C{i}", alpha=0.7,
                       label=f"fit {label(n)}, {tr['lengths'][0]}-{tr['lengths'][-1]}: {tr['a']:.3f} {tr['b']:+.3f} log2(steps)")
  axes[0].set(xscale="log", xlabel="training steps (each its own WSD schedule)", ylabel="valid next-token loss (nats)",
              title="per step")
  axes[1].set(xscale="log", xlabel="matmul FLOPs (experiments/common/matmul_work.py)", ylabel="valid next-token loss (nats)",
              title="per FLOP")
  axes[2].axhline(0, color="k", lw=0.8)
  axes[2].set_xlim(min(Ls) / 1.5, max(Ls) * 12)
  axes[2].set(xscale="log", xlabel="training steps", ylabel="gap in next-token loss (nats)",
              title="MTP's cost, paired by seed (mean, 95% t-interval)")
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write(runs, ns, seeds, command, extra):
  Ls = lengths()
  name = FLAGS.name + ("_quick" if FLAGS.quick else "")
  res = {"name": name, "quick": FLAGS.quick, "ns": ns, "seeds": seeds, "lengths": Ls, "command": command,
         "decay_fraction": FLAGS.decay_fraction, "warmup_steps": FLAGS.warmup_steps,
         "learning_rate": FLAGS.learning_rate, **extra,
         "flops_per_step": {variant_of(r): r["flops_per_step"] for r in runs},
         "wall_minutes": sum(r["wall_seconds"] for r in runs) / 60, "runs": runs}
  res["analysis"] = analyse(runs, ns, seeds, Ls)
  write_results(name, res, markdown(res, command), FLAGS.out_dir)
  plot(res, os.path.join(FLAGS.out_dir, f"{name}.png"))


def main(argv):
  del argv
  import jax
  ns = ["1", "2"] if FLAGS.quick and not FLAGS["ns"].present else sorted({"1"} | set(FLAGS.ns.split(",")), key=lambda v: (
      parse_variant(v)[0], parse_variant(v)[1] != "parallel", parse_variant(v)[1]))
  for v in ns:
    if not v.partition("_")[0].isdigit() or parse_variant(v)[1] not in ("parallel", "causal", "linear"):
      raise SystemExit(f"error: --ns={FLAGS.ns}: each entry is a head count, optionally _causal or _linear (e.g. 4_causal)")
  seeds = [0, 1] if FLAGS.quick else [int(x) for x in FLAGS.seeds.split(",")]
  if FLAGS.warmup_steps >= decay_start(min(lengths())) and not FLAGS.quick:
    raise SystemExit(f"error: --warmup_steps={FLAGS.warmup_steps} must end before the first decay starts "
                     f"(step {decay_start(min(lengths()))}); lower it or raise the shortest --lengths")
  if FLAGS.quick:
    FLAGS.warmup_steps = 2
  workdir = os.path.abspath(FLAGS.workdir or os.path.join(
      ROOT, "workdirs", "mtp_cost_vs_length_quick" if FLAGS.quick else "mtp_cost_vs_length"))
  os.makedirs(workdir, exist_ok=True)
  record = os.path.join(workdir, "runs.jsonl")

  def finished():     # reread before every run: another invocation may share the workdir (e.g. the n=1 controls)
    if not os.path.exists(record):
      return []
    with open(record) as f:
      rows = [json.loads(line) for line in f if line.strip()]
    latest = {(variant_of(r), r["seed"]): r for r in rows if variant_of(r) in ns and r["seed"] in seeds
              and sorted(map(int, r["valid_next_token_loss"])) == lengths()}
    return list(latest.values())

  from mtp_jax.cpu_flags import cpu_model
  cpu = cpu_model()
  command = "python experiments/findings/mtp_cost_vs_length.py " + " ".join(sys.argv[1:])
  c = make_config(1, 0)
  m = c.model
  extra = {"device": f"{jax.device_count()} x {jax.devices()[0].device_kind}", "cpu": cpu,
           "valid_tokens": c.train.eval_batches * c.train.batch_size * c.data.seq_len,
           "model": (f"Bytes (258 ids), width {m.d_model}, {m.n_layers} layers under parity (parallel transformer heads), "
                     f"{m.n_heads} attention heads, SwiGLU {m.d_ff}, windows of {c.data.seq_len}, batch "
                     f"{c.train.batch_size}")}
  for seed in seeds:                     # seed-major: a partial run leaves whole paired sets
    for n in ns:
      if any(variant_of(r) == n and r["seed"] == seed for r in finished()) or (n == "1" and not FLAGS.train_control):
        continue
      row = run_one(n, seed)
      with open(record, "a") as f:
        f.write(json.dumps(row) + "\n")
      write(finished(), ns, seeds, command, extra)
  write(finished(), ns, seeds, command, extra)


if __name__ == "__main__":
  app.run(main)
