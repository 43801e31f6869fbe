"""The main job: a byte-level 4-head MTP model on the Python standard library, sized for a 2-core CPU (~14 min).

    python -m mtp_jax.main --config=configs/default.py --workdir=workdirs/default

Chosen by measurement on 2 CPU cores for both halves of the paper's claim, better training and
faster self-speculative decoding (experiments/speed/results/speculative.md and speculative_sp.md):
- Bytes (258 ids), as in the paper's byte-level models: heads 2-4 predict a few characters ahead,
  which a small model learns in minutes (2.86 tokens per forward pass at batch 1, where the
  2,048-piece `sp` variant drafts 1.84).
- Linear heads on a 12-layer, 128-wide trunk: at batch 1 a CPU step is bound by per-operation
  overhead, so verifying 4 tokens costs C ~1.3 single-token steps. With the `sp` variant's 2-layer
  trunk and 4 transformer heads a verify runs twice the layers of a greedy step (C ~2.8), and
  speculative decoding ran at 0.57x greedy speed.
- 8 windows of 256 bytes, 2,000 steps (~4.1M bytes, about a third of the stdlib), a learning rate
  raised for the short run.

Variants: `configs/default.py:n1` is the same model with one head (the next-token baseline);
`configs/default.py:sp` the sentencepiece model this recipe replaced (2,048 pieces, 256 wide,
2 trunk layers + 4 parallel transformer heads, 1,100 steps). `:accel` and `:sp_accel` are the
recipes for a GPU or TPU: bfloat16 compute with float32 parameters, AdamW state and loss, and the
backend's fused attention (`model.attention=auto`: cuDNN on GPU, splash on TPU).
"""
from mtp_jax.config import base_config


def get_config(arg=None):
  c = base_config()
  c.data.tokenizer = "bytes"
  c.model.vocab_size = 258
  c.model.d_model = 128
  c.model.n_layers = 12
  c.model.n_heads = 4
  c.model.n_kv_heads = 2
  c.model.d_ff = 352
  c.model.n_future = 4
  c.model.head_type = "linear"
  c.data.seq_len = 256
  c.train.batch_size = 8
  c.train.steps = 2000
  c.train.learning_rate = 4e-3
  c.train.warmup_steps = 100
  c.train.log_every = 25
  c.train.eval_every = 1000
  c.train.eval_batches = 16
  c.train.checkpoint_every = 500
  if arg and arg.endswith("accel"):   # accelerators: bf16 matmuls; params, optimizer and loss stay f32
    c.model.update(dtype="bfloat16", param_dtype="float32", attention="auto")
    arg = arg[:-len("accel")].rstrip("_")
  if arg == "n1":
    c.model.n_future = 1
  elif arg == "sp":
    c.data.tokenizer = "sentencepiece"
    c.model.vocab_size = 2048
    c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.n_kv_heads, c.model.d_ff = 256, 6, 8, 4, 704
    c.model.head_type = "parallel"
    c.train.steps = 1100
  elif arg:
    raise ValueError(f"configs/default.py: unknown variant {arg!r}; known: n1, sp, accel, sp_accel")
  return c
