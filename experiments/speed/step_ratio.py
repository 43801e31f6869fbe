"""Where the n=4 / n=1 train-step time goes at parity, on configs/default.py:sp.

    python experiments/speed/step_ratio.py            # ~4 min on 2 CPU cores
    python experiments/speed/step_ratio.py --quick --out_dir=/tmp/x     # configs/tiny.py, seconds (a test runs it)

Under parity n=4 has n=1's layers (3 of the trunk's become heads), so what it adds is the multi-token
loss: 3 more unembeddings and cross-entropies (scanned, one logits buffer at a time), the switch over
the heads, and the heads' rematerialisation. Two measurements separate the parts:

- the pair at the recipe's vocabulary (2,048) and with it cut to 256, everything else equal: at 256 the
  unembeddings cost almost nothing, so what is left of the ratio is the head machinery itself;
- n=4 with its head layers not rematerialised (`loss.mtp_loss_scan(remat_heads=False)`): what the
  recomputation costs in time, and what it saves in memory.

Each row also states its matrix-multiply work over n=1's, counted from the config (matmul_work.py): the
ratio the step would show if it were all matmuls. Counted the same way for the paper's 7B
shape (configs/paper_7b.py), where the layers dwarf the unembedding, n=4 adds a few percent.

All configs' steps are timed interleaved (median of `--steps`), so drift on a shared machine hits them
alike; temporaries are the compiled step's (XLA's memory analysis). Writes experiments/speed/results/<out_name>.md
and .json.
"""
import functools
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # experiments/, for common/

import jax  # noqa: E402

from common import results_io  # noqa: E402
from common.matmul_work import matmul_macs, paper_7b_matmul_ratio  # noqa: E402
from common.step_timing import prepare_runs, temporaries_mib, time_runs  # noqa: E402
from mtp_jax import loss  # noqa: E402

_STEPS = flags.DEFINE_integer("steps", 30, "Timed steps per config (interleaved).")
_VOCABS = flags.DEFINE_list("vocabs", ["2048", "256"], "Vocabulary sizes to compare the pair at (the recipe's first).")
_TRAINER_FLAGS = flags.DEFINE_bool("trainer_flags", True, "Compile with the XLA flags the trainer sets "
                                   "(mtp_jax/cpu_flags.py); --notrainer_flags: jaxlib's defaults.")
_QUICK = flags.DEFINE_bool("quick", False, "configs/tiny.py, 3 steps: a smoke test.")
_OUT_DIR = flags.DEFINE_string("out_dir", results_io.results_folder(__file__), "Where the results files go.")
_OUT = flags.DEFINE_string("out_name", "step_ratio", "Results file stem (--quick appends _quick).")


def config(n: int, vocab: int, quick: bool):
  from mtp_jax.recipes import default, tiny
  c = tiny.get_config() if quick else default.get_config("sp")
  c.model.n_future, c.model.vocab_size, c.mesh.data = n, vocab, 1
  if quick:
    c.model.n_layers = 6   # parity needs a layer per head and a trunk
  return c


class _HeadsNotRematerialised:
  """While active, the scan loss keeps the head layers' activations instead of recomputing them (the
  loss function is looked up when a train step is built, so only steps built inside see it)."""

  def __enter__(self):
    self.saved = loss.mtp_loss_scan
    loss.mtp_loss_scan = functools.partial(self.saved, remat_heads=False)

  def __exit__(self, *exc):
    loss.mtp_loss_scan = self.saved


def main(_):
  if _TRAINER_FLAGS.value:
    from mtp_jax.cpu_flags import use_training_fusions
    use_training_fusions()   # our train step as `python -m mtp_jax.main` compiles it
  quick = _QUICK.value
  vocabs = [int(v) for v in _VOCABS.value]
  steps = 3 if quick else _STEPS.value
  device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
  t_start = time.time()
  cases = {(n, v, True): config(n, v, quick) for v in vocabs for n in (1, 4)}
  with _HeadsNotRematerialised():   # traced and compiled here; timed with the others below
    plain = {(4, vocabs[0], False): config(4, vocabs[0], quick)}
    runs = prepare_runs(plain)
  runs.update(prepare_runs(cases))
  temps = {k: temporaries_mib(run) for k, run in runs.items()}
  sec = time_runs(runs, steps)
  configs = {**cases, **plain}
  macs = {k: matmul_macs(c.model, c.data.seq_len, remat_heads=k[2]) for k, c in configs.items()}
  rows = [{"n": n, "vocab": v, "remat_heads": r, "seconds": sec[(n, v, r)], "temp_mib": temps[(n, v, r)],
           "ratio_to_n1": sec[(n, v, r)] / sec[(1, v, True)], "matmul_macs_per_token": macs[(n, v, r)],
           "matmul_ratio_to_n1": macs[(n, v, r)] / macs[(1, v, True)]}
          for (n, v, r) in sorted(sec, key=lambda k: (-k[1], k[0], not k[2]))]
  for r in rows:
    print(r, flush=True)
  c = cases[1, vocabs[0], True]
  recipe = "configs/tiny.py" if quick else "configs/default.py:sp"
  desc = (f"{recipe}: d_model {c.model.d_model}, {c.model.n_layers} layers, parallel heads under parity, "
          f"batch {c.train.batch_size} x {c.data.seq_len}, model.remat={c.model.remat}, loss.chunk_size={c.loss.chunk_size}")
  desc += f"; XLA_FLAGS: {os.environ.get('XLA_FLAGS') or 'none'}"
  paper = paper_7b_matmul_ratio()
  result = {"device": device, "recipe": desc, "trainer_flags": _TRAINER_FLAGS.value, "steps": steps,
            "wall_s": time.time() - t_start, "rows": rows, "paper_7b_matmul_ratio_n4_over_n1": paper}
  lines = ["# n=4 / n=1 train-step time at parity, by part", "",
           f"{device}; {desc}; random tokens; medians of {steps} interleaved steps, all configs in one loop.", "",
           "| vocab | n | head layers | ms/step | / n=1 at this vocab | matmul work / n=1 | temporaries MiB |",
           "|---:|---:|---|---:|---:|---:|---:|"]
  for r in rows:
    heads = "rematerialised (default)" if r["remat_heads"] else "kept"
    lines.append(f"| {r['vocab']} | {r['n']} | {heads if r['n'] > 1 else '-'} | {r['seconds'] * 1e3:.1f} | "
                 f"{r['ratio_to_n1']:.3f} | {r['matmul_ratio_to_n1']:.3f} | {r['temp_mib']:.0f} |")
  lines += ["", "matmul work / n=1: the step's matrix-multiply work over n=1's at the same vocabulary, counted from the "
            "config (experiments/common/matmul_work.py: forward, backward, recomputation, and three unembeddings per head), the ratio a "
            f"step made only of matmuls would show. Counted the same way, the paper's 7B shape (configs/paper_7b.py, "
            f"n=4 against its n1 variant) adds {100 * (paper - 1):.1f}%."]
  lines += ["", f"Wall-clock: {result['wall_s']:.0f} s. Command: `python experiments/speed/step_ratio.py "
            f"{' '.join(a for a in sys.argv[1:] if not a.startswith('--out_dir'))}`"]
  results_io.write_results(_OUT.value + ("_quick" if quick else ""), result, lines, _OUT_DIR.value)


if __name__ == "__main__":
  app.run(main)
