"""A seconds-per-step model for tests and smoke runs.

    python -m mtp_jax.main --config=configs/tiny.py --workdir=/tmp/tiny

Variants `configs/tiny.py:bytes` uses the byte-level tokenizer.
"""
from mtp_jax.config import base_config


def get_config(arg=None):
  c = base_config()
  c.model.vocab_size = 512     # sentencepiece with byte fallback needs > 259 ids
  c.model.d_model = 32
  c.model.n_layers = 3
  c.model.n_heads = 4
  c.model.n_kv_heads = 2
  c.model.d_ff = 64
  c.model.max_seq_len = 256
  c.model.n_future = 2
  c.data.seq_len = 32
  c.data.max_train_bytes = 400_000
  c.train.batch_size = 4
  c.train.steps = 20
  c.train.warmup_steps = 2
  c.train.log_every = 5
  c.train.eval_every = 10
  c.train.eval_batches = 2
  c.train.checkpoint_every = 10
  if arg == "bytes":
    c.data.tokenizer = "bytes"
    c.model.vocab_size = 258    # 256 bytes + BOS + EOS (tokenizer.ByteTokenizer)
  elif arg:
    raise ValueError(f"configs/tiny.py: unknown variant {arg!r}; known: bytes")
  return c
