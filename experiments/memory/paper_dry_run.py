"""Size the paper's 7B models on device meshes before paying for them: `--dry_run` on simulated devices.

    python experiments/memory/paper_dry_run.py          # ~1 h on 2 shared CPU cores
    python experiments/memory/paper_dry_run.py --out_name=paper_dry_run_rows n4:8:1:8:1 bytes_n8:8:1:8:1   # chosen rows

Each row is one `python -m mtp_jax.main --config=configs/paper_7b.py:VARIANT --dry_run` in its own
process with XLA_FLAGS=--xla_force_host_platform_device_count=N (the device count is fixed per
process), one sequence per data-parallel rank. Figures are per device, as XLA plans them for the
sharded train step (bf16 compute, f32 parameters and AdamW state, full rematerialisation), with
the config's `model.attention=auto`, which on these CPU devices at 4,096-8,192 positions is the
blockwise (flash-style) attention of mtp_jax/attention.py, and XLA:CPU's memory-minimising schedule
(`--dry_run` picks it; experiments/memory/scheduler_memory.py compares it with the CPU's default).
Writes experiments/memory/results/<out_name>.md and .json.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # experiments/, for common/

from common.results_io import write_results  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository

# (variant, devices, data, fsdp, tensor)
RUNS = [
    ("n1", 8, 1, 8, 1), ("n4", 8, 1, 8, 1), ("bytes_n8", 8, 1, 8, 1),
    ("n4", 8, 1, 4, 2),
    ("n1", 64, 1, 64, 1), ("n4", 64, 1, 64, 1), ("n4", 64, 8, 8, 1), ("n4", 64, 1, 16, 4),
    ("bytes_n8", 64, 1, 64, 1),
]
GIB = 2 ** 30


def dry_run(variant, devices, data, fsdp, tensor, xla_flags: str = "", config: str = "", extra=()) -> dict:
  """One row's dry_run.json (+ variant, devices, command). `xla_flags` are added to the device count's;
  `config` (default configs/paper_7b.py:VARIANT) and `extra` flags let other scripts size other recipes."""
  workdir = tempfile.mkdtemp(prefix="paper_dry_run_")
  cmd = [sys.executable, "-m", "mtp_jax.main", f"--config={config or f'configs/paper_7b.py:{variant}'}",
         f"--workdir={workdir}", "--dry_run", f"--config.mesh.data={data}", f"--config.mesh.fsdp={fsdp}",
         f"--config.mesh.tensor={tensor}", f"--config.train.batch_size={data * fsdp}", *extra]
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {xla_flags}".strip(),
             JAX_PLATFORMS="cpu")
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  if r.returncode:
    raise SystemExit(f"dry run failed ({' '.join(cmd[3:])}):\n{r.stderr[-3000:]}")
  with open(os.path.join(workdir, "dry_run.json")) as f:
    report = json.load(f)
  shutil.rmtree(workdir, ignore_errors=True)
  return {**report, "variant": variant, "n_devices": devices, "command": " ".join(cmd[1:4] + ["--workdir=W"] + cmd[5:])}


def main():
  # Optional: --out_name=STEM and rows as VARIANT:DEVICES:DATA:FSDP:TENSOR (default: every row of RUNS).
  args = sys.argv[1:]
  out_name = next((a.split("=", 1)[1] for a in args if a.startswith("--out_name=")), "paper_dry_run")
  picked = [a for a in args if not a.startswith("--")]
  runs = [(v, *map(int, rest)) for v, *rest in (a.split(":") for a in picked)] if picked else RUNS
  rows = []
  for run in runs:
    rows.append(dry_run(*run))
    r = rows[-1]
    print(f"{r['variant']:<9} {r['mesh']}  params {r['params_total'] / 1e9:.2f}B  "
          f"peak {r['peak_bytes_estimate'] / GIB:.1f} GiB/device", flush=True)
  lines = ["Per-device memory of the 7B train step (GiB), from `--dry_run` on simulated CPU devices; one "
           "sequence per data-parallel rank (4096 tokens; 8192 bytes for bytes_n8).", "",
           "| model | params | devices | mesh (data, fsdp, tensor) | params | AdamW | compiled temp | peak | fits 80 GB "
           "| XLA:CPU schedule |", "|---|---:|---:|---|---:|---:|---:|---:|---|---|"]
  for r in rows:
    m = r["mesh"]
    lines.append(f"| 7B {r['variant']} | {r['params_total'] / 1e9:.2f}B | {r['n_devices']} | "
                 f"({m['data']}, {m['fsdp']}, {m['tensor']}) | {r['param_bytes_per_device'] / GIB:.1f} | "
                 f"{r['optimizer_bytes_per_device'] / GIB:.1f} | {r['temp_bytes'] / GIB:.1f} | "
                 f"{r['peak_bytes_estimate'] / GIB:.1f} | {'yes' if r['peak_bytes_estimate'] < 80e9 else 'no'} | "
                 f"{r.get('cpu_schedule', 'concurrency')} |")
  lines += ["", "Each row's command (with XLA_FLAGS=--xla_force_host_platform_device_count=DEVICES):", ""]
  lines += [f"- `XLA_FLAGS=--xla_force_host_platform_device_count={r['n_devices']} python {r['command']}`" for r in rows]
  lines += ["", "Regenerate the table: `python " + " ".join(["experiments/memory/paper_dry_run.py"] + args) + "`"]
  write_results(out_name, rows, lines)


if __name__ == "__main__":
  main()
