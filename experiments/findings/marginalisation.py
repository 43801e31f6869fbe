"""Mehra et al. 2025: predict token t+2 with a next-token model by marginalising over t+1, against MTP heads.

    python experiments/findings/marginalisation.py --n1=workdirs/frozen_heads/n1 \
        --mtp=workdirs/frozen_heads/n4,workdirs/frozen_heads/frozen,workdirs/frozen_heads/joint
    python experiments/findings/marginalisation.py --quick      # imports the tiny HF fixture twice (CI; measures nothing)

The full run reuses the models of experiments/findings/frozen_heads.py (run that first, ~1 h on 2 CPU cores);
this script only evaluates. Its cost is the marginal's: k rows of W+1 tokens per position (no KV
cache is shared between the candidates here), so k = all (258 bytes) at 256 positions and W = 32 is
2.2M forwarded tokens, several minutes on 2 CPU cores; 1,024 positions at W = 64 took over 20.

Every predictor sees the same W-token context x_{t-W+1..t} (W = --window) of a validation document,
at --positions positions drawn with a fixed seed, and is scored on x_{t+2}:

- marginalised n=1 model, top-k (k in --k; `all` = the whole vocabulary):
  p(x_{t+2}) = sum_{c in top-k of p(x_{t+1})} p(c) p(x_{t+2} | context, c) / sum_{c in top-k} p(c).
  Cost: k extra forward positions per prediction with a KV cache (one per candidate); here each
  candidate is its own packed (W+1)-token row, timed as such;
- head 2 of each MTP model (`--mtp`): one forward pass, no extra positions;
- for reference, the n=1 model's own next-token accuracy (head 1) on x_{t+1}.

Reported: t+2 accuracy (argmax), t+2 negative log-likelihood (nats), extra forward positions per
prediction, and the wall-clock seconds of each predictor over all positions (compiled beforehand). Writes
experiments/findings/results/marginalisation[_quick].{md,json,png}.
"""
import os
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # experiments/, for common/

from common.results_io import results_folder, write_results  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository


def sample_contexts(config, tokenizer, positions: int, window: int, seed: int):
  """(contexts [P, W], next [P], after_next [P]) from the validation documents, positions drawn at random."""
  import ml_collections
  from mtp_jax import data
  streams = [np.asarray(tokenizer.encode(t), np.int32) for t in
             data.Corpus(ml_collections.ConfigDict(config.data.to_dict())).texts("valid")]
  starts = [(i, t) for i, s in enumerate(streams) for t in range(window - 1, len(s) - 2)]
  if not starts:
    raise SystemExit(f"no validation document is longer than --window={window} + 2 tokens")
  rng = np.random.default_rng(seed)
  picked = [starts[j] for j in rng.choice(len(starts), size=min(positions, len(starts)), replace=False)]
  ctx = np.stack([streams[i][t - window + 1:t + 1] for i, t in picked])
  return ctx, np.array([streams[i][t + 1] for i, t in picked]), np.array([streams[i][t + 2] for i, t in picked])


def last_position_probs(params, config, rows: int):
  """f(tokens [R, T]) -> each head's probabilities at the last position [n, R, V], jitted, in batches of `rows`."""
  import jax
  import jax.numpy as jnp
  from mtp_jax.model import build_model
  model = build_model(config.model)
  step = jax.jit(lambda p, t: jax.nn.softmax(model.apply({"params": p}, t)[0][:, :, -1].astype(jnp.float32), -1))

  def probs(tokens):
    out = []
    for i in range(0, len(tokens), rows):
      part = tokens[i:i + rows]
      padded = np.concatenate([part, np.repeat(part[-1:], rows - len(part), 0)]) if len(part) < rows else part
      out.append(np.asarray(step(params, jnp.asarray(padded)))[:, :len(part)])
    return np.concatenate(out, axis=1)
  return probs


def score(dist, target):
  """(hits [P], nll [P] in nats) of distributions [P, V] on targets [P], per position."""
  p = dist[np.arange(len(target)), target]
  return (np.argmax(dist, -1) == target).astype(np.float64), -np.log(np.maximum(p, 1e-30))


BOOTSTRAP = 2000   # resamples of the scored positions


