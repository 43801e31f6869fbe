"""Where a decode step's time goes, and what the streamed attention of a cached step saves.

    python experiments/speed/decode_profile.py --workdir=workdirs/default       # ~2 min on 2 CPU cores
    python experiments/speed/decode_profile.py --quick --out_dir=/tmp/x         # toy model, seconds (a test runs it)

For batch sizes 1, 4 and 16 and both argmax modes (greedy: one token per step; speculative: a block of
n tokens, verified), the decode loop's own step (`decode.step`, iterated `--iters` times in one
compiled program from a prefilled state, with the cache sized as `decode.run` sizes it) is built twice:

    einsum    q @ K and probs @ V as dot_generals over the whole cache (attention.DECODE_MAX_QUERIES = 0,
              CACHE_WINDOW = 0)
    stream    the default: probs x V as a fused multiply-reduce (q @ K a dot) over the cache window that holds the
              batch's furthest query (the steps start at the prompts' end, where the window is small;
              whole generations, whose window grows, are timed by experiments/speed/decode_attention.py)

The two are timed interleaved (median of `--repeats`), so load on a shared machine hits both alike,
and each is profiled once with `jax.profiler`: the device ops' time is summed by the JAX operation
they come from (HLO metadata op_name), which names the part of the model that spends it.
Writes experiments/speed/results/<out_name>.md and .json.
"""
import os
import statistics
import sys
import time

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # experiments/, for common/

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import results_io  # noqa: E402
from common.profiling import profile, top  # noqa: E402
from mtp_jax import attention, decode  # noqa: E402
from mtp_jax.model import ModelArgs, MTPTransformer, build_model, init_params  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "workdirs/default", "A run whose model to profile (its weights are used; "
                               "a step's cost does not depend on their values).")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Instead of --workdir: a recipe, randomly initialised.")
_BATCHES = flags.DEFINE_list("batch_sizes", ["1", "4", "16"], "Batch sizes.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "Prompt tokens (the prefill before the timed steps).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "Sizes the cache as a generation of this many tokens would.")
_ITERS = flags.DEFINE_integer("iters", 50, "Steps per timed program.")
_REPEATS = flags.DEFINE_integer("repeats", 9, "Timed runs of each program (interleaved).")
_TOP = flags.DEFINE_integer("top", 6, "Operations listed per profile.")
_QUICK = flags.DEFINE_bool("quick", False, "configs/tiny.py at random init, batch 2, a few steps: a smoke test.")
_OUT_DIR = flags.DEFINE_string("out_dir", results_io.results_folder(__file__), "Where the results files go.")
_OUT = flags.DEFINE_string("out_name", "decode_profile", "Results file stem (--quick appends _quick).")

PATHS = {"einsum": (0, 0), "stream": (attention.DECODE_MAX_QUERIES, attention.CACHE_WINDOW)}   # (max queries, window)


def load(quick: bool):
  """(params, config, origin)."""
  if quick or _CONFIG.value is not None:
    from mtp_jax.recipes import tiny
    config = tiny.get_config() if quick else _CONFIG.value
    params = jax.jit(lambda k: init_params(build_model(config.model), k))(jax.random.key(0))
    return params, config, "random init"
  from mtp_jax.generate import load_workdir
  params, config, _ = load_workdir(_WORKDIR.value)
  return params, config, _WORKDIR.value


def step_program(params, args: ModelArgs, mode: str, batch: int, path: str, iters: int):
  """The compiled loop of `iters` decode steps from a prefilled state, and its arguments."""
  model, sp = MTPTransformer(args), decode.SamplingParams.of()
  settings = decode.Settings(mode, _MAX_NEW.value, args.n_future)
  rng = np.random.default_rng(batch)
  tokens = jnp.asarray(rng.integers(0, args.vocab_size, (batch, _PROMPT_LEN.value)), jnp.int32)
  lengths = jnp.full((batch,), _PROMPT_LEN.value, jnp.int32)
  saved = attention.DECODE_MAX_QUERIES, attention.CACHE_WINDOW
  attention.DECODE_MAX_QUERIES, attention.CACHE_WINDOW = PATHS[path]
  try:   # read while tracing: each program keeps the path it was traced with
    w = jax.jit(lambda p: decode.decode_weights(p, args, settings.heads_run))(params)
    state = jax.jit(lambda w: decode.prefill(model, w, settings, sp, tokens, lengths, jax.random.key(0)))(w)
    loop = jax.jit(lambda w, s: jax.lax.fori_loop(0, iters, lambda i, s: decode.step(model, w, settings, sp, s), s))
    compiled = loop.lower(w, state).compile()
  finally:
    attention.DECODE_MAX_QUERIES, attention.CACHE_WINDOW = saved
  return compiled, (w, state)


