"""XLA:CPU with and without YNNPACK running the elementwise and reduction fusions (mtp_jax/cpu_flags.py).

    python experiments/cpu_fusions.py          # ~4 min on 2 CPU cores

XLA reads its flags once per process, so each setting runs in a process of its own: for every model
below a worker process times the train step (median of --steps after one warm-up), and the decode
loop's greedy and speculative steps at batch 16 on the default recipe (random weights; a step's cost
does not depend on their values). The two settings alternate over --bouts bouts (A B A B), so drift on
a shared machine hits both; each figure is the best bout's median. The first loss of each setting is
recorded (one step from the warmed-up state): the flag must not change what is computed beyond float rounding.
Writes experiments/results/<out_name>.md and .json.
"""
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {"default": "", "fusions": "--{}={}"}
MODELS = ("peer", "default", "default_sp")


def _config(name: str):
  from configs import default
  if name == "peer":   # experiments/peer_pytorch.py's tiny Llama, n=1 at parity
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    from peer_pytorch import our_config
    return our_config(1)
  c = default.get_config("sp" if name == "default_sp" else None)
  c.mesh.data = 1
  return c


def worker(steps: int) -> dict:
  """This process's figures (its XLA_FLAGS are the setting)."""
  import jax
  from step_timing import prepare_runs, time_runs
  runs = prepare_runs({m: _config(m) for m in MODELS})
  first_loss = {}
  for m, run in runs.items():   # the loss of the warm-up step's state on its batch, before any timing
    step, state, batch, _ = run
    _, metrics = step(jax.tree.map(lambda x: x.copy(), state), batch)
    first_loss[m] = float(metrics["loss"])
  train = time_runs(runs, steps)
  return {"train_s": train, "first_loss": first_loss, "decode_s": _decode_steps(), "xla_flags": os.environ.get("XLA_FLAGS", "")}


def _decode_steps(batch: int = 16, iters: int = 30, repeats: int = 5) -> dict:
  """Seconds per decode-loop step, greedy and speculative, default recipe at random init."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from step_timing import decode_step_program
  from mtp_jax import decode
  from mtp_jax.model import ModelArgs, build_model, init_params
  c = _config("default")
  args = ModelArgs.from_config(c.model)
  params = init_params(build_model(c.model), jax.random.key(0))
  prompts = np.random.default_rng(0).integers(0, args.vocab_size, (batch, 64)).tolist()
  tokens, lengths = map(jnp.asarray, decode.pad_prompts(prompts, 64))
  out = {}
  for mode in ("greedy", "speculative"):
    f = decode_step_program(params, args, mode, tokens, lengths, iters, 256)
    jax.block_until_ready(f())
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(f())
      times.append((time.perf_counter() - t0) / iters)
    out[mode] = statistics.median(times)
  return out


def main():
  from absl import flags
  flags.DEFINE_integer("steps", 10, "Timed train steps per model and bout.")
  flags.DEFINE_integer("bouts", 2, "Alternating bouts of the two settings.")
  flags.DEFINE_string("out_name", "cpu_fusions", "Results file stem under experiments/results/.")
  flags.FLAGS(sys.argv)
  f = flags.FLAGS
  import jax
  from mtp_jax.cpu_flags import TRAINING_FUSIONS
  from results_io import write_results
  start = time.time()
  bouts = {s: [] for s in SETTINGS}
  for _ in range(f.bouts):
    for s, flag in SETTINGS.items():
      env = dict(os.environ, XLA_FLAGS=flag.format(*TRAINING_FUSIONS))
      r = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", str(f.steps)], env=env, cwd=ROOT,
                         capture_output=True, text=True)
      if r.returncode:
        sys.exit(f"error: the {s} worker failed:\n{r.stderr[-3000:]}")
      bouts[s].append(json.loads(r.stdout.strip().splitlines()[-1]))
  best = {s: {"train_s": {m: min(b["train_s"][m] for b in bs) for m in MODELS},
              "decode_s": {k: min(b["decode_s"][k] for b in bs) for k in ("greedy", "speculative")},
              "first_loss": bs[0]["first_loss"]} for s, bs in bouts.items()}
  d, y = best["default"], best["fusions"]
  device = f"{jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} cores"
  names = {"peer": "tiny Llama of peer_pytorch.py, n=1 (batch 8 x 256)", "default": "configs/default.py (bytes, n=4 linear)",
           "default_sp": "configs/default.py:sp (n=4 parallel, parity)"}
  lines = [f"XLA:CPU fusions, {device}: `default` is jaxlib's own setting, `fusions` adds "
           f"`--{TRAINING_FUSIONS[0]}={TRAINING_FUSIONS[1]}` (what `python -m mtp_jax.main` sets). Each setting runs "
           f"in its own process, {f.bouts} alternating bouts, best bout's median of {f.steps} steps.", "",
           "| what | default ms | fusions ms | default / fusions | loss default | loss fusions |",
           "|---|---:|---:|---:|---:|---:|"]
  for m in MODELS:
    lines.append(f"| train step, {names[m]} | {d['train_s'][m] * 1e3:.1f} | {y['train_s'][m] * 1e3:.1f} | "
                 f"{d['train_s'][m] / y['train_s'][m]:.2f} | {d['first_loss'][m]:.5f} | {y['first_loss'][m]:.5f} |")
  for k in ("greedy", "speculative"):
    lines.append(f"| decode step, {k}, default recipe, batch 16 | {d['decode_s'][k] * 1e3:.2f} | "
                 f"{y['decode_s'][k] * 1e3:.2f} | {d['decode_s'][k] / y['decode_s'][k]:.2f} | | |")
  lines += ["", f"Wall-clock: {time.time() - start:.0f} s. Command: `python experiments/cpu_fusions.py --out_name={f.out_name}`"]
  write_results(f.out_name, {"device": device, "flag": list(TRAINING_FUSIONS), "best": best, "bouts": bouts}, lines)


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  if len(sys.argv) > 1 and sys.argv[1] == "--worker":
    print(json.dumps(worker(int(sys.argv[2]))))
  else:
    main()
