"""Where a decode step's time goes, and what the streamed attention of a cached step saves.

    python experiments/speed/decode_profile.py --workdir=workdirs/default       # ~2 min on 2 CPU cores
    python experiments/speed/decode_profile.py --quick --out_dir=/tmp/x         # toy model, seconds (a test runs it)
    python experiments/speed/decode_profile.py --modes=greedy,speculative,tree,bestfirst16 --paths=stream \
        --out_name=decode_profile_trees                                         # where a tree's verify step goes

For batch sizes 1, 4 and 16 and each of --modes (greedy: one token per step; speculative: a block of
n tokens, verified; tree / bestfirst: a tree of the heads' top choices, verified), the decode loop's own
step (`decode.step`, iterated `--iters` times in one compiled program from a prefilled state, with the
cache sized as `decode.run` sizes it) is built with each of --paths:

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
import re
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
from common import results_io  # noqa: E402
from common.drafts import draft_options  # noqa: E402
from common.profiling import profile, top  # noqa: E402
from mtp_jax.errors import exit_with  # noqa: E402
from mtp_jax import attention, decode  # noqa: E402
from mtp_jax.cpu_flags import cpu_model  # noqa: E402
from mtp_jax.model import ModelArgs, MTPTransformer, build_model, init_params  # noqa: E402

PATHS = {"einsum": (0, 0), "stream": (attention.DECODE_MAX_QUERIES, attention.CACHE_WINDOW)}   # (max queries, window)

_WORKDIR = flags.DEFINE_string("workdir", "workdirs/default", "A run whose model to profile (its weights are used; "
                               "a step's cost does not depend on their values).")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Instead of --workdir: a recipe, randomly initialised.")
_BATCHES = flags.DEFINE_list("batch_sizes", ["1", "4", "16"], "Batch sizes.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "Prompt tokens (the prefill before the timed steps).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "Sizes the cache as a generation of this many tokens would.")
_ITERS = flags.DEFINE_integer("iters", 50, "Steps per timed program.")
_REPEATS = flags.DEFINE_integer("repeats", 9, "Timed runs of each program (interleaved).")
_TOP = flags.DEFINE_integer("top", 6, "Operations listed per profile.")
_MODES = flags.DEFINE_list("modes", ["greedy", "speculative"], "Steps to profile: greedy, speculative (a chain of "
                           "n_future-1 drafts), or a tree (speculative with --draft=tree / bestfirst; names as in "
                           "experiments/speed/speculative.py: tree, treeN, bestfirst, bestfirstN, bestfirstNxK).")
_PATHS = flags.DEFINE_list("paths", list(PATHS), "Attention paths to build each step with (einsum, stream).")
_QUICK = flags.DEFINE_bool("quick", False, "configs/tiny.py at random init, batch 2, a few steps: a smoke test.")
_OUT_DIR = flags.DEFINE_string("out_dir", results_io.results_folder(__file__), "Where the results files go.")
_OUT = flags.DEFINE_string("out_name", "decode_profile", "Results file stem (--quick appends _quick).")


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


def settings_of(name: str, args: ModelArgs) -> decode.Settings:
  """A --modes entry as the decode loop's static settings."""
  if name in ("greedy", "speculative"):
    return decode.Settings(name, _MAX_NEW.value, args.n_future)
  kw = draft_options(name)
  if kw["draft"] not in ("tree", "bestfirst"):
    exit_with(f"--modes={name}: use greedy, speculative, tree[N] or bestfirst[N[xK]]")
  try:
    decode.Request("speculative", **kw, flag="--").check_model(args)
  except decode.DecodeError as e:
    exit_with(f"--modes={name}: {e}")
  return decode.Settings("speculative", _MAX_NEW.value, args.n_future, draft=kw["draft"],
                         tree_nodes=kw.get("tree_nodes", 0), tree_top=kw.get("tree_top", 0))


def step_program(params, args: ModelArgs, mode: str, batch: int, path: str, iters: int):
  """The compiled loop of `iters` decode steps from a prefilled state, and its arguments."""
  model, sp = MTPTransformer(args), decode.SamplingParams.of()
  settings = settings_of(mode, args)
  rng = np.random.default_rng(batch)
  tokens = jnp.asarray(rng.integers(0, args.vocab_size, (batch, _PROMPT_LEN.value)), jnp.int32)
  lengths = jnp.full((batch,), _PROMPT_LEN.value, jnp.int32)
  saved = attention.DECODE_MAX_QUERIES, attention.CACHE_WINDOW
  attention.DECODE_MAX_QUERIES, attention.CACHE_WINDOW = PATHS[path]
  try:   # read while tracing: each program keeps the path it was traced with
    w = jax.jit(lambda p: decode.decode_weights(p, args, settings.heads_run, settings.per_head))(params)
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
  paths = [p for p in PATHS if p in _PATHS.value]
  if not paths or set(_PATHS.value) - set(PATHS):
    exit_with(f"--paths={','.join(_PATHS.value)}: choose among {', '.join(PATHS)}")
  for m in _MODES.value:
    settings_of(m, args)          # a bad --modes entry fails before anything compiles
  device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
  rows, t_start = [], time.time()
  for b in batches:
    for mode in _MODES.value:
      programs = {p: step_program(params, args, mode, b, p, iters) for p in paths}
      times = {p: [] for p in paths}
      for fn, inputs in programs.values():
        jax.block_until_ready(fn(*inputs))       # warm up
      for _ in range(repeats):
        for p, (fn, inputs) in programs.items():
          t0 = time.perf_counter()
          jax.block_until_ready(fn(*inputs))
          times[p].append((time.perf_counter() - t0) / iters * 1e3)
      ms = {p: statistics.median(t) for p, t in times.items()}
      ops = {p: profile(fn, inputs, iters) for p, (fn, inputs) in programs.items()}
      rows.append({"batch": b, "mode": mode, "step_ms": ms, "ops_ms": ops,
                   **({"ratio": ms["einsum"] / ms["stream"]} if len(paths) == 2 else {})})
      print(f"batch {b:3d} {mode:11s}: " + ", ".join(f"{p} {ms[p]:.3f} ms" for p in paths) + " per step", flush=True)
  report(rows, args, paths, device, origin, iters, repeats, t_start, quick)


