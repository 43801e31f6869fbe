"""What the generated-corpus experiments (induction.py, poly_arithmetic.py) share: the corpus written once
as JSONL, and a byte-level run of the library's own pipeline on it."""
import json
import os


def write_texts(path: str, texts) -> None:
  """Write texts() (a callable, so nothing is generated when the file exists) as {"text": ...} lines,
  atomically: an interrupted write never leaves a short corpus that a rerun would take as complete."""
  if os.path.exists(path):
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    for text in texts():
      f.write(json.dumps({"text": text}) + "\n")
  os.replace(path + ".tmp", path)


def byte_config(corpus: str, shape: tuple, n: int, steps: int, seq_len: int, valid_fraction: float):
  """A bytes model of shape (d_model, n_layers, n_heads, n_kv_heads, d_ff) with n parallel transformer
  heads under parity, trained `steps` steps on the JSONL corpus (evaluated and checkpointed at the end)."""
  from mtp_jax.config import base_config
  d, layers, heads, kv, ff = shape
  c = base_config()
  c.data.update(source="jsonl", path=corpus, tokenizer="bytes", seq_len=seq_len, valid_fraction=valid_fraction)
  c.model.update(vocab_size=258, d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=kv, d_ff=ff,
                 max_seq_len=256, n_future=n, head_type="parallel", parity=True)
  c.train.update(steps=steps, batch_size=8, learning_rate=3e-3, warmup_steps=max(1, steps // 20),
                 log_every=max(1, steps // 40), eval_every=steps, checkpoint_every=steps, eval_batches=16)
  return c
