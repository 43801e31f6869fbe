"""What one more row costs: the dense part of a decode step over k rows, against one row, kernel by kernel.

    python experiments/speed/row_cost.py                  # SmolLM2-135M's shapes and the default model's
    python experiments/speed/row_cost.py --quick          # the CI smoke run

A speculative verify step feeds k tokens (the last one and k-1 drafts) through every weight matrix where a
greedy step feeds one; C(k), the verify step's cost in greedy steps, decides whether drafting pays. On an
accelerator, and on a CPU whose one-row step is bound by reading the weights from memory, C(k) stays near 1
for small k. This measures the weight matrices of a Llama layer stack (q, k, v, o, gate, up, down and the
unembedding; no attention over the cache, no cache writes) at 1..k rows, in one compiled program per row
count, with each kernel XLA's CPU backend can route a dot to, each in its own process (XLA reads its flags
once per process):

- xla: the default. One row is a matrix-vector product that XLA emits itself; two or more rows go to
  YNNPACK (the `__ynn_fusion` custom fusion in the compiled HLO).
- eigen: YNNPACK takes no dots (--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_ELTWISE), so 2+ rows
  take the dot XLA emits itself (Eigen's GEMM).
- rows: the default kernels, with every product over k rows written as k one-row products (one matrix-vector
  product per row, stacked: mtp_jax.row_products.one_product_per_row), each the product a greedy step runs: the weights are read k times, but the
  reads after the first find the matrix in cache.
- numpy: the same products in numpy (its BLAS), for a reference outside XLA.

(XLA's XNNPACK and oneDNN dot fusions take no dot whose weights are arguments, so they time as eigen.)
Each process is pinned to one core and one thread, as a decode loop pinned to a core runs (unpinned, a
library may spread an extra row's arithmetic over a second core), and is timed interleaved over the row
counts (medians), so a busy machine slows every row count alike. The table gives C(k) per kernel, the
weight bytes read per second at one row and the arithmetic rate each extra row adds. The floor beside it is
what the core allows: k rows' time can be no less than reading the weights once (the one-row step) or than
their arithmetic at the core's own GEMM rate (a 1024 x 1024 product, timed in the same process), whichever
is longer.
"""
import json
import os
import subprocess
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # experiments/, for common/

import numpy as np  # noqa: E402

from common import results_io  # noqa: E402
from mtp_jax.cpu_flags import cpu_model  # noqa: E402

# name: (d_model, n_heads, n_kv_heads, head_dim, d_ff, layers, vocab) as the decode step runs them
SHAPES = {
    "smollm2": (576, 9, 3, 64, 1536, 30, 49152),       # SmolLM2-135M (29 trunk layers + head 1)
    "default": (128, 4, 2, 32, 352, 12, 258),           # configs/default.py (bytes, 8 trunk + 4 heads)
}
KERNELS = {
    "xla": "",
    "eigen": "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_ELTWISE",
    "rows": "",
}
SINGLE_THREAD = "--xla_cpu_multi_thread_eigen=false"

_SHAPES = flags.DEFINE_list("shapes", ["smollm2", "default"], f"Model shapes: {', '.join(SHAPES)}.")
_ROWS = flags.DEFINE_list("rows", ["1", "2", "3", "4", "6", "8", "16"], "Rows per step (1 must be among them).")
_KERNELS = flags.DEFINE_list("kernels", ["xla", "eigen", "rows", "numpy"], "Kernels to time (see the docstring).")
_REPEATS = flags.DEFINE_integer("repeats", 15, "Timed calls per row count (interleaved).")
_QUICK = flags.DEFINE_bool("quick", False, "A smoke run: the default shape, 1 and 2 rows, 2 repeats.")
_WORKER = flags.DEFINE_string("worker", None, "Internal: time one kernel for one shape and print JSON.")
_OUT = flags.DEFINE_string("out_name", "row_cost", "Results file stem.")
_OUT_DIR = flags.DEFINE_string("out_dir", results_io.results_folder(__file__), "Where the results files go.")


def _matrices(shape, seed=0):
  d, h, kv, hd, ff, layers, vocab = shape
  rng = np.random.default_rng(seed)
  mats = []
  for _ in range(layers):
    for a, b in ((d, h * hd), (d, kv * hd), (d, kv * hd), (h * hd, d), (d, ff), (d, ff), (ff, d)):
      mats.append((rng.standard_normal((a, b), dtype=np.float32) * a ** -0.5))
  mats.append(rng.standard_normal((vocab, d), dtype=np.float32) * d ** -0.5)   # the tied embedding, [V, d]
  return mats


