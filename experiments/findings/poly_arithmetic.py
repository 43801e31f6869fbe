"""Algorithmic reasoning (Gloeckle et al. 2024, section 4.2): polynomial arithmetic in F_7[X]/(X^5), n = 1 vs 2 vs 4.

    python experiments/findings/poly_arithmetic.py --steps=1500    # the README's run (time in the results file)
    python experiments/findings/poly_arithmetic.py --quick         # toy sizes and steps (CI): checks the pipeline, measures nothing

The corpus is generated (experiments/findings/poly_ring.py, seed 0): one problem per document,
"<expression>=<answer>", with 1 to --train_ops operations each (negation, +, *, composition), written
as JSONL under --workdir and read by the library's own pipeline (byte tokenizer). Models, all with
the same seed and the same tokens (--seeds: each seed trains them all): n = 1, 2 and 4 at one size (parallel transformer heads under
parity, so all three have one parameter count), and n = 1 at about three times the parameters (the
paper's comparison: does a bigger next-token model gain as much as extra heads?).

Test: for every number of operations k from 1 to --test_ops, fresh problems (seed 1, none of them in
the training corpus), answer exact match (all 5 coefficients; teacher-forced argmax over the answer is
exactly what greedy decoding would write) and the teacher-forced per-coefficient accuracy (chance 1/7). k <= --train_ops is in domain, above it
out of domain. The paper (Figure 8): n = 2 and n = 4 beat n = 1 at every k, in and out of domain, and
the gain from the extra heads is larger than the gain from tripling the model. Writes
experiments/findings/results/poly_arithmetic[_quick].{md,json,png}; rerunning resumes or re-evaluates the runs.
"""
import json
import os
import random
import sys
import time

import numpy as np
from absl import app, flags

import poly_ring
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # experiments/, for common/

from common.jsonl_runs import byte_config, write_texts  # noqa: E402
from common.results_io import results_folder, write_results  # noqa: E402
from common.run_metrics import last_valid, train_curve  # noqa: E402
from common.seed_stats import interval, mean_pm, separable  # noqa: E402

# name: (d_model, n_layers, n_heads, n_kv_heads, d_ff, n_future)
RUNS = {"n1": (64, 6, 4, 2, 176, 1), "n2": (64, 6, 4, 2, 176, 2), "n4": (64, 6, 4, 2, 176, 4),
        "n1_3x": (112, 6, 4, 2, 304, 1)}
QUICK_RUNS = {"n1": (16, 4, 2, 1, 32, 1), "n2": (16, 4, 2, 1, 32, 2)}


def answer_hits(predicted: np.ndarray, tokens: np.ndarray, lengths) -> np.ndarray:
  """[rows, 5]: is the argmax at each answer position the answer's coefficient? Row i is [BOS, problem...]
  of lengths[i] tokens, the answer its last 5; position j's prediction is for token j + 1."""
  d = poly_ring.DEG
  return np.stack([predicted[i, n - 1 - d:n - 1] == tokens[i, n - d:n] for i, n in enumerate(lengths)])


def fresh_problems(k: int, count: int, seen: set, seed: int = 1) -> list:
  """`count` fresh problems with k operations, none of them in the training corpus (`seen`)."""
  rng, out = random.Random(seed * 1000 + k), []
  while len(out) < count:
    text = poly_ring.problem(rng, k)[0]
    if text not in seen:
      out.append(text)
  return out


