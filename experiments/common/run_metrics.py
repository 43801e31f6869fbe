"""What experiment scripts read back from a training run's W/metrics.jsonl."""
import json
import os


def records(workdir) -> list:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def last_valid(workdir) -> dict:
  """The run's last validation record."""
  return [r for r in records(workdir) if r.get("split") == "valid"][-1]


def train_curve(workdir, tokens_per_step: int):
  """(steps, next-token train loss, cumulative train seconds) of the training records; the seconds
  come from each record's tokens/s over the steps since the previous record."""
  steps, losses, seconds, t, prev = [], [], [], 0.0, 0
  for r in records(workdir):
    if r.get("split") == "valid":
      continue
    t += (r["step"] - prev) * tokens_per_step / max(r["tokens_per_sec"], 1e-9)
    prev = r["step"]
    steps.append(r["step"])
    losses.append(r["head_losses"][0])
    seconds.append(t)
  return steps, losses, seconds
