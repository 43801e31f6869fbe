"""Mehra et al. 2025: predict token t+2 with a next-token model by marginalising over t+1, against MTP heads.

    python experiments/findings/marginalisation.py --n1=workdirs/frozen_heads/n1 \
        --mtp=workdirs/frozen_heads/n4,workdirs/frozen_heads/frozen,workdirs/frozen_heads/joint
    python experiments/findings/marginalisation.py --pool=marginalisation_seed0,marginalisation_seed1,... \
        --out_name=marginalisation_seeds     # the per-seed results above, summarised over seeds
    python experiments/findings/marginalisation.py --quick      # imports the tiny HF fixture twice (CI; measures nothing)

The full run reuses the models of experiments/findings/frozen_heads.py (run that first); this script only
evaluates.

Every predictor reads the same --windows validation windows of --length tokens (whole, non-overlapping, drawn
with a fixed seed) and is scored on x_{t+2} at every position t of a window that has at least --context tokens
before x_{t+1} (t = context-1 .. length-3), seeing x_0..x_t of its window:

- marginalised n=1 model, top-k (k in --k; `all` = the whole vocabulary):
  p(x_{t+2}) = sum_{c in top-k of p(x_{t+1})} p(c) p(x_{t+2} | x_0..x_t, c) / sum_{c in top-k} p(c).
  The window goes through the model once to fill a KV cache; then, for each t, one forward pass over the block
  [x_t, c_1, ..., c_k] at cache slot t, every candidate a child of x_t (the decode loop's tree attention:
  decode/tree.py), gives all k conditionals at once. That is k + 1 forwarded tokens per prediction instead
  of k rows of the whole context.
- head 2 of each MTP model (`--mtp`): one forward pass over the window, no extra positions;
- for reference, the n=1 model's own next-token accuracy (head 1) on x_{t+1}.

Reported: t+2 accuracy (argmax), t+2 negative log-likelihood (nats), extra forward positions per prediction,
wall-clock seconds of each predictor (compiled beforehand), and each head 2 against the widest marginal,
paired over the same positions with a bootstrap interval that resamples whole windows (positions of one window
are not independent). Writes experiments/findings/results/marginalisation[_quick].{md,json,png}.
"""
import json
import os
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # experiments/, for common/

from common.results_io import results_folder, write_results  # noqa: E402
from common.seed_stats import interval, mean_pm, separable  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository
BOOTSTRAP = 2000   # resamples of the scored windows


def sample_windows(config, tokenizer, windows: int, length: int, seed: int):
  """[N, length] whole, non-overlapping windows of the validation documents, N = min(windows, all there are)."""
  import ml_collections
  from mtp_jax import data
  streams = [np.asarray(tokenizer.encode(t), np.int32) for t in
             data.Corpus(ml_collections.ConfigDict(config.data.to_dict())).texts("valid")]
  starts = [(i, s) for i, doc in enumerate(streams) for s in range(0, len(doc) - length + 1, length)]
  if not starts:
    raise SystemExit(f"no validation document holds --length={length} tokens")
  rng = np.random.default_rng(seed)
  picked = sorted(rng.choice(len(starts), size=min(windows, len(starts)), replace=False))
  return np.stack([streams[starts[j][0]][starts[j][1]:starts[j][1] + length] for j in picked])


def head_probs(params, config):
  """f(windows [N, L]) -> every head's probabilities [n, N, L, V] (float32), one window per call."""
  import jax
  import jax.numpy as jnp
  from mtp_jax.model import build_model
  model = build_model(config.model)
  step = jax.jit(lambda p, t: jax.nn.softmax(model.apply({"params": p}, t)[0].astype(jnp.float32), -1))
  return lambda windows: np.concatenate([np.asarray(step(params, jnp.asarray(w[None]))) for w in windows], axis=1)


