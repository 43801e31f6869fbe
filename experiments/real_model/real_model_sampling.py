"""Speculative sampling is exact on a real pretrained model: SmolLM2-135M with trained draft heads.

    python experiments/real_model/real_model_sampling.py                                   # ~10 min on 2 busy CPU cores
    python experiments/real_model/real_model_sampling.py --workdir=workdirs/smollm2_seq_copy --out_name=real_model_sampling_seq

The unit test tests/test_decode.py::test_speculative_sample_matches_sample checks a random tiny model.
This runs the same check on a trained one: an mtp_jax workdir (experiments/real_model_heads.py writes
it; default SmolLM2-135M-Instruct with 4 parallel heads, heads 2-4 trained), loaded as `generate` loads
a workdir. For each prompt, at temperature 0.7 with top-k 5, the first 3 sampled tokens have at most
5^3 = 125 outcomes, so their exact law is enumerable: teacher-forced forwards of the model over the
prompt followed by every candidate (a, b), each conditional through `decode.adjusted_logprobs`, the
filter the decoder itself applies (as tests/helpers.py `exact_joint` does on the tiny model).

Then --rows rows per prompt are decoded with mode "sample" and with mode "speculative_sample" through
`decode.run` (the library's entry point; EOS off so every row gives 3 tokens), and each mode's 3-token
outcomes are tested against the exact law by a chi-square goodness of fit (cells expecting < 5 pooled, as
tests/helpers.py `chi2_pvalue`; an outcome the law gives probability 0 fails outright). Speculative
sampling drafts token 2 from head 2 and token 3 from head 3 and verifies them, so it must match `sample`'s
law only if both the accept path (min(1, p/q)) and the reject path (resampling max(0, p - q)) are right:
the drafts' acceptance is counted per head, with how many times each path ran.

Power: the law the tokens would follow if every draft were accepted, p1(a) q2(b|a) q3(c|a,b) (heads 2
and 3's distributions after the same filter), is sampled with numpy at the same row count and must be
rejected by the same test (p < 1e-6), as in the unit test. Most of that law's mass falls on outcomes the
exact law excludes, so it fails on its support alone; as a yardstick of a subtler error on the same support,
the smallest relative error of the temperature that the test rejects (p < 1e-4) in 90% of numpy draws at
the same row count is reported too.

Writes experiments/results/<out_name>.md / .json.
"""
import functools
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # experiments/, for common/

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common.results_io import write_results  # noqa: E402
from mtp_jax import decode  # noqa: E402
from mtp_jax.generate import load_workdir  # noqa: E402
from mtp_jax.cpu_flags import cpu_model  # noqa: E402
from mtp_jax.model import build_model  # noqa: E402

# Short hand-written prompts, code and natural language (the heads were trained on code only), of the same
# length in SmolLM2's tokens (6), so the decode programs and the teacher-forced forward compile once for all.
PROMPTS = [
    "with open(filename) as",
    "def fibonacci(n):",
    "It was a dark and stormy",
]

_WORKDIR = flags.DEFINE_string("workdir", "workdirs/smollm2_heads_copy", "mtp_jax workdir with trained draft heads.")
_PROMPTS = flags.DEFINE_multi_string("prompt", None, "Prompts (repeatable); default: the script's three.")
_ROWS = flags.DEFINE_integer("rows", 512, "Sampled rows per prompt and mode (512: ~10 min on 2 busy cores).")
_BATCH = flags.DEFINE_integer("batch", 512, "Rows per decode call (the calls of a mode share one compile).")
_TEMP = flags.DEFINE_float("temperature", 0.7, "Sampling temperature.")
_TOP_K = flags.DEFINE_integer("top_k", 5, "Top-k filter (the exact law enumerates top_k^3 outcomes).")
_DRAFT_HEADS = flags.DEFINE_integer("draft_heads", 3, "Speculative block k: heads 2..k draft. 3: the block is "
                                    "the 3 tokens whose law is tested (a 4th head's draft is of token 4).")
_DRAFT = flags.DEFINE_enum("draft", "chain", ["chain", "auto"], "Drafting scheme (chain: every step drafts "
                           "draft_heads-1 tokens, so every head's accept and reject paths are counted).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the decode calls and the numpy draws.")
_ALPHA = flags.DEFINE_float("alpha", 1e-4, "A mode passes when its p-value is above this (the unit test's bound).")
_OUT = flags.DEFINE_string("out_name", "real_model_sampling", "Results file stem.")

