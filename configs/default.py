"""The main job: a 4-head MTP model on the Python standard library, sized for a 2-core CPU (~15 min).

    python -m mtp_jax.main --config=configs/default.py --workdir=workdirs/default

Variants: `configs/default.py:n1` is the same model with one head (the next-token baseline under
parameter parity, for comparisons).
"""
from mtp_jax.config import base_config


def get_config(arg=None):
  c = base_config()
  c.model.vocab_size = 4096
  c.model.d_model = 256
  c.model.n_layers = 6
  c.model.n_heads = 8
  c.model.n_kv_heads = 4
  c.model.d_ff = 704
  c.model.n_future = 4
  c.data.seq_len = 256
  c.train.batch_size = 16
  c.train.steps = 1500
  c.train.learning_rate = 2e-3
  c.train.warmup_steps = 100
  c.train.log_every = 50
  c.train.eval_every = 500
  c.train.checkpoint_every = 250
  if arg == "n1":
    c.model.n_future = 1
  elif arg:
    raise ValueError(f"configs/default.py: unknown variant {arg!r}; known: n1")
  return c
