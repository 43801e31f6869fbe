"""`--dry_run`: compile the train step on abstract shapes (nothing allocated) and report size and memory.

Users size a model against their devices before paying for them; benchmarks read the same report.
Per-device figures are for the configured mesh (simulate devices on a CPU with
XLA_FLAGS=--xla_force_host_platform_device_count=N). On CPU, `python -m mtp_jax.main --dry_run`
plans with XLA's memory-minimising schedule, as accelerators do (`plan_memory_like_an_accelerator`).
"""
from __future__ import annotations

import json
import os
import re
import time

import jax
import jax.numpy as jnp

from mtp_jax import sharding
from mtp_jax import step as step_lib
from mtp_jax.model import build_model
from mtp_jax.step import make_optimizer
from mtp_jax.cpu_flags import add_xla_flag


# XLA:CPU's default schedule orders independent work for thread concurrency, not memory: on the 7B n4
# step at fsdp=8 it zeroes the trunk's stacked gradient buffers before the forward pass, so 2.7 GiB of
# them sit beside the heads' backward (experiments/memory/results/scheduler_memory.md). GPU and TPU schedule
# for memory; a CPU dry run sizes accelerators, so it plans with XLA:CPU's memory-minimising schedule.
_SCHEDULER_FLAG = "xla_cpu_enable_concurrency_optimized_scheduler"


def plan_memory_like_an_accelerator() -> None:
  """Make this process's CPU compiles schedule for memory. XLA reads its flags once, when jax starts its
  backend (a per-compile option does not reach the CPU scheduler), so this does nothing once a backend
  is up; `cpu_schedule` then reports the default. No effect on GPU and TPU compiles; a setting already
  in XLA_FLAGS is kept."""
  add_xla_flag(_SCHEDULER_FLAG, "false")


def cpu_schedule() -> str:
  """How XLA:CPU orders this process's compiles: 'memory' or 'concurrency' (its default); '' off CPU."""
  if jax.default_backend() != "cpu":
    return ""
  setting = re.search(rf"--{_SCHEDULER_FLAG}=(\S+)", os.environ.get("XLA_FLAGS", ""))
  return "memory" if setting and setting.group(1).lower() in ("false", "0") else "concurrency"


def param_counts(params) -> dict:
  """Parameter counts by part: trunk, heads, embedding (+ unembedding), total."""
  count = lambda tree: int(sum(x.size for x in jax.tree.leaves(tree)))
  heads = sum(count(v) for k, v in params.items() if k.startswith("heads_"))
  return {"params_total": count(params), "params_trunk": count(params.get("trunk", {})),
          "params_heads": heads, "params_embedding": count(params["embed"]) + count(params.get("unembed", {}))}


def flops_per_token(config, counts: dict) -> float:
  """Model FLOPs per trained token, forward + backward (6N + attention; no rematerialisation).

  N counts every matmul weight a token passes through: non-embedding weights, plus the shared
  unembedding once per head (each head runs it).
  """
  m = config.model
  matmul = counts["params_total"] - counts["params_embedding"] + m.n_future * m.d_model * m.vocab_size
  attn_layers = counts["n_attention_layers"]
  return 6.0 * matmul + 12.0 * attn_layers * config.data.seq_len * m.d_model


def model_flops_per_token(config, params, model) -> float:
  """`flops_per_token` of a model whose (possibly abstract) parameters are `params`."""
  counts = param_counts(params)
  args = model.args
  counts["n_attention_layers"] = args.n_trunk_layers + (args.n_future if args.heads_have_cache else 0)
  return flops_per_token(config, counts)


# Peak dense bfloat16 matmul FLOP/s of one JAX device, by device_kind (vendors' data sheets; a TPU v2/v3
# device is one core, later TPUs one chip). MFU divides the model FLOPs a step does by these, as MaxText
# reports it; a float32 model on GPUs runs its matmuls in TF32 or slower, so its MFU reads low. CPUs have no
# entry: the trainer reports the model FLOP/s it achieves instead.
PEAK_FLOPS = (
    ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("B200", 2250e12),
    ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12), ("V100", 125e12),
    ("T4", 65e12), ("TPU v2", 22.5e12), ("TPU v3", 61.5e12), ("TPU v4", 275e12), ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12), ("TPU v5p", 459e12), ("TPU v5", 459e12), ("TPU v6 lite", 918e12), ("TPU v6e", 918e12),
)


def peak_flops_per_device(device_kind: str):
  """The device's peak bfloat16 FLOP/s from PEAK_FLOPS (the first entry its name contains), or None."""
  return next((peak for name, peak in PEAK_FLOPS if name.lower() in device_kind.lower()), None)


