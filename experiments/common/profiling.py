"""Where a compiled program's time goes: one run under `jax.profiler`, the device ops' time summed by the
JAX operation each comes from (HLO metadata op_name), which names the part of the model that spends it."""
import collections
import glob
import gzip
import json
import os
import re
import tempfile

import jax


def op_names(hlo_text: str) -> dict:
  """HLO instruction name -> the JAX operation it comes from (op_name, loop and jit prefixes dropped)."""
  names = {}
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]+)\"", line)
    if m and " while(" not in line and " call(" not in line and " conditional(" not in line:
      op = re.sub(r"^jit\([^)]*\)/(while/body/)?(closed_call/)?", "", m.group(2))
      names[m.group(1)] = readable(re.sub(r"\[[^\]]*\]", "", op))
  return names


def readable(op: str) -> str:
  """A train step's op_name, shortened: 'transpose(jvp(f))/...' (the backward pass) -> 'bwd ...',
  'jvp(f)/...' -> 'fwd ...', loop and call frames dropped."""
  for wrapper, tag in (("transpose(jvp(", "bwd "), ("jvp(", "fwd ")):
    if op.startswith(wrapper):
      op = tag + op.split("/", 1)[1] if "/" in op else tag + op
      break
  return re.sub(r"(while/body/|closed_call/)", "", op)


def profile(compiled, inputs, iters: int) -> dict:
  """ms per step by JAX operation, from one profiled run of the program."""
  names = op_names(compiled.as_text())
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      jax.block_until_ready(compiled(*inputs))
    [trace] = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)
    events = json.load(gzip.open(trace))["traceEvents"]
  by_op = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("name") in names:
      by_op[names[e["name"]]] += e["dur"] / 1e3 / iters
  return dict(by_op)


def top(ops: dict, k: int) -> list:
  """The k costliest (operation, ms) pairs."""
  return sorted(ops.items(), key=lambda kv: -kv[1])[:k]