def cached_marginal(params, config, k: int, rows: int):
  """f(window [L], p_next [L, V], targets [P], ts [P]) -> (p of the target, argmax) [P] each: the top-k
  marginal of p(x_{t+2}) at positions ts, `rows` positions per forward pass over their [x_t, c_1..c_k] blocks."""
  import jax
  import jax.numpy as jnp
  from mtp_jax.decode import decode_weights, forward_hidden, init_decode_cache, unembed
  from mtp_jax.model import build_model
  model = build_model(config.model)
  args = model.args
  weights = decode_weights(params, args, n_heads=1)
  depth = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.ones((k,), jnp.int32)])
  # Slot 0 (x_t) sees itself; candidate i sees x_t and itself: siblings never see each other.
  ancestors = jnp.eye(k + 1, dtype=bool).at[:, 0].set(True)

  @jax.jit
  def prefill(w, window):
    tokens = jnp.broadcast_to(window, (rows,) + window.shape)
    positions = jnp.broadcast_to(jnp.arange(window.shape[0]), tokens.shape)
    cache = init_decode_cache(args, rows, window.shape[0] + k + 1, 1)
    return forward_hidden(model, w, tokens, positions, cache, jnp.zeros((rows,), jnp.int32), prefill=True)[1]

  @jax.jit
  def branch(w, cache, window, p_next, targets, ts):
    weight, cands = jax.lax.top_k(p_next, k)                                   # [R, k]
    block = jnp.concatenate([window[ts][:, None], cands], axis=1)             # [R, k + 1]
    hidden, _ = forward_hidden(model, w, block, ts[:, None] + depth[None], cache, ts, tree=(ts, ancestors))
    q = jax.nn.softmax(unembed(model, w.params, hidden[0][:, 1:]), -1)       # [R, k, V]
    marginal = jnp.einsum("rk,rkv->rv", weight, q) / weight.sum(-1, keepdims=True)
    return jnp.take_along_axis(marginal, targets[:, None], 1)[:, 0], jnp.argmax(marginal, -1)

  def run(window, p_next, targets, ts):
    cache = prefill(weights, jnp.asarray(window))
    out_p, out_arg = [], []
    for i in range(0, len(ts), rows):
      idx = np.arange(i, i + rows).clip(max=len(ts) - 1)                      # the last batch repeats its end
      p, arg = branch(weights, cache, jnp.asarray(window), jnp.asarray(p_next[ts[idx]]), jnp.asarray(targets[idx]),
                      jnp.asarray(ts[idx], jnp.int32))
      n = min(rows, len(ts) - i)
      out_p.append(np.asarray(p)[:n])
      out_arg.append(np.asarray(arg)[:n])
    return np.concatenate(out_p), np.concatenate(out_arg)
  return run


def nll_hits(p_target, argmax, target):
  """(hits, nll in nats) per position."""
  return (argmax == target).astype(np.float64), -np.log(np.maximum(p_target, 1e-30))


def score(dist, target):
  """(hits, nll in nats) of distributions [..., V] on targets [...]."""
  return nll_hits(np.take_along_axis(dist, target[..., None], -1)[..., 0], np.argmax(dist, -1), target)