def main(_):
  quick = _QUICK.value
  params, config, origin = load(quick)
  args = ModelArgs.from_config(config.model)
  batches = [2] if quick else [int(b) for b in _BATCHES.value]
  iters, repeats = (4, 2) if quick else (_ITERS.value, _REPEATS.value)
  device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
  rows, t_start = [], time.time()
  for b in batches:
    for mode in ("greedy", "speculative"):
      programs = {p: step_program(params, args, mode, b, p, iters) for p in PATHS}
      times = {p: [] for p in PATHS}
      for fn, inputs in programs.values():
        jax.block_until_ready(fn(*inputs))       # warm up
      for _ in range(repeats):
        for p, (fn, inputs) in programs.items():
          t0 = time.perf_counter()
          jax.block_until_ready(fn(*inputs))
          times[p].append((time.perf_counter() - t0) / iters * 1e3)
      ms = {p: statistics.median(t) for p, t in times.items()}
      ops = {p: profile(fn, inputs, iters) for p, (fn, inputs) in programs.items()}
      rows.append({"batch": b, "mode": mode, "step_ms": ms, "ratio": ms["einsum"] / ms["stream"], "ops_ms": ops})
      print(f"batch {b:3d} {mode:11s}: einsum {ms['einsum']:.3f} ms, stream {ms['stream']:.3f} ms per step "
            f"({ms['einsum'] / ms['stream']:.2f}x)", flush=True)

  cache = _PROMPT_LEN.value + _MAX_NEW.value + args.n_future
  model_desc = (f"n_future={args.n_future}, head_type={args.head_type}, d_model={args.d_model}, "
                f"n_layers={args.n_layers}, n_heads={args.n_heads}/{args.n_kv_heads} kv, vocab={args.vocab_size}")
  result = {"device": device, "model": model_desc, "weights": origin, "cache_slots": cache, "iters": iters,
            "repeats": repeats, "wall_s": time.time() - t_start, "rows": rows}
  lines = ["# A decode step's time, by operation", "",
           f"{device}; {model_desc}; weights: {origin}; a cache of {cache} slots ({_PROMPT_LEN.value}-token prompts, "
           f"room for {_MAX_NEW.value} new tokens); the decode loop's own step, {iters} per program, medians of "
           f"{repeats} interleaved runs. einsum: q @ K and probs @ V as dots over the whole cache; "
           f"stream: probs x V as a fused multiply-reduce (q @ K a dot) over the window of {attention.CACHE_WINDOW}-slot multiples that "
           f"holds the batch's furthest query (the default; the steps start at the prompts' end, where the "
           f"window is small: decode_attention.md times whole generations).", "",
           "| batch | mode | einsum ms/step | stream ms/step | einsum / stream | speculative / greedy step, stream |",
           "|---:|---|---:|---:|---:|---:|"]
  step = {(r["batch"], r["mode"]): r["step_ms"] for r in rows}
  for r in rows:
    c = step[(r["batch"], "speculative")]["stream"] / step[(r["batch"], "greedy")]["stream"]
    c = f"{c:.2f}" if r["mode"] == "speculative" else ""
    lines.append(f"| {r['batch']} | {r['mode']} | {r['step_ms']['einsum']:.3f} | {r['step_ms']['stream']:.3f} | "
                 f"{r['ratio']:.2f} | {c} |")
  lines += ["", f"Where the time goes (profiled, ms per step summed over the {args.n_layers} layers, top {_TOP.value} "
            "operations of each program; the rest is the other operations):", ""]
  for r in rows:
    for p in PATHS:
      total = sum(r["ops_ms"][p].values())
      lines.append(f"- batch {r['batch']} {r['mode']}, {p} ({total:.2f} ms profiled): "
                   + "; ".join(f"`{op}` {v:.2f}" for op, v in top(r["ops_ms"][p], _TOP.value)))
  flags_used = " ".join(a for a in sys.argv[1:] if not a.startswith("--out_dir"))
  lines += ["", f"Wall-clock: {result['wall_s']:.0f} s. Command: `python experiments/speed/decode_profile.py {flags_used}`"]
  out_name = _OUT.value + ("_quick" if quick else "")
  results_io.write_results(out_name, result, lines, _OUT_DIR.value)


if __name__ == "__main__":
  app.run(main)
