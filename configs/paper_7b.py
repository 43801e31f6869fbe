"""The paper's 7B models (Gloeckle et al. 2024), for sizing with --dry_run before renting devices.

Llama-2-7B shape: 32 layers, d_model 4096, 32 heads, SwiGLU 11008, 32k vocabulary. Parameter
parity: the n=4 model has a 28-layer trunk and 4 one-layer heads, as many parameters as n=1.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m mtp_jax.main \
        --config=configs/paper_7b.py:n4 --workdir=/tmp/7b --dry_run --config.mesh.fsdp=8 --config.mesh.data=1

Variants: n4 (default; code model), n1 (next-token baseline), bytes_n8 (byte-level, n=8).
Precision: bfloat16 compute, float32 parameters, AdamW moments and loss (the cross-entropy runs in
float32 whatever the compute dtype). Attention: `auto` (cuDNN on GPU, splash on TPU, blockwise
on CPU), so no T x T scores are materialised at 4,096-8,192 positions.
"""
from mtp_jax.config import base_config


def get_config(arg=None):
  arg = arg or "n4"
  c = base_config()
  c.model.update(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=11008,
                 max_seq_len=8192, n_future=4, dtype="bfloat16", param_dtype="float32", remat="full",
                 attention="auto")
  c.data.seq_len = 4096
  c.loss.chunk_size = 1024
  c.train.batch_size = 8        # sequences per step; scale with the data-parallel size
  c.train.learning_rate = 3e-4
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  if arg == "n1":
    c.model.n_future = 1
  elif arg == "bytes_n8":
    c.model.update(vocab_size=256 + 2, n_future=8)   # bytes + BOS and EOS, as the byte tokenizer has
    c.data.tokenizer = "bytes"
    c.data.seq_len = 8192
    c.loss.chunk_size = 1024
  elif arg != "n4":
    raise ValueError(f"configs/paper_7b.py: unknown variant {arg!r}; known: n4, n1, bytes_n8")
  return c
