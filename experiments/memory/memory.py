"""Train-step memory of the multi-token loss: naive vs scan-over-heads vs scan + chunked cross-entropy.

    python experiments/memory/memory.py                      # CPU: ~5 min on 2 cores
    python experiments/memory/memory.py --out_name=memory_gpu  # on a GPU machine, its own table

For vocabulary 32000 and a sequence long enough that logits dominate, compiles the whole train
step (forward, backward, AdamW update) for n in {1, 2, 4, 8} heads x impl, and reads XLA's planned
temp memory. The trunk is the same for every n (parity off: heads are added on top) and is
rematerialised (remat=full, as any large run would be, so its B x H x T^2 attention matrices are not
all kept), so the differences are the heads' cost. Then times real train steps n=4 vs n=1 side by side (interleaved,
median) for this shape and for configs/default.py:sp (parallel transformer heads under parity: the
paper's protocol; the byte-level default's linear heads are not layers, so parity does not apply).
The same for DeepSeek-V3's sequential MTP modules, D in {1, 2, 4} (n_future = D + 1): the
scan carries h^(k-1) from module to module, so its memory must stay at one module's logits too.
Writes experiments/memory/results/<out_name>.md and .json.
"""
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # experiments/, for common/

import jax  # noqa: E402

from common.results_io import write_results  # noqa: E402
from common.step_timing import interleaved_step_seconds  # noqa: E402
from mtp_jax import sharding  # noqa: E402
from mtp_jax.config import base_config  # noqa: E402
from mtp_jax.dry_run import compile_train_step, memory_report  # noqa: E402

_VOCAB = flags.DEFINE_integer("vocab", 32000, "Vocabulary size.")
_SEQ = flags.DEFINE_integer("seq_len", 1024, "Sequence length.")
_BATCH = flags.DEFINE_integer("batch", 2, "Batch size.")
_CHUNK = flags.DEFINE_integer("chunk", 128, "Sequence chunk for scan+chunk.")
_HEADS = flags.DEFINE_list("n", ["1", "2", "4", "8"], "Head counts.")
_SEQ_D = flags.DEFINE_list("sequential_d", ["1", "2", "4"], "Sequential MTP module counts D (n_future = D + 1).")
_TIMING = flags.DEFINE_bool("timing", True, "Also time train steps n=4 vs n=1 (off: the compile-only memory rows).")
_TIMING_STEPS = flags.DEFINE_integer("timing_steps", 5, "Timed steps per model (after one warm-up).")
_OUT = flags.DEFINE_string("out_name", "memory", "Results file stem under experiments/memory/results/.")

IMPLS = {"naive": ("naive", 0), "scan": ("scan", 0), "scan+chunk": ("scan", None)}


def bench_config(n: int, impl: str, chunk: int, head_type: str = "parallel"):
  c = base_config()
  c.model.update(vocab_size=_VOCAB.value, d_model=256, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=704,
                 n_future=n, parity=False, max_seq_len=_SEQ.value, remat="full", head_type=head_type)
  c.data.seq_len = _SEQ.value
  c.train.batch_size = _BATCH.value
  c.mesh.data = 1
  c.loss.impl, c.loss.chunk_size = impl, chunk
  return c


def default_config(n: int):
  from mtp_jax.recipes.default import get_config
  c = get_config("sp")
  c.model.n_future = n
  c.mesh.data = 1
  return c


def time_ratio(config_fn, steps: int) -> dict:
  """Median seconds per train step for n=1 and n=4, measured interleaved so drift hits both."""
  med = interleaved_step_seconds({n: config_fn(n) for n in (1, 4)}, steps)
  return {"seconds_n1": med[1], "seconds_n4": med[4], "ratio_n4_over_n1": med[4] / med[1]}


