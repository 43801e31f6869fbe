"""Attention implementations side by side: forward + backward time and XLA's planned temporaries.

    python experiments/speed/attention_speed.py          # CPU: ~3 min on 2 cores

Causal self-attention with grouped-query heads (8 query heads, 4 key/value heads, head size 64,
batch 1), for every implementation the backend has (mtp_jax/attention.py), at several lengths;
jit(grad(sum(attention * cotangent))), median of interleaved calls. On CPU this chose the
threshold at which `auto` switches from xla to blockwise (attention.CPU_BLOCKWISE_MIN_QUERIES).
Writes experiments/speed/results/<out_name>.md and .json.
"""
import os
import statistics
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # experiments/, for common/

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from common.results_io import write_results  # noqa: E402
from mtp_jax import attention  # noqa: E402

_LENGTHS = flags.DEFINE_list("lengths", ["256", "1024", "2048", "4096"], "Sequence lengths.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per implementation and length.")
_DTYPE = flags.DEFINE_string("dtype", "", "Compute dtype (default: bfloat16 on accelerators, float32 on CPU).")
_BATCH = flags.DEFINE_integer("batch", 1, "Sequences per call.")
_BLOCKS = flags.DEFINE_list("blocks", [], "Also time the blockwise implementation at these block sizes "
                            "(rows blockwise/B, in XLA loops; plain 'blockwise' is the backend's plan, attention.block_plan).")
_STATIC = flags.DEFINE_list("static_blocks", [], "Also time blockwise at these block sizes with every block pair as "
                            "static code (rows blockwise/B static).")
_LOOPS = flags.DEFINE_bool("loops", False, "Also time blockwise with its blocks always in XLA loops (row "
                           "'blockwise loops'), where the CPU default runs few blocks as static code "
                           "(attention.UNROLL_BLOCKS).")
_OUT = flags.DEFINE_string("out_name", "attention_speed", "Results file stem under experiments/speed/results/.")
for _name in ("lengths", "blocks", "static_blocks"):
  flags.register_validator(_name, lambda values: all(v.isdigit() and int(v) > 0 for v in values),
                           message=f"--{_name} takes positive integers, e.g. --{_name}=64,128")


def main(_):
  backend = jax.default_backend()
  device = f"{jax.devices()[0].device_kind} ({backend})"
  dtype = jnp.dtype(_DTYPE.value or ("float32" if backend == "cpu" else "bfloat16"))
  impls = attention.BACKEND_IMPLS.get(backend, ("xla", "blockwise"))
  rows = []
  for t in map(int, _LENGTHS.value):
    ks = jax.random.split(jax.random.key(t), 4)
    q = jax.random.normal(ks[0], (_BATCH.value, t, 8, 64), dtype)
    k, v = (jax.random.normal(x, (_BATCH.value, 4, t, 64), dtype) for x in ks[1:3])
    ct = jax.random.normal(ks[3], (_BATCH.value, t, 8, 64), dtype)
    pos = jnp.broadcast_to(jnp.arange(t), (_BATCH.value, t))
    seg = jnp.ones((_BATCH.value, t), jnp.int32)
    fns = {}
    # (row name, implementation, None for the backend's plan or the blockwise (block, unroll) to force)
    variants = [(impl, impl, None) for impl in impls] + \
        [(f"blockwise/{b}", "blockwise", (int(b), False)) for b in _BLOCKS.value] + \
        [(f"blockwise/{b} static", "blockwise", (int(b), True)) for b in _STATIC.value] + \
        ([("blockwise loops", "blockwise", (attention.CPU_BLOCK, False))] if _LOOPS.value else [])
    for name, impl, forced in variants:
      if forced:
        attend = lambda *a, forced=forced: attention._blockwise(*a, True, block=forced[0], unroll=forced[1])
      else:
        attend = lambda *a, impl=impl: attention.attend(*a, impl=impl)
      loss = lambda q, k, v, attend=attend: jnp.sum(attend(q, k, v, pos, pos, seg, seg).astype(jnp.float32) * ct)
      fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
      temp = fn.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
      jax.block_until_ready(fn(q, k, v))
      fns[name] = (fn, temp, [])
    for _ in range(_REPEATS.value):
      for impl, (fn, _, times) in fns.items():
        t0 = time.perf_counter()
        jax.block_until_ready(fn(q, k, v))
        times.append(time.perf_counter() - t0)
    for impl, (fn, temp, times) in fns.items():
      rows.append({"seq_len": t, "impl": impl, "seconds": statistics.median(times), "temp_bytes": int(temp),
                   "auto_picks": attention.resolve("auto", t, t, dtype, backend)})
      print(f"T={t:<5} {impl:<15} {rows[-1]['seconds'] * 1e3:8.1f} ms  temp {temp / 2**20:8.1f} MiB", flush=True)
  plan_text = (f"on CPU blocks of {attention.CPU_SHORT_BLOCK} as static code up to {attention.UNROLL_BLOCKS} block "
               f"pairs, else blocks of {attention.CPU_BLOCK} in loops") if backend == "cpu" else \
      f"blocks of {attention.BLOCK} in loops"
  lines = [f"Causal GQA self-attention (batch {_BATCH.value}, 8 query / 4 key-value heads, head size 64, {dtype.name}), "
           f"forward + backward, {device}; median of {_REPEATS.value} interleaved calls; plain blockwise runs "
           f"the backend's plan (attention.block_plan: {plan_text}), blockwise/B blocks of B in XLA loops, blockwise/B static every pair of them as static code"
           + (f", 'blockwise loops' blocks of {attention.CPU_BLOCK} in XLA loops at every length" if _LOOPS.value else "")
           + ".", "",
           "| T | impl | ms | temp MiB | auto picks |", "|---:|---|---:|---:|---|"]
  lines += [f"| {r['seq_len']} | {r['impl']} | {r['seconds'] * 1e3:.1f} | {r['temp_bytes'] / 2**20:.1f} | "
            f"{r['auto_picks']} |" for r in rows]
  flags_used = (f" --batch={_BATCH.value}" if _BATCH.value != 1 else "") + \
      (f" --blocks={','.join(_BLOCKS.value)}" if _BLOCKS.value else "") + (" --loops" if _LOOPS.value else "") + \
      (f" --static_blocks={','.join(_STATIC.value)}" if _STATIC.value else "") + \
      f" --lengths={','.join(_LENGTHS.value)}"
  lines += ["", f"Command: `python experiments/speed/attention_speed.py{flags_used} --out_name={_OUT.value}`"]
  write_results(_OUT.value, {"device": device, "dtype": dtype.name, "batch": _BATCH.value,
                             "block_plan": plan_text, "rows": rows}, lines)


if __name__ == "__main__":
  app.run(main)
