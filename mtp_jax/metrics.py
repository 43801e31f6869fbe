"""Where a run's numbers go: one console line, one JSON object in W/metrics.jsonl, TensorBoard scalars.

In a Jupyter or Colab kernel the console line becomes a progress bar (tqdm) showing the loss and
tokens/s; the CLI keeps its log lines. Only process 0 writes. On a bucket (gs://) metrics.jsonl is
rewritten whole at every record (objects cannot be appended to) and TensorBoard's events go through
tensorboardX's own gs:// writer, which uploads its whole event file at each flush. On resume, records
past the restored step are dropped from metrics.jsonl
(they belong to steps the restarted run redoes), so the file reads as one consistent run. TensorBoard
event files cannot be rewritten: redone steps show up twice there, TensorBoard draws the later ones.
"""
from __future__ import annotations

import json
import math
import sys
import time

import jax
import numpy as np

from mtp_jax import io
from mtp_jax import workdir as workdir_lib

METRICS_FILE = workdir_lib.METRICS


def _floats(x) -> list[float]:
  return [float(v) for v in np.asarray(x).reshape(-1)]


def truncate_after(workdir, step: int) -> None:
  """Keep only records with record['step'] <= step (atomically)."""
  path = io.path(workdir) / METRICS_FILE
  if not path.exists():
    return
  kept = []
  for line in path.read_text().splitlines():
    try:
      if json.loads(line)["step"] <= step:
        kept.append(line)
    except (ValueError, KeyError, TypeError):
      pass  # a line cut short by a kill
  io.write_text(path, "".join(l + "\n" for l in kept))


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def in_notebook() -> bool:
  """True inside a Jupyter or Colab kernel (not in a terminal IPython or a plain interpreter)."""
  ipython = sys.modules.get("IPython")
  shell = ipython.get_ipython() if ipython and hasattr(ipython, "get_ipython") else None
  return type(shell).__name__ in ("ZMQInteractiveShell", "Shell")   # Jupyter's; Colab's google.colab._shell.Shell


def _clock(t: float) -> str:
  """The wall-clock time of a console line (the date is in metrics.jsonl's "time")."""
  return time.strftime("%H:%M:%S", time.localtime(t))


class MetricsWriter:
  """flops_per_token: the model FLOPs of one trained token (dry_run.flops_per_token); peak_flops: the peak
  FLOP/s of all devices together (dry_run.PEAK_FLOPS), None where unknown (CPUs). With them each train
  record holds the model FLOP/s achieved ("flops_per_sec") and the model FLOPs utilisation ("mfu"), and every
  record the wall-clock time it was written ("time", Unix seconds)."""

  def __init__(self, workdir, total_steps: int, flops_per_token: float | None = None,
               peak_flops: float | None = None):
    self.total = total_steps
    self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
    self.active = jax.process_index() == 0
    self.file = self.tb = self.bar = None
    if self.active and in_notebook():
      import importlib.util
      if importlib.util.find_spec("ipywidgets"):
        from tqdm.notebook import tqdm   # a widget (Colab, Jupyter with ipywidgets)
      else:
        from tqdm.std import tqdm        # text; tqdm.auto would warn that ipywidgets is missing
      self.bar = tqdm(total=total_steps, unit="step", desc="train")
    if self.active:
      from tensorboardX import SummaryWriter
      path = io.path(workdir) / METRICS_FILE
      self.file = _WholeObject(path) if io.is_remote(path) else open(path, "a")
      self.tb = SummaryWriter(str(workdir))

  def _write(self, record: dict, prefix: str):
    if not self.active:
      return
    self.file.write(json.dumps(record) + "\n")
    self.file.flush()
    for key, value in record.items():
      if isinstance(value, list):
        for i, v in enumerate(value):
          self.tb.add_scalar(f"{prefix}/{key}/head{i + 1}", v, record["step"])
      elif isinstance(value, (int, float)) and key not in ("step", "time"):
        self.tb.add_scalar(f"{prefix}/{key}", value, record["step"])

  def train(self, step: int, metrics: dict, tokens_per_sec: float, seconds_per_step: float) -> dict:
    """metrics: the train step's outputs, already on host."""
    record = {"step": step, "loss": float(metrics["loss"]), "head_losses": _floats(metrics["head_losses"]),
              "head_accuracies": _floats(metrics["head_accuracies"]),
              "head_acceptance": _floats(metrics["head_acceptance"]), "lr": float(metrics["lr"]),
              "grad_norm": float(metrics["grad_norm"]), "tokens_per_sec": round(tokens_per_sec, 1),
              "time": round(time.time(), 3)}
    if self.flops_per_token:
      record["flops_per_sec"] = float(f"{tokens_per_sec * self.flops_per_token:.4g}")
      if self.peak_flops:
        record["mfu"] = round(record["flops_per_sec"] / self.peak_flops, 4)
    self._write(record, "train")
    if self.bar is not None:
      self.bar.update(step - self.bar.n)
      self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{tokens_per_sec:,.0f}",
                           **({"mfu": f"{record['mfu']:.1%}"} if "mfu" in record else {}))
    elif self.active:
      heads = " ".join(f"{v:.3f}" for v in record["head_losses"])
      accept = "" if len(record["head_acceptance"]) < 2 else \
          "  accept [" + " ".join(f"{v:.2f}" for v in record["head_acceptance"][1:]) + "]"
      flops = record.get("flops_per_sec")
      use = f"  MFU {record['mfu']:.1%}" if "mfu" in record else (
          "" if flops is None else f"  {flops / 1e12:.3g} TFLOP/s" if flops >= 1e12 else f"  {flops / 1e9:.3g} GFLOP/s")
      print(f"{_clock(record['time'])}  step {step:>{len(str(self.total))}}/{self.total}  loss {record['loss']:.4f}  "
            f"heads [{heads}]{accept}  lr {record['lr']:.2e}  gnorm {record['grad_norm']:.3f}  "
            f"{tokens_per_sec:,.0f} tok/s{use}  ETA {_duration((self.total - step) * seconds_per_step)}", flush=True)
    return record

  def valid(self, record: dict) -> None:
    record.setdefault("time", round(time.time(), 3))
    self._write(record, "valid")
    if self.active:
      heads = " ".join(f"{v:.3f}" for v in record["head_losses"])
      acc = " ".join(f"{v:.3f}" for v in record["head_accuracies"])
      accept = " ".join(f"{v:.3f}" for v in record["head_acceptance"])
      print(f"{_clock(record['time'])}  valid at step {record['step']}: loss {record['loss']:.4f}  heads [{heads}]  "
            f"accuracy [{acc}]  acceptance [{accept}]", flush=True)

  def close(self):
    if self.bar is not None:
      self.bar.close()
    if self.active:
      self.file.close()
      self.tb.close()