def parts(ops: dict) -> dict:
  """ms per step by part of the step: the layers' matrix products, the rest of the layers (attention,
  norms, cache writes), and what runs outside the layers (drafting, the tree, verification, the cache's
  path commit)."""
  out = {"layer dots": 0.0, "rest of the layers": 0.0, "outside the layers": 0.0}
  for op, v in ops.items():
    in_layer = re.match(r"(vmap\()?(Block|MTPModule)\b", op) is not None   # vmap(Block): stacked heads
    product = in_layer and "dot_general" in op and "->" not in op          # not attention's einsums over the cache
    out["layer dots" if product else "rest of the layers" if in_layer else "outside the layers"] += v
  return out


def report(rows, args, paths, device, origin, iters, repeats, t_start, quick):
  cache = _PROMPT_LEN.value + _MAX_NEW.value + args.n_future
  model_desc = (f"n_future={args.n_future}, head_type={args.head_type}, d_model={args.d_model}, "
                f"n_layers={args.n_layers}, n_heads={args.n_heads}/{args.n_kv_heads} kv, vocab={args.vocab_size}")
  result = {"device": device, "model": model_desc, "weights": origin, "cache_slots": cache, "iters": iters,
            "repeats": repeats, "paths": paths, "wall_s": time.time() - t_start, "rows": rows}
  last = paths[-1]
  lines = ["# A decode step's time, by operation", "",
           f"{device} ({cpu_model()}); {model_desc}; weights: {origin}; a cache of {cache} slots "
           f"({_PROMPT_LEN.value}-token prompts, room for {_MAX_NEW.value} new tokens); the decode loop's own step, "
           f"{iters} per program, medians of {repeats} interleaved runs. einsum: q @ K and probs @ V as dots over "
           f"the whole cache; stream: probs x V as a fused multiply-reduce (q @ K a dot) over the window of "
           f"{attention.CACHE_WINDOW}-slot multiples that holds the batch's furthest query (the default; the steps "
           f"start at the prompts' end, where the window is small: decode_attention.md times whole generations). "
           f"tree / bestfirst: a verify step over the tree's nodes (--draft=tree / bestfirst), its drafting and "
           f"the accepted path's commit to the cache included.", "",
           "| batch | mode | " + " | ".join(f"{p} ms/step" for p in paths)
           + (" | einsum / stream" if len(paths) == 2 else "") + f" | step / greedy step, {last} |",
           "|---:|---|" + "---:|" * (len(paths) + (len(paths) == 2) + 1)]
  step = {(r["batch"], r["mode"]): r["step_ms"] for r in rows}
  for r in rows:
    greedy = step.get((r["batch"], "greedy"))
    c = f"{r['step_ms'][last] / greedy[last]:.2f}" if greedy and r["mode"] != "greedy" else ""
    lines.append(f"| {r['batch']} | {r['mode']} | " + " | ".join(f"{r['step_ms'][p]:.3f}" for p in paths)
                 + (f" | {r['ratio']:.2f}" if "ratio" in r else "") + f" | {c} |")
  lines += ["", f"By part of the step ({last}, profiled ms per step). Layer dots: the layers' q/k/v/o and MLP "
            "products that run as dots (a one-row product is fused into the operation beside it, a norm or an "
            "add, and counts in the rest of the layers); outside the layers: drafting, tree building, verification "
            "and the cache's commit. Profiled times include the profiler's cost per operation, so they can sum to "
            "more than the unprofiled step above.", "",
            "| batch | mode | layer dots | rest of the layers | outside the layers |", "|---:|---|---:|---:|---:|"]
  for r in rows:
    pp = parts(r["ops_ms"][last])
    lines.append(f"| {r['batch']} | {r['mode']} | " + " | ".join(f"{v:.3f}" for v in pp.values()) + " |")
  lines += ["", f"Where the time goes (profiled, ms per step summed over the {args.n_layers} layers, top {_TOP.value} "
            "operations of each program; the rest is the other operations):", ""]
  for r in rows:
    for p in paths:
      total = sum(r["ops_ms"][p].values())
      lines.append(f"- batch {r['batch']} {r['mode']}, {p} ({total:.2f} ms profiled): "
                   + "; ".join(f"`{op}` {v:.2f}" for op, v in top(r["ops_ms"][p], _TOP.value)))
  flags_used = " ".join(a for a in sys.argv[1:] if not a.startswith("--out_dir"))
  lines += ["", f"Wall-clock: {result['wall_s']:.0f} s. Command: `python experiments/speed/decode_profile.py {flags_used}`"]
  out_name = _OUT.value + ("_quick" if quick else "")
  results_io.write_results(out_name, result, lines, _OUT_DIR.value)


if __name__ == "__main__":
  cli.run(main)