N_TOKENS = 3
POWER_P = 1e-6                          # the unit test's bound for the always-accept law
TEMP_ERRORS = [0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5]
DRAWS = 200


def chi2_pvalue(samples, probs) -> float:
  """Chi-square goodness of fit of outcome ids against probs; cells expecting < 5 are pooled (tests/helpers.py)."""
  from scipy import stats
  n = len(samples)
  counts = np.bincount(samples, minlength=probs.size).astype(float)
  expected = probs.ravel() * n
  small = expected < 5
  obs = np.append(counts[~small], counts[small].sum())
  exp = np.append(expected[~small], expected[small].sum())
  if exp[-1] == 0:
    if obs[-1] > 0:
      return 0.0                       # samples fell on impossible outcomes
    obs, exp = obs[:-1], exp[:-1]
  return float(stats.chi2.sf(np.sum((obs - exp) ** 2 / exp), len(exp) - 1))


@functools.lru_cache(maxsize=None)
def _forward(model, temperature, top_k):
  """jit(params, tokens [R, t+2], t) -> logits and filtered probabilities of every head at positions t-1..t+1,
  [n, R, 3, V] each (one compile per shape)."""
  def fwd(params, x, t):
    logits = model.apply({"params": params}, x)[0][:, :, t - 1:t + 2].astype(jnp.float32)
    return logits, jnp.exp(decode.adjusted_logprobs(logits, temperature, top_k, 1.0))
  return jax.jit(fwd, static_argnums=2)