def window_bootstrap(a, b, seed: int = 0) -> tuple:
  """(mean of a - b, 2.5th and 97.5th percentiles of that mean over windows resampled with replacement), for a,
  b [N windows, P positions] scored on the same positions: the windows, not the positions, are the independent
  draws."""
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  per_window = d.mean(axis=1)
  picks = np.random.default_rng(seed).integers(0, len(d), size=(BOOTSTRAP, len(d)))
  means = per_window[picks].mean(axis=1)
  return float(d.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


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
  flags.DEFINE_integer("windows", None, "validation windows scored whole (default 32; quick: 2)")
  flags.DEFINE_integer("length", None, "tokens per window (default 256; quick: 16)")
  flags.DEFINE_integer("context", None, "scored positions have at least this many tokens before x_{t+1} "
                       "(default 32; quick: 4)")
  flags.DEFINE_integer("rows", 8, "positions per forward pass of the marginal")
  flags.DEFINE_integer("seed", 0, "seed of the drawn windows and of the bootstrap")
  flags.DEFINE_string("pool", "", "comma-separated result stems (one per model seed) to summarise over seeds "
                      "instead of evaluating")
  flags.DEFINE_string("out_dir", None, "results directory (default: results/ beside this script)")
  flags.DEFINE_string("out_name", None, "results file stem (default marginalisation[_quick])")


def evaluate(a):
  """(result, markdown) of one n=1 model's marginals and the MTP models' heads 2 on the same positions."""
  from mtp_jax.generate import load_workdir
  windows, length, context = (a.windows or (2 if a.quick else 32), a.length or (16 if a.quick else 256),
                              a.context or (4 if a.quick else 32))
  if not 2 <= context <= length - 2:
    raise app.UsageError(f"--context={context} must lie in [2, --length - 2 = {length - 2}]")
  if a.quick:
    n1_dir, mtp_dirs = quick_workdirs(tempfile.mkdtemp(prefix="marginalisation-"))
  else:
    if not a.n1:
      raise app.UsageError("--n1=WORKDIR is required (or --quick, or --pool)")
    n1_dir, mtp_dirs = a.n1, [d for d in a.mtp.split(",") if d]

  params, config, tok = load_workdir(n1_dir)
  # An MTP model may stand in for the n=1 one: its head 1 is marginalised (the joint trunk's own exact marginal).
  base = "n=1" if config.model.n_future == 1 else f"head 1 of {os.path.basename(os.path.normpath(n1_dir))}"
  win = sample_windows(config, tok, windows, length, a.seed)
  ts = np.arange(context - 1, length - 2)
  nxt, after = win[:, ts + 1], win[:, ts + 2]                                  # [N, P] each
  probs = head_probs(params, config)
  probs(win[:1])                                                              # compile before timing
  began = time.perf_counter()
  p_next = probs(win)[0]                                                      # [N, L, V]
  base_s = time.perf_counter() - began
  hits1, nll1 = score(p_next[:, ts], nxt)
  per_position = {}   # predictor -> (hits, nll) [N, P], for the paired intervals
  rows = []
  vocab = config.model.vocab_size
  for k in [vocab if k == "all" else int(k) for k in a.k.split(",")]:
    k = min(k, vocab)
    run = cached_marginal(params, config, k, a.rows)
    run(win[0], p_next[0], after[0, :a.rows], ts[:a.rows])                   # compile before timing
    began = time.perf_counter()
    scored = [nll_hits(*run(win[i], p_next[i], after[i], ts), after[i]) for i in range(len(win))]
    name = f"{base} marginalised, top-{k}" + (" (all)" if k == vocab else "")
    per_position[name] = (np.stack([s[0] for s in scored]), np.stack([s[1] for s in scored]))
    rows.append({"predictor": name, "k": k, "acc_t2": float(per_position[name][0].mean()),
                 "nll_t2": float(per_position[name][1].mean()), "extra_positions": k,
                 "seconds": round(base_s + time.perf_counter() - began, 2)})
  for d in mtp_dirs:
    p, c, _ = load_workdir(d)
    if c.model.n_future < 2 or c.model.vocab_size != vocab:
      raise SystemExit(f"--mtp={d}: needs >= 2 heads and the n=1 model's vocabulary ({vocab})")
    mtp_probs = head_probs(p, c)
    mtp_probs(win[:1])                                                        # compile before timing
    began = time.perf_counter()
    head2 = mtp_probs(win)[1][:, ts]                                          # [N, P, V]: head 2 at t predicts x_{t+2}
    hits, nlls = score(head2, after)
    name = f"head 2 of {os.path.basename(os.path.normpath(d))} (n={c.model.n_future}, {c.model.head_type})"
    per_position[name] = (hits, nlls)
    rows.append({"predictor": name, "k": 0, "acc_t2": float(hits.mean()), "nll_t2": float(nlls.mean()),
                 "extra_positions": 0, "seconds": round(time.perf_counter() - began, 2)})

  # Each MTP head against the widest marginal (the exact one with k = all), paired over the same positions.
  widest = max((r for r in rows if r["k"]), key=lambda r: r["k"], default=None)
  pairs = []
  for r in rows:
    if r["k"] == 0 and widest is not None:
      (h_a, n_a), (h_b, n_b) = per_position[r["predictor"]], per_position[widest["predictor"]]
      pairs.append({"head": r["predictor"], "marginal": widest["predictor"],
                    "nll": window_bootstrap(n_a, n_b, a.seed), "acc": window_bootstrap(h_a, h_b, a.seed)})
  command = "python experiments/findings/marginalisation.py " + " ".join(sys.argv[1:])
  positions = int(win.shape[0] * len(ts))
  result = {"quick": a.quick, "n1": n1_dir, "mtp": mtp_dirs, "windows": int(win.shape[0]), "length": length,
            "context": context, "positions": positions, "seed": a.seed, "vocab": vocab,
            "n1_acc_t1": float(hits1.mean()), "n1_nll_t1": float(nll1.mean()), "rows": rows, "pairs": pairs,
            "bootstrap": BOOTSTRAP, "command": command}
  md = [f"# Predicting x_(t+2): marginalising a next-token model vs MTP heads{' (quick: not a measurement)' if a.quick else ''}",
        "", f"Command: `{command}`", "",
        f"{positions:,} validation positions: every position with at least {context} tokens of context in "
        f"{win.shape[0]} windows of {length} tokens (drawn with seed {a.seed}); every predictor sees the window up to "
        f"x_t. The marginalised model's ({base}) own next-token accuracy on x_(t+1): {hits1.mean():.3f} "
        f"(nll {nll1.mean():.3f}).", "",
        "| predictor | t+2 accuracy | t+2 nll (nats) | extra forward positions | seconds |", "|---|---:|---:|---:|---:|"]
  md += [f"| {r['predictor']} | {r['acc_t2']:.3f} | {r['nll_t2']:.3f} | {r['extra_positions']} | {r['seconds']} |"
         for r in rows]
  if pairs:
    verdict = lambda lo, hi: "separable" if lo > 0 or hi < 0 else "not separable"
    md += ["", f"Each head 2 against the widest marginal, paired over the same positions (mean difference and the "
           f"95% interval of {BOOTSTRAP} bootstrap resamples of the windows):", "",
           "| head 2 - marginal | t+2 nll difference | t+2 accuracy difference |", "|---|---:|---:|"]
    md += [f"| {p['head']} - {p['marginal']} | {p['nll'][0]:+.3f} [{p['nll'][1]:+.3f}, {p['nll'][2]:+.3f}] "
           f"({verdict(*p['nll'][1:])}) | {p['acc'][0]:+.3f} [{p['acc'][1]:+.3f}, {p['acc'][2]:+.3f}] "
           f"({verdict(*p['acc'][1:])}) |" for p in pairs]
  return result, md


def pool(a, out_dir: str):
  """(result, markdown): the per-seed results' paired differences summarised over seeds (mean and t-interval)."""
  stems = [s for s in a.pool.split(",") if s]
  seeds = []
  for s in stems:
    path = os.path.join(out_dir, f"{s}.json")
    if not os.path.exists(path):
      raise SystemExit(f"error: --pool: no results file {path}; run this script for that seed first")
    with open(path) as f:
      seeds.append(json.load(f))
  strip = lambda name: name.split(" (")[0]      # 'head 2 of frozen (n=4, parallel)' -> 'head 2 of frozen'
  summary = {}
  for res in seeds:
    for p in res["pairs"]:
      summary.setdefault(f"{strip(p['head'])} - {p['marginal']}", []).append(p["nll"][0])
  command = "python experiments/findings/marginalisation.py " + " ".join(sys.argv[1:])
  rows = [{"difference": name, "per_seed": vals, "interval": interval(vals)} for name, vals in summary.items()]
  result = {"pool": stems, "positions": [r["positions"] for r in seeds], "rows": rows, "command": command}
  md = ["# Predicting x_(t+2): head 2 against the exact marginal, over model seeds", "", f"Command: `{command}`", "",
        f"One results file per model seed ({', '.join(stems)}), each over its own validation positions "
        f"({', '.join(format(r['positions'], ',') for r in seeds)}). t+2 nll of head 2 minus that of the exact marginal "
        "(nats; positive: the marginal is better); per seed, then the mean ± 95% t-interval over seeds:", "",
        "| head 2 - marginal | per seed | over seeds | verdict |", "|---|---|---:|---|"]
  for r in rows:
    m, h = r["interval"]
    md.append(f"| {r['difference']} | {', '.join(f'{v:+.3f}' for v in r['per_seed'])} | "
              f"{mean_pm(m, h, 3, sign=True)} | {'separable' if separable(m, h) else 'not separable at this budget'} |")
  return result, md


def main(_):
  a = flags.FLAGS
  out_dir = a.out_dir or results_folder(__file__)
  if a.pool:
    result, md = pool(a, out_dir)
    name = a.out_name or "marginalisation_seeds"
  else:
    result, md = evaluate(a)
    name = a.out_name or ("marginalisation_quick" if a.quick else "marginalisation")
  write_results(name, result, md, out_dir)


if __name__ == "__main__":
  define_flags()
  app.run(main)
