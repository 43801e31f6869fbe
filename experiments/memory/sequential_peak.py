"""What the train step of D sequential MTP modules holds at its memory peak beyond D=1's, buffer by buffer.

    python experiments/memory/sequential_peak.py            # ~1 min on 2 CPU cores

memory_sequential.md measures the fused cross-entropy's (scan+chunk) train-step temporaries growing by
more than 5% from D=1 to D=4. Here each program is compiled in its own process with XLA's buffer dumps
(experiments/memory/buffer_peak.py), the buffers live at each schedule's peak are grouped by shape and
the JAX op they come from, and the groups that grow with D are set beside what the added modules' own
parameters take (their gradient, and Adam's update, one f32 buffer each per parameter). The same
shapes as experiments/memory/memory.py. Writes experiments/memory/results/sequential_peak.md and .json.
"""
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # experiments/, for common/

from common.results_io import write_results  # noqa: E402

MIB = 2 ** 20
_CHILD = """
import json, os, sys
sys.path[:0] = [{here!r}, {experiments!r}]
from absl import flags
flags.FLAGS(["memory"])
import jax
import memory
from buffer_peak import peak_buffers
from mtp_jax import sharding
from mtp_jax.dry_run import compile_train_step, memory_report
config = memory.bench_config({n}, "scan", 128, "sequential")
compiled, state = compile_train_step(config, sharding.make_mesh(config, jax.devices()[:1]))[:2]
module_bytes = sum(x.size * x.dtype.itemsize for k, v in state.params.items() if k.startswith("heads_") and k != "heads_0"
                   for x in jax.tree.leaves(v))
peak = peak_buffers({dump!r}, top=100000)
print(json.dumps({{"temp_bytes": memory_report(compiled)["temp_bytes"], "module_param_bytes": module_bytes,
                  "peak": peak}}))
"""


def measure(d: int) -> dict:
  """One compile of the D-module train step in a fresh process (XLA reads its dump flags once per process)."""
  dump = tempfile.mkdtemp(prefix="xla_dump_")
  here = os.path.dirname(os.path.abspath(__file__))
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") +
             f" --xla_dump_to={dump} --xla_dump_hlo_module_re=.*train_step.*")
  try:
    code = _CHILD.format(here=here, experiments=os.path.dirname(here), n=d + 1, dump=dump)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])
  finally:
    shutil.rmtree(dump, ignore_errors=True)


def groups(peak: dict) -> collections.Counter:
  """Bytes live at the peak per (shape, op), the optimizer state and parameters left out (arguments)."""
  out = collections.Counter()
  for b in peak["buffers"]:
    if not b["name"].startswith("state_"):
      out[(b["shape"], b["op"][:60] or "(scan carry)")] += b["bytes"]
  return out


def main():
  runs = {d: measure(d) for d in (1, 4)}
  g1, g4 = groups(runs[1]["peak"]), groups(runs[4]["peak"])
  grown = sorted(((g4[k] - g1[k], k) for k in set(g1) | set(g4) if g4[k] != g1[k]), reverse=True)
  live = {d: sum(groups(r["peak"]).values()) for d, r in runs.items()}
  added = runs[4]["module_param_bytes"] - runs[1]["module_param_bytes"]
  result = {d: {"temp_bytes": r["temp_bytes"], "live_temp_bytes_at_peak": live[d],
                "module_param_bytes": r["module_param_bytes"]} for d, r in runs.items()}
  result["grown"] = [{"shape": k[0], "op": k[1], "bytes": v} for v, k in grown]
  result["added_module_param_bytes"] = added
  lines = [f"Train step of sequential MTP modules, D=1 against D=4 (scan+chunk, the shapes of memory.py); "
           f"the added modules' parameters: {added / MIB:.2f} MiB of float32.", "",
           "| | D=1 | D=4 | D=4 - D=1 |", "|---|---:|---:|---:|",
           f"| XLA's planned temporaries (MiB) | {runs[1]['temp_bytes'] / MIB:.1f} | {runs[4]['temp_bytes'] / MIB:.1f} | "
           f"{(runs[4]['temp_bytes'] - runs[1]['temp_bytes']) / MIB:.1f} |",
           f"| temporaries live at the schedule's peak (MiB) | {live[1] / MIB:.1f} | {live[4] / MIB:.1f} | "
           f"{(live[4] - live[1]) / MIB:.1f} |", "",
           "What is live at D=4's peak and not at D=1's, by shape and op:", "",
           "| MiB | shape | op |", "|---:|---|---|"]
  lines += [f"| {v / MIB:+.2f} | {k[0]} | {k[1]} |" for v, k in grown if abs(v) >= 0.01 * MIB]
  lines += ["", f"Live growth {(live[4] - live[1]) / MIB:.2f} MiB against 2 x the added parameters "
            f"{2 * added / MIB:.2f} MiB (their gradient, accumulated in the modules' scan, and Adam's update).", "",
            "Command: `python experiments/memory/sequential_peak.py`"]
  write_results("sequential_peak", result, lines)


if __name__ == "__main__":
  main()