def main(_):
  if _CHUNK.value <= 0 or _SEQ.value % _CHUNK.value:
    sys.exit(f"error: --chunk={_CHUNK.value} must be a positive divisor of --seq_len={_SEQ.value}")
  device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
  mesh = sharding.make_mesh(bench_config(1, "scan", 0), jax.devices()[:1])
  rows = []
  cases = [("parallel", int(n)) for n in _HEADS.value] + [("sequential", int(d) + 1) for d in _SEQ_D.value]
  for head_type, n in cases:
    for name, (impl, chunk) in IMPLS.items():
      c = bench_config(n, impl, _CHUNK.value if chunk is None else chunk, head_type)
      t0 = time.time()
      compiled = compile_train_step(c, mesh)[0]
      rows.append({"head_type": head_type, "n": n, "impl": name, **memory_report(compiled),
                   "compile_s": round(time.time() - t0, 1)})
      print(f"{head_type} n={n} {name:<11} temp {rows[-1]['temp_bytes'] / 2**20:9.1f} MiB", flush=True)
  temp = {(r["n"], r["impl"]): r["temp_bytes"] for r in rows if r["head_type"] == "parallel"}
  seq = {(r["n"] - 1, r["impl"]): r["temp_bytes"] for r in rows if r["head_type"] == "sequential"}
  logits_mib = _BATCH.value * _SEQ.value * _VOCAB.value * 4 / 2**20
  goals = {
      "scan n=4 / scan n=1 <= 1.05": temp[4, "scan"] / temp[1, "scan"],
      "naive n=4 / scan n=4 >= 2.5": temp[4, "naive"] / temp[4, "scan"],
      "scan+chunk n=4 / naive n=1 <= 0.5": temp[4, "scan+chunk"] / temp[1, "naive"],
  }
  d_max = max(map(int, _SEQ_D.value))
  goals[f"sequential scan D={d_max} / scan D=1 <= 1.05"] = seq[d_max, "scan"] / seq[1, "scan"]
  goals[f"sequential scan+chunk D={d_max} / scan+chunk D=1 <= 1.05"] = seq[d_max, "scan+chunk"] / seq[1, "scan+chunk"]
  passed = {k: (v <= float(k.split()[-1]) if "<=" in k else v >= float(k.split()[-1])) for k, v in goals.items()}
  timing = {}
  if _TIMING.value:
    print("timing train steps n=4 vs n=1 ...", flush=True)
    timing = {"memory_shape": time_ratio(lambda n: bench_config(n, "scan", 0), _TIMING_STEPS.value),
              "configs/default.py:sp": time_ratio(default_config, _TIMING_STEPS.value)}

  result = {"device": device, "vocab": _VOCAB.value, "seq_len": _SEQ.value, "batch": _BATCH.value,
            "chunk": _CHUNK.value, "one_head_logits_f32_mib": logits_mib, "rows": rows,
            "goals": {k: {"value": v, "met": passed[k]} for k, v in goals.items()}, "timing": timing}
  ns = sorted({r["n"] for r in rows if r["head_type"] == "parallel"})
  ds = sorted({r["n"] - 1 for r in rows if r["head_type"] == "sequential"})
  lines = [f"Compiled train-step temp memory (MiB), {device}; vocab {_VOCAB.value}, seq {_SEQ.value}, "
           f"batch {_BATCH.value}, d_model 256, 2-layer rematerialised trunk + n head layers; one head's f32 logits = "
           f"{logits_mib:.0f} MiB; chunk = {_CHUNK.value} positions.", "",
           "| impl | " + " | ".join(f"n={n}" for n in ns) + " |", "|---|" + "---:|" * len(ns)]
  for name in IMPLS:
    lines.append(f"| {name} | " + " | ".join(f"{temp[n, name] / 2**20:.0f}" for n in ns) + " |")
  lines += ["", "DeepSeek-V3 sequential MTP modules on the same trunk (head 0 + D modules, n_future = D + 1):", "",
            "| impl | " + " | ".join(f"D={d}" for d in ds) + " |", "|---|" + "---:|" * len(ds)]
  for name in IMPLS:
    lines.append(f"| {name} | " + " | ".join(f"{seq[d, name] / 2**20:.0f}" for d in ds) + " |")
  lines += ["", "| goal | measured | met |", "|---|---:|---|"]
  lines += [f"| {k} | {v:.3f} | {'yes' if passed[k] else 'NO'} |" for k, v in goals.items()]
  if timing:
    lines += ["", "Train-step time, n=4 vs n=1 (median of interleaved steps, same device):", "",
              "| model | s/step n=1 | s/step n=4 | ratio |", "|---|---:|---:|---:|"]
    for k, t in timing.items():
      lines.append(f"| {k} | {t['seconds_n1']:.3f} | {t['seconds_n4']:.3f} | {t['ratio_n4_over_n1']:.2f} |")
  lines += ["", f"Command: `python experiments/memory/memory.py {' '.join(sys.argv[1:])}`"]
  write_results(_OUT.value, result, lines)


if __name__ == "__main__":
  app.run(main)
