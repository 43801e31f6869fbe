"""A cached decode step's attention, five ways, timed over whole generations side by side.

    python experiments/speed/decode_attention.py --workdir=workdirs/default      # ~6 min on 2 CPU cores
    python experiments/speed/decode_attention.py --quick --out_dir=/tmp/x        # toy model, seconds (a test runs it)

The paths (attention.py's switches, read while tracing, so each compiled program keeps its own):

    dots      q @ K and probs @ V as dot_generals over the whole cache
    stream    probs x V as a fused multiply-reduce over the whole cache
    stream_qk both products as multiply-reduces over the whole cache
    window    stream's products over the first multiple of attention.CACHE_WINDOW slots that holds
              the batch's furthest query (the default)
    window_qk stream_qk's products over that window

Each program is the whole `decode.decode` loop (prefill, steps, compaction) on the same prompts, for
batch sizes 1, 4 and 16 and both argmax modes; EOS off, so every path does the same steps. The five
run back to back in each repeat (median of `--repeats`), so load on a shared machine hits all alike,
and their tokens are compared. Writes experiments/speed/results/<out_name>.md and .json.
"""
import os
import statistics
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # experiments/, for common/

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import results_io  # noqa: E402
from mtp_jax import attention, decode  # noqa: E402
from mtp_jax.model import ModelArgs, MTPTransformer, build_model, init_params  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "workdirs/default", "A trained run (its acceptance sets how many "
                               "steps speculative takes).")
_BATCHES = flags.DEFINE_list("batch_sizes", ["1", "4", "16"], "Batch sizes.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "Prompt tokens (random ids: every path sees the same).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "Tokens generated per row.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs of each program (interleaved).")
_QUICK = flags.DEFINE_bool("quick", False, "configs/tiny.py at random init, batch 2, 24 tokens: a smoke test.")
_OUT_DIR = flags.DEFINE_string("out_dir", results_io.results_folder(__file__), "Where the results files go.")
_OUT = flags.DEFINE_string("out_name", "decode_attention", "Results file stem (--quick appends _quick).")

# (DECODE_MAX_QUERIES, STREAM_SCORES, CACHE_WINDOW) for each path
PATHS = {"dots": (0, False, 0), "stream": (attention.DECODE_MAX_QUERIES, False, 0),
         "stream_qk": (attention.DECODE_MAX_QUERIES, True, 0),
         "window": (attention.DECODE_MAX_QUERIES, False, attention.CACHE_WINDOW),
         "window_qk": (attention.DECODE_MAX_QUERIES, True, attention.CACHE_WINDOW)}


def load(quick: bool):
  """(params, args, origin)."""
  if quick:
    from mtp_jax.recipes import tiny
    config = tiny.get_config()
    params = jax.jit(lambda k: init_params(build_model(config.model), k))(jax.random.key(0))
    return params, ModelArgs.from_config(config.model), "random init"
  from mtp_jax.generate import load_workdir
  params, config, _ = load_workdir(_WORKDIR.value)
  return params, ModelArgs.from_config(config.model), _WORKDIR.value


def program(params, args: ModelArgs, mode: str, tokens, max_new: int, path: str):
  """The compiled decode of `tokens` with `path`'s attention: a function of nothing, returning tokens."""
  settings = decode.Settings(mode, max_new, args.n_future)
  lengths = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32)
  sp, key = decode.SamplingParams.of(), jax.random.key(0)
  saved = attention.DECODE_MAX_QUERIES, attention.STREAM_SCORES, attention.CACHE_WINDOW
  attention.DECODE_MAX_QUERIES, attention.STREAM_SCORES, attention.CACHE_WINDOW = PATHS[path]
  try:
    w = jax.jit(lambda p: decode.decode_weights(p, args, settings.heads_run))(params)
    loop = jax.jit(lambda *xs: decode.decode(*xs, model=MTPTransformer(args), settings=settings))
    compiled = loop.lower(w, tokens, lengths, key, sp).compile()
  finally:
    attention.DECODE_MAX_QUERIES, attention.STREAM_SCORES, attention.CACHE_WINDOW = saved
  return lambda: compiled(w, tokens, lengths, key, sp).tokens