def accuracy_by_k(workdir: str, test_ops: int, per_k: int, seen: set) -> list:
  """Per k = 1..test_ops: answer exact match and per-coefficient accuracy of head 1 on fresh problems."""
  import jax
  import jax.numpy as jnp
  from mtp_jax.generate import load_workdir
  from mtp_jax.model import build_model

  params, config, tok = load_workdir(workdir)
  model = build_model(config.model)
  forward = jax.jit(lambda p, t: jnp.argmax(model.apply({"params": p}, t)[0][0], -1))   # head 1: [B, T]
  out = []
  for k in range(1, test_ops + 1):
    ids = [[tok.bos_id, *tok.encode(p)] for p in fresh_problems(k, per_k, seen)]
    width = -(-max(map(len, ids)) // 32) * 32                     # a few static shapes, not one per k
    if width > config.model.max_seq_len:
      raise SystemExit(f"error: problems with {k} operations need {width} tokens > model.max_seq_len; lower --test_ops")
    tokens = np.zeros((per_k, width), np.int32)
    for i, row in enumerate(ids):
      tokens[i, :len(row)] = row
    predicted = np.concatenate([np.asarray(forward(params, jnp.asarray(tokens[i:i + 64])))
                                for i in range(0, per_k, 64)])
    hits = answer_hits(predicted, tokens, [len(row) for row in ids])
    out.append({"k": k, "exact_match": float(hits.all(1).mean()), "coefficient_accuracy": float(hits.mean())})
  return out


METRICS = (("valid next-token loss", lambda r, ops: r["valid_next_token_loss"]),
           ("exact match, k in domain", lambda r, ops: float(np.mean([x["exact_match"] for x in r["by_k"][:ops]]))),
           ("coefficient accuracy, k out of domain",
            lambda r, ops: float(np.mean([x["coefficient_accuracy"] for x in r["by_k"][ops:]] or [np.nan]))))


def seeds_summary(rows, train_ops: int) -> list:
  """Per run and metric the mean and 95% t-interval over seeds, and each run minus n1 paired by seed."""
  by_run = {}
  for r in rows:
    by_run.setdefault(r["run"], {})[r["seed"]] = r
  out = []
  for name, fn in METRICS:
    for run, per_seed in by_run.items():
      vals = [fn(per_seed[s], train_ops) for s in sorted(per_seed)]
      entry = {"metric": name, "run": run, "per_seed": vals, "interval": interval(vals)}
      if run != "n1" and "n1" in by_run:
        diffs = [fn(per_seed[s], train_ops) - fn(by_run["n1"][s], train_ops) for s in sorted(per_seed)
                 if s in by_run["n1"]]
        entry["minus_n1"] = {"per_seed": diffs, "interval": interval(diffs)}
      out.append(entry)
  return out


def summary_lines(summary, seeds) -> list:
  if not summary:
    return []
  md = ["", f"Over seeds {', '.join(map(str, seeds))} (mean ± 95% t-interval; minus n1: paired by seed, every run of "
        "a seed on the same batches):", "", "| metric | run | mean | minus n1 (per seed) | minus n1 | verdict |",
        "|---|---|---:|---|---:|---|"]
  for e in summary:
    d = e.get("minus_n1")
    verdict = "" if d is None else ("separable" if separable(*d["interval"]) else "not separable at this budget")
    md.append(f"| {e['metric']} | {e['run']} | {mean_pm(*e['interval'])} | "
              + ("" if d is None else ", ".join(f"{v:+.4f}" for v in d["per_seed"])) + " | "
              + ("" if d is None else mean_pm(*d["interval"], sign=True)) + f" | {verdict} |")
  return md


def define_flags():
  """The flags (defined when run as a script, so tests can import this module)."""
  flags.DEFINE_bool("quick", False, "toy sizes and steps: checks the pipeline, measures nothing")
  flags.DEFINE_string("workdir", None, "runs and corpus (default workdirs/poly_arithmetic[_quick])")
  flags.DEFINE_string("out_dir", results_folder(__file__), "results directory")
  flags.DEFINE_integer("steps", None, "train steps per run (default 1500; quick: 6)")
  flags.DEFINE_integer("problems", None, "training problems generated (default 400000; quick: 2000)")
  flags.DEFINE_integer("train_ops", 3, "training problems have 1..train_ops operations")
  flags.DEFINE_integer("test_ops", 6, "test k = 1..test_ops operations")
  flags.DEFINE_integer("per_k", None, "test problems per k (default 1000; quick: 64)")
  flags.DEFINE_string("runs", ",".join(RUNS), f"comma list among {', '.join(RUNS)}")
  flags.DEFINE_list("seeds", ["0"], "model seeds (init and batch order; the problems stay seed 0's): each seed trains "
                    "every run; with several, the table adds means over seeds and differences to n1 paired by seed")


def main(_):
  a = flags.FLAGS
  q = a.quick
  steps, problems, per_k = a.steps or (6 if q else 1500), a.problems or (2000 if q else 400_000), a.per_k or (64 if q else 1000)
  runs = QUICK_RUNS if q else {}
  if not q:
    unknown = [r for r in a.runs.split(",") if r not in RUNS]
    if unknown or not 1 <= a.train_ops <= a.test_ops:
      raise SystemExit(f"error: --runs={a.runs} --train_ops={a.train_ops} --test_ops={a.test_ops}: runs are among "
                       f"{', '.join(RUNS)} and 1 <= train_ops <= test_ops")
    runs = {r: RUNS[r] for r in a.runs.split(",")}
  name = "poly_arithmetic_quick" if q else "poly_arithmetic"
  root = os.path.abspath(a.workdir or os.path.join("workdirs", name))
  corpus = os.path.join(root, f"problems_seed0_{problems}_ops{a.train_ops}.jsonl")
  rng = random.Random(0)
  write_texts(corpus, lambda: (poly_ring.problem(rng, rng.randint(1, a.train_ops))[0] for _ in range(problems)))
  with open(corpus) as f:
    seen = {json.loads(line)["text"] for line in f}           # test problems are never training problems

  import jax
  from mtp_jax.dry_run import param_counts
  from mtp_jax.generate import load_workdir
  from mtp_jax.train import train_and_evaluate
  rows = []
  seeds = [int(x) for x in a.seeds]
  for seed, (run_name, shape) in ((seed, run) for seed in seeds for run in runs.items()):
    config = byte_config(corpus, shape[:5], shape[5], steps, seq_len=64 if q else 256, valid_fraction=0.02)
    config.seed = seed
    workdir = os.path.join(root, *([f"seed{seed}"] if seed else []), run_name)   # seed 0: where one seed ran before
    saved = os.path.join(workdir, "poly_row.json")   # a finished run's row: a rerun (e.g. over more seeds) reuses it
    if os.path.exists(saved):
      with open(saved) as f:
        row = json.load(f)
      if (row.get("steps"), row.get("per_k"), row.get("test_ops"), row.get("seed")) == (steps, per_k, a.test_ops, seed):
        rows.append(row)
        continue
    began = time.time()
    train_and_evaluate(config, workdir)
    valid = last_valid(workdir)
    _, _, seconds = train_curve(workdir, config.train.batch_size * config.data.seq_len)
    row = {"run": run_name, "seed": seed, "n": shape[5], "d_model": shape[0], "n_layers": shape[1],
           "params": param_counts(load_workdir(workdir)[0])["params_total"], "steps": valid["step"],
           "valid_next_token_loss": valid["head_losses"][0], "train_seconds": round(seconds[-1], 1),
           "by_k": accuracy_by_k(workdir, a.test_ops, per_k, seen)}
    row.update(wall_seconds=round(time.time() - began, 1), per_k=per_k, test_ops=a.test_ops)
    rows.append(row)
    with open(saved + ".tmp", "w") as f:
      json.dump(row, f)
    os.replace(saved + ".tmp", saved)
    print(f"{run_name} seed {seed}: exact match by k {[round(x['exact_match'], 3) for x in row['by_k']]} "
          f"({time.time() - began:.0f}s)", flush=True)

  device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
  ks = range(1, a.test_ops + 1)
  md = [f"# Polynomial arithmetic in F_7[X]/(X^5){' (quick: toy sizes, not a measurement)' if q else ''}", "",
        f"Command: `python experiments/findings/poly_arithmetic.py {' '.join(sys.argv[1:])}`; {device}; {problems} generated "
        f"training problems (seed 0) with 1-{a.train_ops} operations, bytes, {'/'.join(sorted({str(r['steps']) for r in rows}))} steps of 8 x {config.data.seq_len} "
        f"bytes per run, model seeds {', '.join(map(str, seeds))}; parallel transformer heads under parity. Test: {per_k} fresh problems (seed 1, none "
        f"in the training corpus) per number of operations k; k > {a.train_ops} is out of domain. Cells: answer exact "
        f"match (all 5 coefficients: what greedy decoding would write) / per-coefficient accuracy (teacher-forced: "
        f"each coefficient given the right ones before it; chance 0.143). Wall-clock of this invocation: "
        f"{sum(r['wall_seconds'] for r in rows) / 60:.0f} min.", "",
        "| run | seed | d_model x layers | params | n | valid loss | train s | " + " | ".join(
            f"k={k}{'' if k <= a.train_ops else ' (ood)'}" for k in ks) + " |",
        "|---|---:|---|---:|---:|---:|---:|" + "---:|" * len(ks)]
  for r in rows:
    md.append(f"| {r['run']} | {r['seed']} | {r['d_model']} x {r['n_layers']} | {r['params']:,} | {r['n']} | "
              f"{r['valid_next_token_loss']:.4f} | {r['train_seconds']:.0f} | " + " | ".join(
                  f"{x['exact_match']:.3f} / {x['coefficient_accuracy']:.3f}" for x in r["by_k"]) + " |")
  summary = seeds_summary(rows, a.train_ops) if len(seeds) > 1 else []
  md += summary_lines(summary, seeds)
  md += ["", "Paper (Gloeckle et al. 2024, Figure 8): n = 2 and n = 4 answer more problems correctly than n = 1 at "
         "every number of operations, most clearly out of domain, and tripling the model size helps less than the "
         "extra heads.", "", f"![accuracy by number of operations]({name}.png)"]
  write_results(name, {"quick": q, "device": device, "steps": steps, "problems": problems, "train_ops": a.train_ops,
                       "test_ops": a.test_ops, "per_k": per_k, "seeds": seeds, "rows": rows, "summary": summary},
                md, a.out_dir)


if __name__ == "__main__":
  define_flags()
  app.run(main)
