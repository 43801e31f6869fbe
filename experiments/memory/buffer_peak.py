"""What a compiled program holds at its memory peak, read from XLA's dumps (`--xla_dump_to=DIR`).

XLA writes, per module, the schedule's live ranges (`*-live-range.txt`: every buffer's first and last
instruction, and the buffers live at the peak) beside the optimised HLO (`*after_optimizations.txt`:
shapes and the JAX op each instruction comes from). Arguments (parameters, optimizer state) are left
out: what is listed are the temporaries.
"""
import glob
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # experiments/, for common/

from common.profiling import op_names  # noqa: E402


def _one(dump_dir: str, pattern: str) -> str:
  found = sorted(glob.glob(os.path.join(dump_dir, pattern)))
  if not found:
    raise FileNotFoundError(f"{dump_dir}: no {pattern} (was the program compiled with --xla_dump_to={dump_dir}?)")
  return found[-1]


def peak_buffers(dump_dir: str, module: str = "train_step", top: int = 10) -> dict:
  """{'length': instructions in the schedule, 'peak_at', 'peak_temp_bytes', 'buffers': the `top` largest
  temporaries live at the peak, each {'name', 'shape', 'bytes', 'live': [first, last], 'op'}}."""
  live_path = _one(dump_dir, f"*{module}*after_optimizations-live-range.txt")
  hlo = open(_one(dump_dir, f"*{module}*after_optimizations.txt")).read()
  shapes = dict(re.findall(r"^\s*(?:ROOT )?%([\w.\-]+) = ([a-z0-9]+\[[0-9,]*\])", hlo, re.M))
  ops = op_names(hlo)
  text = open(live_path).read()
  length = int(re.search(r"HloLiveRange \(max (\d+)\)", text).group(1))
  ranges = {m.group(1): (int(m.group(2)), int(m.group(3)))
            for m in re.finditer(r"^    ([\w.\-]+\{[\d,]*\}):(\d+)-(\d+)$", text, re.M)}
  peak = re.search(r"Live ranges at (\d+) \(peak\):\n((?:    .*\n)+)", text)
  buffers = []
  for name, size in re.findall(r"^    ([\w.\-]+\{[\d,]*\}): (\d+) bytes", peak.group(2), re.M):
    base = name.split("{")[0]
    if base.startswith("param."):
      continue
    buffers.append({"name": name, "shape": shapes.get(base, "(loop state)"), "bytes": int(size),
                    "live": list(ranges.get(name, (-1, -1))), "op": ops.get(base, "")})
  buffers.sort(key=lambda b: -b["bytes"])
  return {"length": length, "peak_at": int(peak.group(1)), "peak_temp_bytes": sum(b["bytes"] for b in buffers),
          "buffers": buffers[:top]}