def main(_):
  quick = _QUICK.value
  params, args, origin = load(quick)
  batches = [2] if quick else [int(b) for b in _BATCHES.value]
  max_new, prompt_len, repeats = (24, 16, 2) if quick else (_MAX_NEW.value, _PROMPT_LEN.value, _REPEATS.value)
  device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
  rows, t_start = [], time.time()
  for b in batches:
    tokens = jnp.asarray(np.random.default_rng(b).integers(0, args.vocab_size, (b, prompt_len)), jnp.int32)
    for mode in ("greedy", "speculative"):
      fns = {p: program(params, args, mode, tokens, max_new, p) for p in PATHS}
      outs = {p: np.asarray(jax.device_get(f())) for p, f in fns.items()}     # compile + warm up
      times = {p: [] for p in PATHS}
      for _ in range(repeats):
        for p, f in fns.items():
          t0 = time.perf_counter()
          jax.block_until_ready(f())
          times[p].append(time.perf_counter() - t0)
      ms = {p: statistics.median(t) * 1e3 for p, t in times.items()}
      same = all(np.array_equal(outs["dots"], o) for o in outs.values())
      rows.append({"batch": b, "mode": mode, "ms": ms, "identical": same})
      print(f"batch {b:3d} {mode:11s}: " + ", ".join(f"{p} {v:.0f} ms" for p, v in ms.items())
            + f", identical={same}", flush=True)

  cache = prompt_len + max_new + args.n_future
  model_desc = (f"n_future={args.n_future}, head_type={args.head_type}, d_model={args.d_model}, "
                f"n_layers={args.n_layers}, n_heads={args.n_heads}/{args.n_kv_heads} kv, vocab={args.vocab_size}")
  result = {"device": device, "model": model_desc, "weights": origin, "cache_slots": cache,
            "cache_window": attention.CACHE_WINDOW, "max_new_tokens": max_new, "repeats": repeats,
            "wall_s": time.time() - t_start, "rows": rows}
  lines = ["# A decode step's attention: dots, streamed, windowed", "",
           f"{device}; {model_desc}; weights: {origin}; {prompt_len}-token prompts, {max_new} new tokens per row "
           f"(EOS off), a cache of {cache} slots; the whole compiled decode, medians of {repeats} interleaved runs "
           f"(ms per generation). dots: q @ K and probs @ V as dots over the whole cache; stream: probs x V as a "
           f"multiply-reduce; stream_qk: both as multiply-reduces; window: stream over windows of "
           f"{attention.CACHE_WINDOW} slots (the default); window_qk: stream_qk over them.", "",
           "| batch | mode | dots ms | stream ms | stream_qk ms | window ms | window_qk ms | dots / window | "
           "stream / stream_qk | stream / window | identical tokens |",
           "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
  for r in rows:
    ms = r["ms"]
    lines.append(f"| {r['batch']} | {r['mode']} | {ms['dots']:.0f} | {ms['stream']:.0f} | {ms['stream_qk']:.0f} | "
                 f"{ms['window']:.0f} | {ms['window_qk']:.0f} | {ms['dots'] / ms['window']:.2f} | "
                 f"{ms['stream'] / ms['stream_qk']:.2f} | "
                 f"{ms['stream'] / ms['window']:.2f} | "
                 f"{'yes' if r['identical'] else 'NO'} |")
  flags_used = " ".join(a for a in sys.argv[1:] if not a.startswith("--out_dir"))
  lines += ["", f"Wall-clock: {result['wall_s']:.0f} s. Command: `python experiments/speed/decode_attention.py {flags_used}`"]
  results_io.write_results(_OUT.value + ("_quick" if quick else ""), result, lines, _OUT_DIR.value)


if __name__ == "__main__":
  app.run(main)