class _WholeObject:
  """An append-only text file on a bucket: the object is rewritten whole at each flush."""

  def __init__(self, path):
    self.path = path
    self.text = path.read_text() if path.exists() else ""

  def write(self, s: str):
    self.text += s

  def flush(self):
    io.write_text(self.path, self.text)

  def close(self):
    self.flush()


def valid_record(step: int, sums: dict, weights, **extra) -> dict:
  """Per-head means from sums over the whole validation set ('nll', 'hits', 'tokens', each [n], on host).

  weights: `config.loss_weights` at this step; the total is their plain dot with the head losses.
  """
  tokens = np.maximum(np.asarray(sums["tokens"]), 1)
  losses, accs = np.asarray(sums["nll"]) / tokens, np.asarray(sums["hits"]) / tokens
  # acceptance: head i right where heads 1..i-1 were all right (what speculative decoding keeps)
  accept = np.asarray(sums["accepted"]) / np.maximum(np.asarray(sums["given"]), 1)
  w = np.asarray(weights, np.float64)
  return {"split": "valid", "step": step, "loss": float((w * losses).sum()),
          "head_losses": _floats(losses), "head_accuracies": _floats(accs), "head_acceptance": _floats(accept),
          "tokens": int(np.asarray(sums["tokens"])[0]), **extra}


def final_table(record: dict, unigram: float, vocab_size: int) -> str:
  """Per-head validation loss and accuracy beside the context-free baselines."""
  lines = ["", f"final validation at step {record['step']} ({record['tokens']:,} target tokens per head)",
           "  head  predicts  loss (nats)  accuracy  acceptance"]
  accept = record.get("head_acceptance", [float("nan")] * len(record["head_losses"]))
  for i, (l, a, c) in enumerate(zip(record["head_losses"], record["head_accuracies"], accept)):
    lines.append(f"  {i + 1:>4}  t+{i + 1:<6}  {l:>11.4f}  {a:>8.3f}  {c:>10.3f}")
  lines.append(f"  unigram baseline (train-split token frequencies): {unigram:.4f} nats")
  lines.append(f"  uniform baseline (log vocab_size):                {math.log(vocab_size):.4f} nats")
  return "\n".join(lines)