def paired_bootstrap(a, b, seed: int = 0) -> tuple:
  """(mean of a - b, 2.5th and 97.5th percentiles of its mean over resampled positions): the same
  resample for both predictors, since every predictor is scored on the same positions."""
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  picks = np.random.default_rng(seed).integers(0, len(d), size=(BOOTSTRAP, len(d)))
  means = d[picks].mean(axis=1)
  return float(d.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def marginalised(probs, ctx, p_next, k: int):
  """p(x_{t+2}) from the top-k candidates for x_{t+1} (renormalised over them): [P, V]."""
  top = np.argsort(-p_next, axis=-1)[:, :k]                                     # [P, k]
  weight = np.take_along_axis(p_next, top, -1)                                  # [P, k]
  rows = np.concatenate([np.repeat(ctx, k, 0), top.reshape(-1, 1)], axis=1)     # [P*k, W+1]
  q = probs(rows)[0].reshape(len(ctx), k, -1)                                   # [P, k, V]
  return np.einsum("pk,pkv->pv", weight, q) / weight.sum(-1, keepdims=True)


def quick_workdirs(root: str):
  """The tiny HF fixture imported as an n=1 model and, with one random extra head, as an n=2 one."""
  from mtp_jax import interop
  src = os.path.join(ROOT, "tests", "fixtures", "pretrained", "hf_gqa_untied")
  n1, n2 = os.path.join(root, "n1"), os.path.join(root, "n2")
  for w, n in ((n1, 1), (n2, 2)):
    if not os.path.exists(w):
      interop.import_checkpoint(src, w, n_future=n, head_init="random")
  return n1, [n2]


def define_flags():
  """The flags (defined when run as a script, so tests can import this module)."""
  flags.DEFINE_bool("quick", False, "the tiny HF fixture imported twice: checks the pipeline")
  flags.DEFINE_string("n1", None, "workdir of the next-token (n=1) model; an MTP model's head 1 is marginalised "
                      "the same way (e.g. the joint model's own exact marginal)")
  flags.DEFINE_string("mtp", "", "comma-separated workdirs of MTP models (head 2 is scored)")
  flags.DEFINE_string("k", "1,4,16,all", "top-k candidates for x_{t+1}; `all` = the whole vocabulary")
  flags.DEFINE_integer("positions", None, "scored positions (default 256; quick: 8)")
  flags.DEFINE_integer("window", None, "context tokens (default 32; quick: 8)")
  flags.DEFINE_integer("rows", 256, "rows per forward batch")
  flags.DEFINE_integer("seed", 0, "seed of the scored positions")
  flags.DEFINE_string("out_dir", None, "results directory (default: results/ beside this script)")
  flags.DEFINE_string("out_name", None, "results file stem (default marginalisation[_quick])")


def main(_):
  a = flags.FLAGS
  from mtp_jax.generate import load_workdir
  positions, window = a.positions or (8 if a.quick else 256), a.window or (8 if a.quick else 32)
  if a.quick:
    n1_dir, mtp_dirs = quick_workdirs(tempfile.mkdtemp(prefix="marginalisation-"))
  else:
    if not a.n1:
      raise app.UsageError("--n1=WORKDIR is required (or --quick)")
    n1_dir, mtp_dirs = a.n1, [d for d in a.mtp.split(",") if d]

  params, config, tok = load_workdir(n1_dir)
  # An MTP model may stand in for the n=1 one: its head 1 is marginalised (the joint trunk's own exact marginal).
  base = "n=1" if config.model.n_future == 1 else f"head 1 of {os.path.basename(os.path.normpath(n1_dir))}"
  ctx, nxt, after = sample_contexts(config, tok, positions, window, a.seed)
  probs = last_position_probs(params, config, a.rows)
  probs(ctx[:1]), probs(np.concatenate([ctx[:1], nxt[:1, None]], 1))   # compile both shapes before timing
  began = time.perf_counter()
  p_next = probs(ctx)[0]
  base_s = time.perf_counter() - began
  hits1, nlls1 = score(p_next, nxt)
  acc1, nll1 = float(hits1.mean()), float(nlls1.mean())
  per_position = {}   # predictor -> (hits, nll) at every position, for the paired intervals
  rows = []
  vocab = config.model.vocab_size
  for k in [vocab if k == "all" else int(k) for k in a.k.split(",")]:
    k = min(k, vocab)
    began = time.perf_counter()
    hits, nlls = score(marginalised(probs, ctx, p_next, k), after)
    name = f"{base} marginalised, top-{k}" + (" (all)" if k == vocab else "")
    per_position[name] = (hits, nlls)
    rows.append({"predictor": name, "k": k, "acc_t2": float(hits.mean()), "nll_t2": float(nlls.mean()),
                 "extra_positions": k,
                 "seconds": round(base_s + time.perf_counter() - began, 2)})
  for d in mtp_dirs:
    p, c, t = load_workdir(d)
    if c.model.n_future < 2 or c.model.vocab_size != vocab:
      raise SystemExit(f"--mtp={d}: needs >= 2 heads and the n=1 model's vocabulary ({vocab})")
    head_probs = last_position_probs(p, c, a.rows)
    head_probs(ctx[:1])                                                  # compile before timing
    began = time.perf_counter()
    head2 = head_probs(ctx)[1]
    hits, nlls = score(head2, after)
    name = f"head 2 of {os.path.basename(os.path.normpath(d))} (n={c.model.n_future}, {c.model.head_type})"
    per_position[name] = (hits, nlls)
    rows.append({"predictor": name, "k": 0, "acc_t2": float(hits.mean()), "nll_t2": float(nlls.mean()),
                 "extra_positions": 0,
                 "seconds": round(time.perf_counter() - began, 2)})

  # Each MTP head against the widest marginal (the exact one with k = all), paired over the same positions.
  widest = max((r for r in rows if r["k"]), key=lambda r: r["k"], default=None)
  pairs = []
  for r in rows:
    if r["k"] == 0 and widest is not None:
      (h_a, n_a), (h_b, n_b) = per_position[r["predictor"]], per_position[widest["predictor"]]
      pairs.append({"head": r["predictor"], "marginal": widest["predictor"],
                    "nll": paired_bootstrap(n_a, n_b, a.seed), "acc": paired_bootstrap(h_a, h_b, a.seed)})
  name = a.out_name or ("marginalisation_quick" if a.quick else "marginalisation")
  command = "python experiments/findings/marginalisation.py " + " ".join(sys.argv[1:])
  result = {"quick": a.quick, "n1": n1_dir, "mtp": mtp_dirs, "positions": len(ctx), "window": window,
            "seed": a.seed, "vocab": vocab, "n1_acc_t1": acc1, "n1_nll_t1": nll1, "rows": rows, "pairs": pairs,
            "bootstrap": BOOTSTRAP, "command": command}
  md = [f"# Predicting x_(t+2): marginalising a next-token model vs MTP heads{' (quick: not a measurement)' if a.quick else ''}",
        "", f"Command: `{command}`", "",
        f"{len(ctx)} validation positions (seed {a.seed}), each with the same {window}-token context for every "
        f"predictor. The marginalised model's ({base}) own next-token accuracy on x_(t+1): {acc1:.3f} "
        f"(nll {nll1:.3f}).", "",
        "| predictor | t+2 accuracy | t+2 nll (nats) | extra forward positions | seconds |", "|---|---:|---:|---:|---:|"]
  md += [f"| {r['predictor']} | {r['acc_t2']:.3f} | {r['nll_t2']:.3f} | {r['extra_positions']} | {r['seconds']} |"
         for r in rows]
  if pairs:
    verdict = lambda lo, hi: "separable" if lo > 0 or hi < 0 else "not separable"
    md += ["", f"Each head 2 against the widest marginal, paired over the same positions (mean difference and the "
           f"95% interval of {BOOTSTRAP} bootstrap resamples of the positions):", "",
           "| head 2 - marginal | t+2 nll difference | t+2 accuracy difference |", "|---|---:|---:|"]
    md += [f"| {p['head']} - {p['marginal']} | {p['nll'][0]:+.3f} [{p['nll'][1]:+.3f}, {p['nll'][2]:+.3f}] "
           f"({verdict(*p['nll'][1:])}) | {p['acc'][0]:+.3f} [{p['acc'][1]:+.3f}, {p['acc'][2]:+.3f}] "
           f"({verdict(*p['acc'][1:])}) |" for p in pairs]
  write_results(name, result, md, a.out_dir or results_folder(__file__))


if __name__ == "__main__":
  define_flags()
  app.run(main)
