"""Where the 7B train step's temporaries go at fsdp=8, under XLA:CPU's two schedules.

    python experiments/memory/scheduler_memory.py            # ~2 min on 2 CPU cores
    python experiments/memory/scheduler_memory.py --quick --out_dir=/tmp/x   # the tiny recipe, ~1 min (a test runs it)

Each row is `python -m mtp_jax.main --config=configs/paper_7b.py:VARIANT --dry_run` at (data, fsdp,
tensor) = (1, 8, 1) on 8 simulated CPU devices, compiled twice, each in its own process (XLA reads its
flags once per process): with the concurrency-optimised schedule (XLA:CPU's default, and what the trainer
runs on CPU) and with the memory-minimising one (what `--dry_run` plans with, as GPU and TPU compilers
schedule for memory). For the first variant it also lists the largest temporaries live at each
schedule's peak, from XLA's buffer dumps (experiments/memory/buffer_peak.py), with the stretch of the schedule
over which each is live. Writes experiments/memory/results/scheduler_memory.md and .json
(--quick: scheduler_memory_quick).
"""
import os
import shutil
import sys
import tempfile

from buffer_peak import peak_buffers
from paper_dry_run import dry_run
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # experiments/, for common/

from common.results_io import results_folder, write_results  # noqa: E402

SCHEDULES = {"concurrency": "--xla_cpu_enable_concurrency_optimized_scheduler=true",
             "memory": "--xla_cpu_enable_concurrency_optimized_scheduler=false"}
GIB = 2 ** 30


def rows_for(quick: bool):
  if quick:   # the tiny recipe stands in for paper_7b: same program structure, kilobytes
    return [("n4", "configs/tiny.py", ["--config.model.remat=full"])]
  return [(v, f"configs/paper_7b.py:{v}", []) for v in ("n4", "n1", "bytes_n8")]


def measure(variant, config, extra, schedule, dump: bool) -> dict:
  flags = SCHEDULES[schedule]
  dump_dir = tempfile.mkdtemp(prefix="xla_dump_") if dump else None
  if dump:
    flags += f" --xla_dump_to={dump_dir} --xla_dump_hlo_module_re=.*train_step.*"
  try:
    r = dry_run(variant, 8, 1, 8, 1, xla_flags=flags, config=config, extra=extra)
    row = {"variant": variant, "schedule": schedule, "temp_bytes": r["temp_bytes"],
           "peak_bytes_estimate": r["peak_bytes_estimate"], "reported_schedule": r.get("cpu_schedule"),
           "command": f"XLA_FLAGS='--xla_force_host_platform_device_count=8 {SCHEDULES[schedule]}' python {r['command']}"}
    if dump:
      row["peak"] = peak_buffers(dump_dir, top=14)
    return row
  finally:
    if dump_dir:
      shutil.rmtree(dump_dir, ignore_errors=True)


def unit(quick):
  return (2 ** 10, "KiB") if quick else (GIB, "GiB")


def main(argv):
  quick = "--quick" in argv
  div, name = unit(quick)
  rows = []
  for k, (variant, config, extra) in enumerate(rows_for(quick)):
    for schedule in SCHEDULES:
      rows.append(measure(variant, config, extra, schedule, dump=k == 0))
      r = rows[-1]
      print(f"{variant:<9} {schedule:<12} temp {r['temp_bytes'] / div:.1f} {name}", flush=True)
  by = {(r["variant"], r["schedule"]): r for r in rows}
  variants = list(dict.fromkeys(r["variant"] for r in rows))
  lines = [f"Temporaries per device of the 7B train step at (data, fsdp, tensor) = (1, 8, 1), {name}, as XLA:CPU "
           "plans them under its two schedules (`--dry_run`; bf16 compute, f32 parameters and AdamW state, full "
           "rematerialisation, blockwise attention)." if not quick else
           f"Quick run: configs/tiny.py with remat=full at (1, 8, 1), {name}.", "",
           "| model | concurrency schedule (XLA:CPU default) | memory schedule (`--dry_run`) | memory / concurrency |",
           "|---|---:|---:|---:|"]
  for v in variants:
    c, m = by[v, "concurrency"]["temp_bytes"], by[v, "memory"]["temp_bytes"]
    lines.append(f"| {'7B ' if not quick else ''}{v} | {c / div:.1f} | {m / div:.1f} | {m / c:.2f} |")
  first = variants[0]
  for schedule in SCHEDULES:
    p = by[first, schedule]["peak"]
    lines += ["", f"**{first}, {schedule} schedule**: peak at instruction {p['peak_at']} of {p['length']}; "
              f"temporaries live there {p['peak_temp_bytes'] / div:.1f} {name} (XLA's allocation "
              f"{by[first, schedule]['temp_bytes'] / div:.1f}). The largest:", "",
              f"| buffer | shape | {name} | live over instructions | JAX op |", "|---|---|---:|---|---|"]
    for b in p["buffers"]:
      lines.append(f"| {b['name']} | {b['shape']} | {b['bytes'] / div:.2f} | {b['live'][0]}-{b['live'][1]} | "
                   f"{b['op'] or '(XLA-made)'} |")
  lines += ["", "Each row's command:", ""] + [f"- `{r['command']}`" for r in rows]
  lines += ["", f"Regenerate: `python experiments/memory/scheduler_memory.py{' --quick' if quick else ''}`"]
  out_dir = next((a.split("=", 1)[1] for a in argv if a.startswith("--out_dir=")), results_folder(__file__))
  write_results("scheduler_memory_quick" if quick else "scheduler_memory", {"rows": rows}, lines, out_dir)


if __name__ == "__main__":
  main(sys.argv[1:])