def _step(x, mats, layers, silu, mm=lambda x, w: x @ w):
  """The decode step's matrix products over the rows of x (numpy or jax arrays alike): the logits. The
  unembedding reads the embedding [V, d] transposed, as the model's tied output does."""
  for i in range(layers):
    q, k, v, o, g, u, dn = mats[7 * i:7 * i + 7]
    a = mm(x, q)[:, :o.shape[0]] + 0 * mm(x, k).sum() + 0 * mm(x, v).sum()
    x = x + mm(a, o)
    x = x + mm(silu(mm(x, g)) * mm(x, u), dn)
  return mm(x, mats[-1].T)


def _pin_to_one_core():
  """Run this process on one core (the last it may use), where the OS allows it."""
  if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})


def _core_gflops(jax, jnp) -> float:
  """The core's f32 GEMM rate: a 1024 x 1024 product, best of 5."""
  a = jnp.ones((1024, 1024), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  best = min(_timed(lambda: f(a).block_until_ready()) for _ in range(5))
  return 2 * 1024 ** 3 / best / 1e9


def _timed(f) -> float:
  t0 = time.perf_counter()
  f()
  return time.perf_counter() - t0


def worker(kernel: str, shape_name: str, rows: list[int], repeats: int) -> dict:
  shape = SHAPES[shape_name]
  mats = _matrices(shape)
  layers = shape[5]
  xs = {m: np.random.default_rng(m).standard_normal((m, shape[0]), dtype=np.float32) for m in rows}
  import jax
  import jax.numpy as jnp
  gflops = _core_gflops(jax, jnp)
  if kernel == "numpy":
    silu = lambda h: h / (1 + np.exp(-h))
    calls = {m: (lambda m=m: _step(xs[m], mats, layers, silu)) for m in rows}
  else:
    jmats = [jnp.asarray(w) for w in mats]
    from mtp_jax.row_products import one_product_per_row   # the model's own split, at every row count here
    mm = one_product_per_row if kernel == "rows" else (lambda x, w: x @ w)
    step = jax.jit(lambda x, ms: jnp.argmax(_step(x, ms, layers, jax.nn.silu, mm), axis=-1))
    calls = {}
    for m in rows:
      x = jnp.asarray(xs[m])
      compiled = step.lower(x, jmats).compile()
      calls[m] = (lambda c=compiled, x=x: c(x, jmats).block_until_ready())
  for f in calls.values():
    f()
  times = {m: [] for m in rows}
  for _ in range(repeats):
    for m in rows:
      t0 = time.perf_counter()
      calls[m]()
      times[m].append(time.perf_counter() - t0)
  hlo = ""
  if kernel not in ("numpy", "rows"):   # which kernel a lone two-row product takes, from its compiled program
    text = jax.jit(jnp.matmul).lower(jnp.ones((2, shape[0])), jmats[-1].T).compile().as_text()
    hlo = "__ynn_fusion" if "__ynn_fusion" in text else "dot"
  weight_bytes = sum(w.nbytes for w in mats)
  flops_per_row = 2 * sum(w.size for w in mats)
  return {"kernel": kernel, "shape": shape_name, "ms": {m: 1e3 * float(np.median(t)) for m, t in times.items()},
          "weight_bytes": weight_bytes, "flops_per_row": flops_per_row, "two_rows_take": hlo, "core_gflops": gflops}


def run_worker(kernel: str, shape: str, rows: list[int], repeats: int) -> dict:
  env = dict(os.environ)
  if kernel != "numpy":
    env["XLA_FLAGS"] = f"{SINGLE_THREAD} {KERNELS[kernel]}".strip()
  env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
  args = [sys.executable, os.path.abspath(__file__), f"--worker={kernel}", f"--shapes={shape}",
          f"--rows={','.join(map(str, rows))}", f"--repeats={repeats}"]
  proc = subprocess.run(args, env=env, capture_output=True, text=True)
  if proc.returncode:
    raise SystemExit(f"error: the {kernel} worker failed:\n{proc.stderr[-2000:]}")
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  out["ms"] = {int(m): t for m, t in out["ms"].items()}
  return out


def main(_):
  if _WORKER.value:
    _pin_to_one_core()
    print(json.dumps(worker(_WORKER.value, _SHAPES.value[0], [int(r) for r in _ROWS.value], _REPEATS.value)))
    return
  quick = _QUICK.value
  shapes = ["default"] if quick else _SHAPES.value
  rows = [1, 2] if quick else sorted({int(r) for r in _ROWS.value})
  repeats = 2 if quick else _REPEATS.value
  for s in shapes:
    if s not in SHAPES:
      raise SystemExit(f"error: --shapes: unknown shape {s!r}; choose among {', '.join(SHAPES)}")
  for k in _KERNELS.value:
    if k not in (*KERNELS, "numpy"):
      raise SystemExit(f"error: --kernels: unknown kernel {k!r}; choose among {', '.join([*KERNELS, 'numpy'])}")
  if 1 not in rows:
    raise SystemExit("error: --rows must include 1 (every ratio is to one row)")
  t0 = time.time()
  results = []
  for s in shapes:
    for k in _KERNELS.value:
      r = run_worker(k, s, rows, repeats)
      print(f"{s} {k}: " + " ".join(f"{m}:{r['ms'][m]:.2f}ms" for m in rows), flush=True)
      results.append(r)
  report(results, rows, repeats, time.time() - t0, quick)


def _floor(r, m: int) -> float:
  """The least C(m) this core allows: m rows cost at least one row's read of the weights and at least their
  arithmetic at the core's GEMM rate."""
  one = r["ms"][1] / 1e3
  return max(one, m * r["flops_per_row"] / (r["core_gflops"] * 1e9)) / one


def report(results, rows, repeats, wall, quick):
  cpu = cpu_model()
  lines = ["# What one more row costs in a decode step's weight matrices, by kernel", "",
           f"CPU: {cpu}, each process pinned to one core, one thread; the q, k, v, o, gate, up, down matrices of every layer and the "
           f"unembedding, f32, one compiled program per row count; medians of {repeats} calls interleaved over "
           f"the row counts. C(k): k rows' time / one row's, in the same process.", ""]
  for shape in dict.fromkeys(r["shape"] for r in results):
    rs = [r for r in results if r["shape"] == shape]
    d, h, kv, hd, ff, layers, vocab = SHAPES[shape]
    lines += [f"## {shape}: {layers} layers, d {d}, d_ff {ff}, vocabulary {vocab}; "
              f"{rs[0]['weight_bytes'] / 2 ** 20:.0f} MiB of weights", "",
              "| rows | " + " | ".join(f"{r['kernel']} ms | {r['kernel']} C(k)" for r in rs) + " | floor C(k) |",
              "|---:|" + "---:|---:|" * len(rs) + "---:|"]
    for m in rows:
      lines.append(f"| {m} | " + " | ".join(f"{r['ms'][m]:.2f} | {r['ms'][m] / r['ms'][1]:.2f}" for r in rs)
                   + f" | {_floor(rs[0], m):.2f} |")
    lines.append("")
    lines.append(f"- floor: the core's GEMM rate is {rs[0]['core_gflops']:.0f} GFLOP/s ({rs[0]['kernel']}'s process), "
                 f"so {max(rows)} rows' {max(rows) * rs[0]['flops_per_row'] / 1e6:.0f} MFLOP need at least "
                 f"{max(rows) * rs[0]['flops_per_row'] / rs[0]['core_gflops'] / 1e6:.2f} ms beside the one-row "
                 f"step's {rs[0]['ms'][1]:.2f} ms of reading the weights")
    for r in rs:
      one = r["ms"][1] / 1e3
      extra = [(r["ms"][m] - r["ms"][1]) / 1e3 / (m - 1) for m in rows if m > 1]
      rate = r["flops_per_row"] / float(np.median(extra)) / 1e9 if extra and np.median(extra) > 0 else float("nan")
      take = f"; two rows take `{r['two_rows_take']}`" if r["two_rows_take"] else ""
      lines.append(f"- {r['kernel']}: one row reads the weights at {r['weight_bytes'] / one / 1e9:.1f} GB/s; "
                   f"each extra row adds {1e3 * float(np.median(extra)) if extra else 0:.2f} ms "
                   f"({rate:.0f} GFLOP/s of its {r['flops_per_row'] / 1e6:.0f} MFLOP){take}")
    lines.append("")
  lines += ["Where C(k) rises by a fixed amount per row, the step is bound by arithmetic, not by reading the "
            "weights: k tokens per forward must then beat C(k), not 1, for drafting to pay "
            "(docs/decoding.md, the cost model).", "",
            f"Wall time {wall:.0f} s.", "",
            "Command: `python experiments/speed/row_cost.py" + (" --quick" if quick else "")
            + (f" --out_name={_OUT.value}" if _OUT.value != "row_cost" else "") + "`"]
  results_io.write_results(_OUT.value + ("_quick" if quick else ""),
                           {"cpu": cpu, "rows": rows, "repeats": repeats, "results": results, "wall_s": wall},
                           lines, _OUT_DIR.value)


if __name__ == "__main__":
  app.run(main)
