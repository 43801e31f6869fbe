"""What the fused, chunked cross-entropy costs: train-step memory and time on configs/default.py:sp at vocab 32000.

    python experiments/memory/ce_chunk.py        # ~5 min on 2 CPU cores

For n=1 and n=4 (parity, no rematerialisation), compiles the train step with the naive loss (every
head's logits kept by autodiff: the reference), the scan loss unchunked (loss.chunk_size=0) and the
scan loss with the automatic chunk (loss.chunk_size=-1, see cross_entropy.auto_chunk), reads XLA's
planned temporaries, then times them interleaved (median of steps) on the same device.
Writes experiments/memory/results/ce_chunk.md and .json.
"""
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # experiments/, for common/

import jax  # noqa: E402

from common.results_io import write_results  # noqa: E402
from common.step_timing import interleaved_step_seconds  # noqa: E402
from mtp_jax.recipes.default import get_config  # noqa: E402
from mtp_jax import sharding  # noqa: E402
from mtp_jax.cross_entropy import auto_chunk  # noqa: E402
from mtp_jax.dry_run import compile_train_step, memory_report  # noqa: E402

_VOCAB = flags.DEFINE_integer("vocab", 32000, "Vocabulary size.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per variant (after one warm-up).")
_TRAINER_FLAGS = flags.DEFINE_bool("trainer_flags", True, "Compile with the XLA flags the trainer sets "
                                   "(mtp_jax/cpu_flags.py); --notrainer_flags: jaxlib's defaults.")
_OUT = flags.DEFINE_string("out_name", "ce_chunk", "Results file stem under experiments/memory/results/.")

VARIANTS = [(1, "naive", 0), (1, "scan", 0), (1, "scan", -1), (4, "naive", 0), (4, "scan", 0), (4, "scan", -1)]


def config(n, impl, chunk):
  c = get_config("sp")
  c.model.update(vocab_size=_VOCAB.value, n_future=n)
  c.loss.impl, c.loss.chunk_size = impl, chunk
  c.mesh.data = 1
  return c


def main(_):
  if _TRAINER_FLAGS.value:
    from mtp_jax.cpu_flags import use_training_fusions
    use_training_fusions()   # our train step as `python -m mtp_jax.main` compiles it
  device = f"{jax.devices()[0].device_kind} ({jax.default_backend()})"
  rows = []
  for v in VARIANTS:
    c = config(*v)
    mesh = sharding.make_mesh(c, jax.devices()[:1])
    temp = memory_report(compile_train_step(c, mesh)[0])["temp_bytes"]
    rows.append({"n": v[0], "impl": v[1], "chunk_size": v[2], "temp_bytes": temp})
    print(v, f"temp {temp / 2**20:.0f} MiB", flush=True)
  seconds = interleaved_step_seconds({v: config(*v) for v in VARIANTS}, _STEPS.value)
  for r, v in zip(rows, VARIANTS):
    r["seconds_per_step"] = seconds[v]
  c = config(1, "scan", -1)
  chunk = auto_chunk(c.train.batch_size, c.data.seq_len, _VOCAB.value)
  lines = [f"Train step of configs/default.py:sp at vocab {_VOCAB.value} (batch {c.train.batch_size} x "
           f"{c.data.seq_len}, parity, no remat), {device}: XLA's planned temporaries and the median of "
           f"{_STEPS.value} interleaved steps. chunk -1 = automatic ({chunk} positions here). XLA_FLAGS: "
           f"{os.environ.get('XLA_FLAGS') or 'none'}.", "",
           "| n | loss | chunk | temp MiB | s/step |", "|---:|---|---:|---:|---:|"]
  lines += [f"| {r['n']} | {r['impl']} | {r['chunk_size']} | {r['temp_bytes'] / 2**20:.0f} | "
            f"{r['seconds_per_step']:.3f} |" for r in rows]
  get = lambda n, impl, ch, k: next(r[k] for r in rows if (r["n"], r["impl"], r["chunk_size"]) == (n, impl, ch))
  ratios = {"scan n=1 temp / naive n=1 temp": get(1, "scan", 0, "temp_bytes") / get(1, "naive", 0, "temp_bytes"),
            "scan n=4 temp / scan n=1 temp": get(4, "scan", 0, "temp_bytes") / get(1, "scan", 0, "temp_bytes"),
            "auto-chunk n=1 time / unchunked n=1 time": get(1, "scan", -1, "seconds_per_step") / get(1, "scan", 0, "seconds_per_step"),
            "auto-chunk n=4 time / unchunked n=4 time": get(4, "scan", -1, "seconds_per_step") / get(4, "scan", 0, "seconds_per_step"),
            "scan n=1 time / naive n=1 time": get(1, "scan", 0, "seconds_per_step") / get(1, "naive", 0, "seconds_per_step")}
  lines += ["", "| ratio | value |", "|---|---:|"] + [f"| {k} | {v:.3f} |" for k, v in ratios.items()]
  lines += ["", f"Command: `python experiments/memory/ce_chunk.py {' '.join(sys.argv[1:])}`"]
  write_results(_OUT.value, {"device": device, "vocab": _VOCAB.value, "auto_chunk": chunk, "rows": rows,
                             "ratios": ratios}, lines)


if __name__ == "__main__":
  app.run(main)
