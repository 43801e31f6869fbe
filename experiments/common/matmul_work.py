"""How much matrix-multiply work a train step does, counted from the model config: the ratio a step made
only of matmuls would show between two configs (experiments/speed/step_ratio.py, experiments/peers/peer_pytorch.py).
tests/test_experiments.py checks the count against the dot_generals in the train gradient's jaxpr."""


def matmul_macs(m, seq_len: int, remat_heads: bool = True, keys_per_query=None) -> float:
  """Multiply-accumulates per token of one train step's matrix multiplies (forward, backward and
  recomputation), from a model config m with transformer-layer heads.

  A layer: the q, k, v, o projections, the SwiGLU's three, and attention's two products over
  keys_per_query keys (default the causal average, (seq_len + 1) / 2; model.attention=xla scores all
  seq_len). Backward costs two forwards. Trunk layers are recomputed once under model.remat=full,
  and for n > 1 the head layers under the scan loss unless remat_heads=False (n=1 runs no scan). Each head
  unembeds three times: the logits, then d_hidden and d_kernel, which the fused cross-entropy forms in its
  forward pass and never recomputes (mtp_jax/cross_entropy.py).
  """
  if m.head_type not in ("parallel", "causal"):
    raise ValueError(f"matmul_macs counts transformer-layer heads, not model.head_type={m.head_type!r}")
  hd = m.d_model // m.n_heads
  layer = (2 * m.d_model * m.n_heads * hd + 2 * m.d_model * m.n_kv_heads * hd + 3 * m.d_model * m.d_ff
           + 2 * m.n_heads * hd * ((seq_len + 1) / 2 if keys_per_query is None else keys_per_query))
  n = m.n_future
  trunk = m.n_layers - n if m.parity else m.n_layers
  trunk_passes = 3 + (m.remat == "full")
  head_passes = 3 + (n > 1 and remat_heads)
  return (trunk * trunk_passes + n * head_passes) * layer + n * 3 * m.d_model * m.vocab_size


def paper_7b_matmul_ratio() -> float:
  """n=4 / n=1 matmul work of the paper's 7B shape at parity (configs/paper_7b.py, its own remat)."""
  from mtp_jax.recipes import paper_7b
  c4, c1 = paper_7b.get_config(), paper_7b.get_config("n1")
  return matmul_macs(c4.model, c4.data.seq_len) / matmul_macs(c1.model, c1.data.seq_len)