def abstract_batch(config, mesh):
  shape = (config.train.batch_size, config.data.seq_len + config.model.n_future)
  spec = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding.batch_sharding(mesh))
  return {"tokens": spec, "segment_ids": spec}


def compile_train_step(config, mesh=None, model=None, tx=None):
  """(compiled train step, abstract state, state shardings, mesh) for the configured batch and mesh.

  The step is jitted with the state donated and compiled ahead of time; the trainer runs this very
  program, so `--dry_run` reports the memory of what training executes (on CPU, of its memory-minimising
  schedule: see `plan_memory_like_an_accelerator`).
  """
  mesh = mesh or sharding.make_mesh(config)
  model, tx = model or build_model(config.model), tx or make_optimizer(config.train)
  state, state_sh = step_lib.abstract_train_state(model, tx, mesh, config)
  step = step_lib.jit_train_step(model, config, tx, mesh, state_sh)
  with sharding.activate(mesh, config):
    compiled = step.lower(state, abstract_batch(config, mesh)).compile()
  return compiled, state, state_sh, mesh


def memory_report(compiled) -> dict:
  """The compiled program's per-device memory, as XLA plans it."""
  mem = compiled.memory_analysis()
  out = {"temp_bytes": int(mem.temp_size_in_bytes), "argument_bytes": int(mem.argument_size_in_bytes),
         "output_bytes": int(mem.output_size_in_bytes), "alias_bytes": int(mem.alias_size_in_bytes)}
  out["peak_bytes_estimate"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
  return out


def dry_run_report(config) -> dict:
  t0 = time.time()
  compiled, state, state_sh, mesh = compile_train_step(config)
  args = build_model(config.model).args
  report = param_counts(state.params)
  report["n_attention_layers"] = args.n_trunk_layers + (args.n_future if args.heads_have_cache else 0)
  report["flops_per_token"] = flops_per_token(config, report)
  peak = peak_flops_per_device(jax.devices()[0].device_kind)
  if peak:
    report["peak_flops_per_device"] = peak
  report["tokens_per_step"] = config.train.batch_size * config.data.seq_len
  report["mesh"] = dict(mesh.shape)
  report["devices"] = f"{mesh.size} x {jax.devices()[0].device_kind}"
  report["param_bytes_per_device"] = sharding.bytes_per_device(state.params, state_sh.params)
  report["optimizer_bytes_per_device"] = sharding.bytes_per_device(state.opt_state, state_sh.opt_state)
  if config.train.trainable != "all":   # what freezing saves: the optimizer state of every frozen leaf
    from mtp_jax.step import trainable_mask
    mask = jax.tree.leaves(trainable_mask(state.params, config.train.trainable))
    report["params_trainable"] = int(sum(x.size for x, m in zip(jax.tree.leaves(state.params), mask) if m))
    every = config.copy_and_resolve_references()
    every.train.trainable = "all"
    model = build_model(config.model)
    full, full_sh = step_lib.abstract_train_state(model, make_optimizer(every.train), mesh, config)
    all_bytes = sharding.bytes_per_device(full.opt_state, full_sh.opt_state)
    report["optimizer_bytes_saved_per_device"] = all_bytes - report["optimizer_bytes_per_device"]
  report.update(memory_report(compiled))
  try:   # XLA's count for the compiled step: shows e.g. the backward work a frozen trunk skips
    report["compiled_flops_per_step"] = float(compiled.cost_analysis()["flops"])
  except Exception:   # not every backend reports it
    pass
  if cpu_schedule():
    report["cpu_schedule"] = cpu_schedule()
  report["compile_seconds"] = round(time.time() - t0, 1)
  return report


def _fmt_bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(n) < 1024 or unit == "TiB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
    n /= 1024


def format_report(report: dict) -> str:
  rows = []
  for k, v in report.items():
    if k.endswith("_bytes") or k.endswith("_per_device") or k == "peak_bytes_estimate":
      v = f"{_fmt_bytes(v)}  ({v:,})"
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
      v = f"{v:,.4g}" if isinstance(v, float) else f"{v:,}"
    rows.append(f"  {k:<28} {v}")
  return "dry run (per device where it says bytes)\n" + "\n".join(rows)


def dry_run(config, workdir: str) -> dict:
  report = dry_run_report(config)
  print(format_report(report))
  from mtp_jax import io
  io.write_text(io.path(workdir) / "dry_run.json", json.dumps(report, indent=2))
  return report