class Laws:
  """The exact law of the first 3 sampled tokens and the always-accept law, over the outcomes either allows.

  Teacher-forced forwards of the whole model (every head's logits, `model.apply`) over rows `prompt + [a, b]`;
  causality gives each conditional at its position: head 0 at t-1, t, t+1 is p1, p2(.|a), p3(.|a,b); head 2
  (index 1) and head 3 (index 2) at t-1 are the drafts' q2(.|a), q3(.|a,b): parallel or causal heads there
  read the prompt only, sequential modules read a, then b, as they do when drafting.
  """

  def __init__(self, model, params, prompt, temperature, top_k):
    t = len(prompt)
    ahead = model.args.heads.reads_ahead
    fwd = lambda x: _forward(model, temperature, top_k)(params, x, t)
    gaps = []

    def forward(pairs):
      """Over prompt + [a, b] for each pair; rows padded to a multiple of 8 (few compiles)."""
      rows = -(-len(pairs) // 8) * 8
      seqs = np.array([prompt + list(ab) for ab in pairs] + [prompt + list(pairs[0])] * (rows - len(pairs)), np.int32)
      logits, probs = fwd(jnp.asarray(seqs))
      return np.asarray(logits, np.float64), np.asarray(probs, np.float64)

    def law(fw, head, row, pos):
      """The filtered distribution {token: prob} and its logits {token: logit}; head 0's top-k margin recorded."""
      logits, probs = fw[0][head, row, pos], fw[1][head, row, pos]
      if head == 0:
        top = np.sort(logits)[::-1][:top_k + 1]
        gaps.append(float(top[top_k - 1] - top[top_k]))
      keep = np.flatnonzero(probs > 0)
      return {int(i): float(probs[i]) for i in keep}, {int(i): float(logits[i]) for i in keep}

    fw = forward([(0, 0)])
    (p1, l1), (q2_0, _), (q3_0, _) = law(fw, 0, 0, 0), law(fw, 1, 0, 0), law(fw, 2, 0, 0)
    fw = forward([(a, 0) for a in p1])
    p2, l2, q2 = {}, {}, {}
    for i, a in enumerate(p1):
      p2[a], l2[a] = law(fw, 0, i, 1)
      q2[a] = law(fw, 1, i, 0)[0] if ahead else q2_0
    pairs = sorted({(a, b) for a in p1 for b in (set(p2[a]) | set(q2[a]) if ahead else p2[a])})
    fw = forward(pairs)
    p3, l3, q3 = {}, {}, {}
    for i, ab in enumerate(pairs):
      if ab[1] in p2[ab[0]]:
        p3[ab], l3[ab] = law(fw, 0, i, 2)
      q3[ab] = law(fw, 2, i, 0)[0] if ahead else q3_0
    if not ahead:
      q3 = {(a, b): q3_0 for a in p1 for b in q2[a]}
    self.min_topk_gap = min(gaps)
    exact = {(a, b, c): p1[a] * p2[a][b] * p3[(a, b)][c] for a in p1 for b in p2[a] for c in p3[(a, b)]}
    accept = {(a, b, c): p1[a] * q2[a][b] * q3[(a, b)][c] for a in p1 for b in q2[a] for c in q3[(a, b)]}
    # Outcome ids: the exact law's support (most likely first), then the always-accept law's other
    # outcomes, then one cell for everything else (probability 0 under both).
    self.outcomes = sorted(exact, key=exact.get, reverse=True) + sorted(set(accept) - set(exact))
    self.index = {o: i for i, o in enumerate(self.outcomes)}
    self.other = len(self.outcomes)
    self.support = len(exact)
    vec = lambda d: np.array([d.get(o, 0.0) for o in self.outcomes] + [0.0])
    self.exact, self.accept = vec(exact) / sum(exact.values()), vec(accept) / sum(accept.values())
    self.accept_outside = float(self.accept[self.support:].sum())   # always-accept mass the exact law excludes
    self._logits = (l1, l2, l3)
    # First verify step, exactly: P(head 2's draft accepted), P(heads 2 and 3's drafts both accepted).
    ov3 = {ab: sum(min(p3[ab].get(c, 0.0), q) for c, q in q3[ab].items()) for ab in p3 if ab in q3}
    self.first_step_acceptance = [
        sum(p1[a] * min(p2[a].get(b, 0.0), q) for a in p1 for b, q in q2[a].items()),
        sum(p1[a] * min(p2[a].get(b, 0.0), q) * ov3.get((a, b), 0.0) for a in p1 for b, q in q2[a].items())]

  def at_temperature(self, temperature: float) -> np.ndarray:
    """The law of the same 3 tokens sampled at another temperature (same top-k supports), as a vector."""
    l1, l2, l3 = self._logits

    def soft(d):
      x = np.array(list(d.values())) / temperature
      e = np.exp(x - x.max())
      return dict(zip(d, e / e.sum()))
    s1, s2, s3 = soft(l1), {a: soft(d) for a, d in l2.items()}, {ab: soft(d) for ab, d in l3.items()}
    law = [s1[a] * s2[a][b] * s3[(a, b)][c] for a, b, c in self.outcomes[:self.support]]
    return np.array(law + [0.0] * (len(self.outcomes) - self.support + 1))

  def ids(self, tokens: np.ndarray) -> np.ndarray:
    return np.array([self.index.get(tuple(int(x) for x in row[:N_TOKENS]), self.other) for row in tokens])


def sample_rows(params, args, prompt, mode, rows, batch, seed):
  """`rows` rows of `mode` through decode.run, `batch` at a time: (tokens [rows, 3], accepted, proposed, s)."""
  kw = dict(mode=mode, max_new_tokens=N_TOKENS, temperature=_TEMP.value, top_k=_TOP_K.value, eos_id=-1)
  if mode == "speculative_sample":
    kw.update(draft_heads=_DRAFT_HEADS.value, draft=_DRAFT.value)
  toks, acc, prop, forwards = [], [], [], []
  t0 = time.time()
  for i, start in enumerate(range(0, rows, batch)):
    n = min(batch, rows - start)
    tokens, lengths = decode.pad_prompts([prompt] * n, len(prompt))
    out, _ = decode.run(params, args, tokens, lengths, seed=seed + i, **kw)
    if not np.all(out.lengths == N_TOKENS):
      raise RuntimeError(f"{mode}: rows stopped before {N_TOKENS} tokens: {np.unique(out.lengths)}")
    toks.append(out.tokens[:, :N_TOKENS])
    acc.append(out.accepted.sum(0))
    prop.append(out.proposed.sum(0))
    forwards.append(int(np.sum(out.forwards)))
    print(f"  {mode}: {start + n}/{rows} rows, {time.time() - t0:.0f} s", flush=True)
  return np.concatenate(toks), np.sum(acc, 0), np.sum(prop, 0), sum(forwards), time.time() - t0


def acceptance(accepted, proposed) -> list[dict]:
  """Per draft head: drafts verified (every earlier one accepted), accepted, rejected, and the rates."""
  heads, verified = [], proposed[0] if len(proposed) else 0
  for j, (a, p) in enumerate(zip(accepted, proposed)):
    v = int(proposed[0]) if j == 0 else int(accepted[j - 1])
    heads.append({"head": j + 2, "proposed": int(p), "verified": v, "accepted": int(a), "rejected": v - int(a),
                  "rate": float(a / v) if v else float("nan"), "chain_rate": float(a / p) if p else float("nan")})
  del verified
  return heads


def power(laws: Laws, rows: int, rng) -> dict:
  """The always-accept law sampled at `rows` rows and tested; and the smallest relative temperature error (the
  same tokens' law at temperature (1 + d) x --temperature) that the test rejects at --alpha in 90% of draws."""
  p_wrong = chi2_pvalue(rng.choice(laws.exact.size, size=rows, p=laws.accept), laws.exact)
  detected = None
  for d in TEMP_ERRORS:
    wrong = laws.at_temperature(_TEMP.value * (1 + d))
    rejected = np.mean([chi2_pvalue(rng.choice(wrong.size, size=rows, p=wrong), laws.exact) < _ALPHA.value
                        for _ in range(DRAWS)])
    if rejected >= 0.9:
      detected = d
      break
  return {"always_accept_p": p_wrong, "always_accept_mass_outside": laws.accept_outside,
          "temperature_error_detected_90": detected}


def main(_):
  t_start = time.time()
  params, config, tok = load_workdir(_WORKDIR.value)
  model = build_model(config.model)
  args = model.args
  bos = [tok.bos_id] if getattr(tok, "add_bos", True) else []
  texts = _PROMPTS.value or PROMPTS
  rng = np.random.default_rng(_SEED.value)
  runs = []
  for pi, text in enumerate(texts):
    prompt = bos + tok.encode(text)
    t0 = time.time()
    laws = Laws(model, params, prompt, _TEMP.value, _TOP_K.value)
    law_s = time.time() - t0
    print(f"{text!r}: {len(prompt)} tokens, {laws.support} outcomes, exact law in {law_s:.0f} s; "
          f"first-step acceptance {np.round(laws.first_step_acceptance, 3)}", flush=True)
    run = {"prompt": text, "prompt_tokens": prompt, "outcomes": laws.support, "law_s": law_s,
           "min_topk_gap": laws.min_topk_gap, "first_step_acceptance": laws.first_step_acceptance,
           "top_outcomes": [{"tokens": list(o), "text": tok.decode(list(o)), "p": float(laws.exact[i])}
                            for i, o in enumerate(laws.outcomes[:5])], "modes": {}}
    for mi, mode in enumerate(("sample", "speculative_sample")):
      seed = _SEED.value + 1_000_000 * (2 * pi + mi + 1)
      tokens, accepted, proposed, forwards, wall = sample_rows(params, args, prompt, mode, _ROWS.value,
                                                               _BATCH.value, seed)
      ids = laws.ids(tokens)
      p = chi2_pvalue(ids, laws.exact)
      run["modes"][mode] = {"p_value": p, "passed": p > _ALPHA.value, "rows": len(ids),
                            "impossible": int(np.sum(ids == laws.other)),
                            "distinct": int(len(np.unique(ids))), "forwards": forwards, "wall_s": wall,
                            "acceptance": acceptance(accepted, proposed)}
      print(f"  {mode}: p = {p:.3g}, {wall:.0f} s", flush=True)
    run["power"] = power(laws, _ROWS.value, rng)
    print(f"  always-accept law: p = {run['power']['always_accept_p']:.3g}; temperature error detected: "
          f"{run['power']['temperature_error_detected_90']}", flush=True)
    runs.append(run)
  report(config, runs, time.time() - t_start)


def report(config, runs, wall_s):
  m = config.model
  cpu = cpu_model()
  k = _DRAFT_HEADS.value
  result = {"workdir": _WORKDIR.value, "cpu": cpu, "head_type": m.head_type, "n_future": m.n_future,
            "temperature": _TEMP.value, "top_k": _TOP_K.value, "rows": _ROWS.value, "batch": _BATCH.value,
            "draft_heads": k, "draft": _DRAFT.value, "alpha": _ALPHA.value, "power_p": POWER_P, "runs": runs,
            "wall_s": wall_s, "argv": sys.argv[1:]}
  heads = list(range(2, k + 1))
  lines = [f"Speculative sampling against the exact law of the first {N_TOKENS} sampled tokens, on a real model: "
           f"`{_WORKDIR.value}` (SmolLM2-135M-Instruct, {m.n_future} {m.head_type} heads; speculative block "
           f"k={k}, heads {', '.join(map(str, heads))} draft, --draft={_DRAFT.value}); temperature {_TEMP.value}, "
           f"top-k {_TOP_K.value}; {_ROWS.value} rows per prompt and mode; CPU: {cpu}.", "",
           f"p: chi-square goodness of fit of the rows' {N_TOKENS}-token outcomes against the exact law (teacher-"
           f"forced forwards through `decode.adjusted_logprobs`; cells expecting < 5 pooled); a mode passes at "
           f"p > {_ALPHA.value:g}. Acceptance of head i: its drafts accepted / verified (verified: every earlier "
           f"draft of the step accepted), with the counts, over all verify steps of the rows. always-accept p: "
           f"the same test on {_ROWS.value} draws from the law the tokens would follow if every draft were "
           f"accepted (must be < {POWER_P:g}), and its mass on outcomes the exact law excludes. detects T off by: the "
           f"smallest relative error d of the temperature (the law at (1 + d) x {_TEMP.value}) that the test "
           f"rejects at p < {_ALPHA.value:g} in 90% of {DRAWS} numpy draws of {_ROWS.value} rows. Seconds: the "
           f"mode's decode calls on the prompt, the first prompt's with the compile.", "",
           "| prompt | outcomes | sample p | speculative_sample p | "
           + " | ".join(f"head {h} accepted / verified" for h in heads)
           + " | always-accept p (mass outside) | detects T off by | sample s | speculative s |",
           "|---|---:|---:|---:|" + "---:|" * len(heads) + "---:|---:|---:|---:|"]
  for r in runs:
    s, sp = r["modes"]["sample"], r["modes"]["speculative_sample"]
    acc = " | ".join(f"{h['rate']:.3f} ({h['accepted']} / {h['verified']})" for h in sp["acceptance"])
    d = r["power"]["temperature_error_detected_90"]
    lines.append(f"| `{r['prompt']}` | {r['outcomes']} | {s['p_value']:.3f} | {sp['p_value']:.3f} | {acc} | "
                 f"{r['power']['always_accept_p']:.1e} ({r['power']['always_accept_mass_outside']:.2f}) | "
                 f"{f'{d:.0%}' if d is not None else f'> {TEMP_ERRORS[-1]:.0%}'} | "
                 f"{s['wall_s']:.0f} | {sp['wall_s']:.0f} |")
  ok = all(x["passed"] for r in runs for x in r["modes"].values())
  power_ok = all(r["power"]["always_accept_p"] < POWER_P for r in runs)
  rates = [h["rate"] for r in runs for h in r["modes"]["speculative_sample"]["acceptance"]]
  lines += ["", f"Every mode passes: {'yes' if ok else 'NO'}. The always-accept law is rejected on every prompt: "
            f"{'yes' if power_ok else 'NO'}."]
  extreme = [f"`{r['prompt']}` head {h['head']} ({h['rate']:.3f}, {h['accepted']} accepted, {h['rejected']} rejected)"
             for r in runs for h in r["modes"]["speculative_sample"]["acceptance"]
             if not 0.05 < h["rate"] < 0.95]
  if extreme:
    lines.append("Acceptance near 0 or 1 (outside 0.05..0.95), so one path ran rarely there: " + "; ".join(extreme)
                 + ".")
  elif rates:
    lines.append("Every head's acceptance lies within 0.05..0.95: both the accept and the reject path ran often.")
  lines += ["", "Exact first-verify-step acceptance (from the laws: P(head 2 accepted), P(heads 2 and 3 accepted)): "
            + "; ".join(f"`{r['prompt']}` {r['first_step_acceptance'][0]:.3f} / {r['first_step_acceptance'][1]:.3f}"
                        for r in runs)
            + ". Smallest top-k margin (k-th minus next logit) among the conditionals: "
            + ", ".join(f"{r['min_topk_gap']:.3g}" for r in runs) + " (a margin near 0 would let rounding move the "
            "support between the decoder and the teacher-forced forward).", "",
            f"Wall time {wall_s / 60:.1f} min.", "",
            f"Command: `python experiments/real_model/real_model_sampling.py {' '.join(sys.argv[1:])}`"]
  write_results(_OUT.value, result, lines)


if __name__ == "__main__":
  app.run(main)
