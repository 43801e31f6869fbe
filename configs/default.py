"""The main job: a 4-head MTP model on the Python standard library, sized for a 2-core CPU (~13 min).

    python -m mtp_jax.main --config=configs/default.py --workdir=workdirs/default

Sized by measurement on 2 CPU cores (0.65 s/step, ~3,200 tokens/s): a 2,048-piece vocabulary
(the 4 heads each run the unembedding, so vocabulary size is the largest cost; 2,048 pieces still
give ~3 characters per token on code), 256-token windows of 8, 1,100 steps (~2.3M tokens, about
half an epoch of the stdlib), and a learning rate raised for the short run. The 4,096-piece,
16 x 256 shape it replaced learned less in the same time (fewer steps).

Variants: `configs/default.py:n1` is the same model with one head (the next-token baseline under
parameter parity, for comparisons).
"""
from mtp_jax.config import base_config


def get_config(arg=None):
  c = base_config()
  c.model.vocab_size = 2048
  c.model.d_model = 256
  c.model.n_layers = 6
  c.model.n_heads = 8
  c.model.n_kv_heads = 4
  c.model.d_ff = 704
  c.model.n_future = 4
  c.data.seq_len = 256
  c.train.batch_size = 8
  c.train.steps = 1100
  c.train.learning_rate = 4e-3
  c.train.warmup_steps = 100
  c.train.log_every = 25
  c.train.eval_every = 500
  c.train.eval_batches = 16
  c.train.checkpoint_every = 250
  if arg == "n1":
    c.model.n_future = 1
  elif arg:
    raise ValueError(f"configs/default.py: unknown variant {arg!r}; known: n1")
  return c
