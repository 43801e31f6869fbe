"""Scaled dot-product attention behind one function, `attend`, with one implementation per backend.

    xla        the plain einsum: the T x S scores of every head are materialised (the reference); a
               cached decode step (<= DECODE_MAX_QUERIES queries) takes probs x V as a fused multiply-reduce
    blockwise  flash-style attention in pure JAX: queries and keys in blocks, an online softmax, and
               a custom VJP that recomputes each block's scores in the backward pass, saving only
               the output and the log-sum-exp; O(T) memory, every backend; in self-attention
               the blocks above the causal diagonal are skipped. On CPU, up to UNROLL_BLOCKS
               (query, key) block pairs run as static code rather than in XLA loops
    cudnn      `jax.nn.dot_product_attention(implementation="cudnn")`, GPU, bfloat16/float16
    splash     the TPU Pallas splash-attention kernel (training and prefill; a decode step over the
               cache, whose mask depends on each row's position, runs blockwise)
    auto       the best one the backend has (`resolve`)

Masking is by positions and segment ids: key s is visible to query t iff k_pos[s] <= q_pos[t] and
(when segments are given) k_seg[s] == q_seg[t]. `self_attention=True` says the keys are the
queries' own block with positions 0..T-1 (training and a prefill), which the fused kernels need
to use their causal masks; a decode step over the cache passes False.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mtp_jax.errors import UserError

IMPLS = ("auto", "xla", "blockwise", "cudnn", "splash")
# Implementations each backend has; "auto" resolves within these (see `resolve`).
BACKEND_IMPLS = {"cpu": ("xla", "blockwise"), "gpu": ("xla", "blockwise", "cudnn"),
                 "tpu": ("xla", "blockwise", "splash")}
# On CPU, blockwise from this many queries up: it was faster than the einsum at every length
# measured from 64 on (experiments/speed/attention_speed.py, results/attention_cpu.md; it skips the
# blocks above the diagonal). Decode steps (at most DECODE_MAX_QUERIES queries) keep the xla path.
CPU_BLOCKWISE_MIN_QUERIES = 64
DECODE_MAX_QUERIES = 16   # a cached step over at most this many queries (1, or the speculative block)
STREAM_SCORES = False     # a cached step's q @ K as a multiply-reduce too: slower than the dot on CPU (0.70-0.95x,
                          # experiments/speed/results/decode_attention.md), kept for that comparison
CACHE_WINDOW = 64         # a cached step reads the cache in multiples of this many slots (0: all of it)
BLOCK = 512          # query and key block of the blockwise implementation on accelerators
CPU_BLOCK = 128      # ... and on CPU, where a block's scores should stay in the core's cache: at 512, batch 8
                     # and 4 heads they are 32 MiB (experiments/speed/results/attention_speed.md compares block sizes)
CPU_SHORT_BLOCK = 64  # ... and on CPU for short sequences: when they make at most UNROLL_BLOCKS (query, key)
UNROLL_BLOCKS = 16    # block pairs (T <= 256), the pairs run as static code, not in XLA loops, so independent
                      # blocks run side by side: at T=256, 1.77x faster than loops over blocks of 128 and
                      # 1.18x faster than static blocks of 128 (experiments/speed/results/attention_cpu.md)
_NEG = float(jnp.finfo(jnp.float32).min)


class AttentionError(UserError):
  """An attention implementation that this backend does not have."""


def check_available(impl: str, backend: str | None = None) -> None:
  """Raise AttentionError naming the implementations the backend has, unless `impl` is one (or auto)."""
  backend = backend or jax.default_backend()
  have = BACKEND_IMPLS.get(backend, ("xla", "blockwise"))
  if impl != "auto" and impl not in have:
    raise AttentionError(f"model.attention={impl!r} is not available on backend {backend!r}; "
                         f"it has: auto, {', '.join(have)}")


def resolve(impl: str, t: int, s: int, dtype, backend: str | None = None) -> str:
  """The implementation `auto` stands for on this backend, at T queries x S keys in `dtype`."""
  if impl != "auto":
    return impl
  backend = backend or jax.default_backend()
  if backend == "tpu":
    return "splash"
  if backend == "gpu":
    return "cudnn" if jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "blockwise"
  return "blockwise" if t >= CPU_BLOCKWISE_MIN_QUERIES else "xla"


def block_plan(t: int, s: int, backend: str | None = None) -> tuple:
  """(block, unroll): the blockwise implementation's query and key block for T queries x S keys on this
  backend, and whether its block pairs run as static code (CPU, short sequences) or in XLA loops."""
  if (backend or jax.default_backend()) != "cpu":
    return BLOCK, False
  if -(-t // CPU_SHORT_BLOCK) * -(-s // CPU_SHORT_BLOCK) <= UNROLL_BLOCKS:
    return CPU_SHORT_BLOCK, True
  return CPU_BLOCK, False


def attend(q, k, v, q_pos, k_pos, q_seg=None, k_seg=None, *, impl="auto", self_attention=True):
  """q [B, T, H, D]; k, v [B, KV, S, D] (KV divides H: grouped-query); positions / segments [B, T] and
  [B, S] (segments None: not compared). Returns [B, T, H, D] in q's dtype."""
  impl = resolve(impl, q.shape[1], k.shape[2], q.dtype)
  if impl == "splash" and not self_attention:
    impl = "blockwise"   # splash's masks are static; a decode step's depends on each row's position
  return _IMPLS[impl](q, k, v, q_pos, k_pos, q_seg, k_seg, self_attention)


def _mask(q_pos, k_pos, q_seg, k_seg):
  """[B, T, S] boolean: which keys each query sees."""
  m = k_pos[:, None, :] <= q_pos[:, :, None]
  if q_seg is not None:
    m &= k_seg[:, None, :] == q_seg[:, :, None]
  return m


def _grouped(q, n_kv):
  b, t, h, d = q.shape
  return q.reshape(b, t, n_kv, h // n_kv, d)


# ----------------------------------------------------------------------------- xla (the reference)

def _xla(q, k, v, q_pos, k_pos, q_seg, k_seg, self_attention):
  return _masked(q, k, v, _mask(q_pos, k_pos, q_seg, k_seg), self_attention)


def _masked(q, k, v, mask, self_attention=False):
  """Attention under an explicit mask [B, T, S]."""
  b, t, h, d = q.shape
  if not self_attention and t <= DECODE_MAX_QUERIES:
    return _streamed(q, k, v, mask)
  qg = _grouped(q, k.shape[1])
  scores = jnp.einsum("btkgd,bksd->bkgts", qg, k).astype(jnp.float32) / jnp.sqrt(d).astype(jnp.float32)
  scores = jnp.where(mask[:, None, None], scores, _NEG)
  probs = jax.nn.softmax(scores, axis=-1)
  return jnp.einsum("bkgts,bksd->btkgd", probs.astype(q.dtype), v).reshape(b, t, h, d)


def _streamed(q, k, v, mask):
  """A decode step over the cache: probs x V as a fused multiply-reduce that reads V once.

  As a dot, probs @ V is a batch of B x KV tiny matmuls that contract V's slot axis (not its minor
  one), and XLA:CPU runs it as a slow strided matmul: over half of a greedy step at batch 16
  (experiments/speed/results/decode_profile.md). A multiply and a reduction over the slots fuse into one
  streaming pass instead. q @ K, which contracts both operands' minor axes, stays a dot (STREAM_SCORES).
  """
  b, t, h, d = q.shape
  qg = jnp.moveaxis(_grouped(q, k.shape[1]), 1, 3).astype(jnp.float32) * (d ** -0.5)     # [B, KV, G, T, D]
  if STREAM_SCORES:
    scores = jnp.sum(qg[..., None, :] * k[:, :, None, None].astype(jnp.float32), axis=-1)   # [B, KV, G, T, S]
  else:
    scores = jnp.einsum("bkgtd,bksd->bkgts", qg.astype(q.dtype), k).astype(jnp.float32)
  probs = jax.nn.softmax(jnp.where(mask[:, None, None], scores, _NEG), axis=-1)
  out = jnp.sum(probs[..., None] * v[:, :, None, None].astype(jnp.float32), axis=-2)          # [B, KV, G, T, D]
  return jnp.moveaxis(out, 3, 1).astype(q.dtype).reshape(b, t, h, d)


def tree_mask(start, ancestors, w: int):
  """[B, T, w]: a tree block written at slots start..start+T-1 [B] sees the slots before it (the history) and,
  of the block, query i the slots of its ancestors and itself (ancestors [T, T] bool, static, or [B, T, T]: a
  tree per row)."""
  j = jnp.arange(w)[None, :] - start[:, None]                                 # [B, w] index in the block
  t = ancestors.shape[-1]
  if ancestors.ndim == 3:
    inside = jax.vmap(lambda a, jj: a[:, jnp.clip(jj, 0, t - 1)])(ancestors, j)   # [B, T, w]
  else:
    inside = jnp.moveaxis(jnp.asarray(ancestors)[:, jnp.clip(j, 0, t - 1)], 0, 1)   # [B, T, w]
  return (j < 0)[:, None, :] | (inside & ((j >= 0) & (j < t))[:, None, :])


def attend_cache(q, k, v, q_pos, *, impl="auto", tree=None):
  """A decode step: queries q [B, T, H, D] at positions q_pos [B, T] against the whole cache k, v
  [B, KV, S, D], whose slot s holds position s (slots past a row's position are stale: masked).
  tree: (start [B], ancestors [T, T] or [B, T, T]): the block is a tree of candidates written at slots start.. in block
  order, q_pos their positions in the sequence (RoPE); `tree_mask` says what each sees (xla attention).

  Only the first slots can be visible: those up to the batch's furthest query. The step reads the
  smallest multiple of CACHE_WINDOW slots that holds them (a lax.switch over the static window
  sizes), so its attention grows with the generation rather than costing the whole cache from the
  first token."""
  b, s = q.shape[0], k.shape[2]
  sizes = (list(range(CACHE_WINDOW, s, CACHE_WINDOW)) if CACHE_WINDOW else []) + [s]

  def over(w):
    def run(q, k, v, q_pos):
      kw, vw = k[:, :, :w].astype(q.dtype), v[:, :, :w].astype(q.dtype)
      if tree is not None:
        return _masked(q, kw, vw, tree_mask(tree[0], tree[1], w))
      k_pos = jnp.broadcast_to(jnp.arange(w), (b, w))
      return attend(q, kw, vw, q_pos, k_pos, impl=impl, self_attention=False)
    return run
  if len(sizes) == 1:
    return over(s)(q, k, v, q_pos)
  reach = q_pos if tree is None else tree[0] + tree[1].shape[-1] - 1   # a tree's last slot lies past its positions
  index = jnp.minimum(jnp.max(reach) // CACHE_WINDOW, len(sizes) - 1)
  return jax.lax.switch(index, [over(w) for w in sizes], q, k, v, q_pos)


# ----------------------------------------------------------------------------- blockwise

def _blockwise(q, k, v, q_pos, k_pos, q_seg, k_seg, self_attention, block=None, unroll=None):
  """block, unroll: None for the backend's plan (block_plan)."""
  b, t, h, d = q.shape
  n_kv, s = k.shape[1], k.shape[2]
  plan = block_plan(t, s)
  block = block or plan[0]
  unroll = plan[1] if unroll is None else unroll
  if q_seg is None:   # one segment: the comparison is then always true
    q_seg, k_seg = jnp.zeros_like(q_pos), jnp.zeros_like(k_pos)
  bq, bk = min(block, t), min(block, s)
  pt, ps = -t % bq, -s % bk
  # Padded queries see nothing (position -1); padded keys are seen by nobody (position int max).
  pad = lambda x, n, val, axis: x if not n else jnp.pad(
      x, [(0, n if i == axis else 0) for i in range(x.ndim)], constant_values=val)
  qg = pad(_grouped(q * (d ** -0.5), n_kv), pt, 0, 1)
  q_pos, q_seg = pad(q_pos, pt, -1, 1), pad(q_seg, pt, 0, 1)
  k, v = pad(k, ps, 0, 2), pad(v, ps, 0, 2)
  k_pos, k_seg = pad(k_pos, ps, jnp.iinfo(jnp.int32).max, 1), pad(k_seg, ps, 0, 1)
  # Blocks on a leading axis: queries [nq, B, KV, G, bq, D], keys [nk, B, KV, bk, D].
  nq, nk = (t + pt) // bq, (s + ps) // bk
  qb = jnp.moveaxis(qg.reshape(b, nq, bq, n_kv, h // n_kv, d), (1, 2), (0, 4))
  kb = jnp.moveaxis(k.reshape(b, n_kv, nk, bk, d), 2, 0)
  vb = jnp.moveaxis(v.reshape(b, n_kv, nk, bk, d), 2, 0)
  blocks = lambda x, n: jnp.moveaxis(x.reshape(b, n, -1), 1, 0)
  out = _flash(qb, kb, vb, blocks(q_pos, nq), blocks(k_pos, nk), blocks(q_seg, nq), blocks(k_seg, nk), self_attention,
               unroll)
  out = jnp.moveaxis(out, (0, 4), (1, 2)).reshape(b, t + pt, h, d)
  return out[:, :t]


def _block_bias(qp, kp, qs, ks):
  """[B, 1, 1, bq, bk] float32 for one (query block, key block) pair: 0 where the key is seen, the
  float32 minimum where not. Added to the scores, it masks inside the fusion that reads them; a select
  over the [B, KV, G, bq, bk] scores was a pass of its own on XLA:CPU, in both directions
  (experiments/peers/results/peer_pytorch.md)."""
  seen = (kp[:, None, :] <= qp[:, :, None]) & (ks[:, None, :] == qs[:, :, None])
  return jnp.where(seen, 0.0, _NEG)[:, None, None]


def _scores(qi, kj):
  return jnp.einsum("bkgqd,bksd->bkgqs", qi, kj, preferred_element_type=jnp.float32)


def _key_blocks(i, bq, bk, nk, causal):
  """Key blocks [0, hi) that query block i can see: with positions 0..T-1 none past the diagonal.
  A Python int i (the unrolled path) gives a Python int."""
  if not causal:
    return nk
  return (min if isinstance(i, int) else jnp.minimum)(nk, ((i + 1) * bq + bk - 1) // bk)


def _online_softmax_step(qi, kj, vj, bias, carry):
  """Fold one key block into a query block's (max, sum, accumulator); carry None: the first block."""
  s = _scores(qi, kj) + bias
  m_new = s.max(-1) if carry is None else jnp.maximum(carry[0], s.max(-1))
  # exp(s - m_new) is exactly 0 where a key is masked, unless the row has seen no key yet (m_new
  # is then about the float32 minimum too); corr = exp(m - m_new) = 0 wipes that once it sees one.
  p = jnp.exp(s - m_new[..., None])
  pv = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32)
  if carry is None:
    return m_new, p.sum(-1), pv
  m, l, acc = carry
  corr = jnp.exp(m - m_new)
  return m_new, l * corr + p.sum(-1), acc * corr[..., None] + pv


def _normalised(qi, m, l, acc):
  # A query that sees no key at all (block padding) gets the mean of the values, as the einsum's
  # softmax over all-masked scores does; its output is sliced away and its gradient is zero. l can
  # only be 0 if scores of magnitude ~1e32 overflowed the bias to -inf: then 0, not NaN.
  l = jnp.where(l == 0, 1.0, l)
  return (acc / l[..., None]).astype(qi.dtype), m + jnp.log(l)


def _flash_forward(qb, kb, vb, qp, kp, qs, ks, causal, unroll):
  """(out [nq, B, KV, G, bq, D] in q's dtype, lse [nq, B, KV, G, bq] float32).

  The block loops are fori_loops with a traced trip count (the causal diagonal), not lax.cond:
  a cond in a custom-VJP forward under lax.scan gets linearised by JAX, which stores every block's
  scores and defeats the point. unroll: Python loops over static blocks instead.
  """
  nq, nk, bq, bk = qb.shape[0], kb.shape[0], qb.shape[-2], kb.shape[-2]
  if unroll:
    outs = []
    for i in range(nq):
      carry = None
      for j in range(_key_blocks(i, bq, bk, nk, causal)):
        carry = _online_softmax_step(qb[i], kb[j], vb[j], _block_bias(qp[i], kp[j], qs[i], ks[j]), carry)
      outs.append(_normalised(qb[i], *carry))
    return jnp.stack([o for o, _ in outs]), jnp.stack([lse for _, lse in outs])

  def one_query_block(args):
    qi, qpi, qsi, i = args

    def step(j, carry):
      return _online_softmax_step(qi, kb[j], vb[j], _block_bias(qpi, kp[j], qsi, ks[j]), carry)

    stats = qi.shape[:-1]
    init = (jnp.full(stats, _NEG, jnp.float32), jnp.zeros(stats, jnp.float32), jnp.zeros(qi.shape, jnp.float32))
    return _normalised(qi, *jax.lax.fori_loop(0, _key_blocks(i, bq, bk, nk, causal), step, init))

  return jax.lax.map(one_query_block, (qb, qp, qs, jnp.arange(nq)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _flash(qb, kb, vb, qp, kp, qs, ks, causal, unroll):
  return _flash_forward(qb, kb, vb, qp, kp, qs, ks, causal, unroll)[0]


def _flash_fwd(qb, kb, vb, qp, kp, qs, ks, causal, unroll):
  out, lse = _flash_forward(qb, kb, vb, qp, kp, qs, ks, causal, unroll)
  return out, (qb, kb, vb, qp, kp, qs, ks, out, lse)


def _block_grads(qi, kj, vj, doi, lsei, di, bias):
  """One (query block, key block) pair's share of (dq_i, dk_j, dv_j), p recomputed from the lse."""
  p = jnp.exp(_scores(qi, kj) + bias - lsei[..., None])
  dv = jnp.einsum("bkgqs,bkgqd->bksd", p.astype(doi.dtype), doi, preferred_element_type=jnp.float32)
  dp = jnp.einsum("bkgqd,bksd->bkgqs", doi, vj, preferred_element_type=jnp.float32)
  ds = (p * (dp - di[..., None])).astype(qi.dtype)
  dq = jnp.einsum("bkgqs,bksd->bkgqd", ds, kj, preferred_element_type=jnp.float32)
  return dq, jnp.einsum("bkgqs,bkgqd->bksd", ds, qi, preferred_element_type=jnp.float32), dv


def _flash_bwd(causal, unroll, res, dout):
  """FlashAttention-2's backward: per key block, sweep the query blocks that see it, recomputing p from the lse."""
  qb, kb, vb, qp, kp, qs, ks, out, lse = res
  nq, nk, bq, bk = qb.shape[0], kb.shape[0], qb.shape[-2], kb.shape[-2]
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)   # [nq, B, KV, G, bq]
  first = lambda j: (j * bk) // bq if causal else 0   # query blocks before it lie wholly above the diagonal
  pair = lambda i, j: _block_grads(qb[i], kb[j], vb[j], dout[i], lse[i], delta[i],
                                   _block_bias(qp[i], kp[j], qs[i], ks[j]))

  if unroll:
    total = lambda xs, like: functools.reduce(jnp.add, xs) if xs else jnp.zeros(like.shape, jnp.float32)
    grads = {(i, j): pair(i, j) for j in range(nk) for i in range(first(j), nq)}
    dq = jnp.stack([total([g[0] for (i, _), g in grads.items() if i == q], qb[q]) for q in range(nq)])
    dk = jnp.stack([total([g[1] for (_, j), g in grads.items() if j == k], kb[k]) for k in range(nk)])
    dv = jnp.stack([total([g[2] for (_, j), g in grads.items() if j == k], vb[k]) for k in range(nk)])
  else:
    def one_key_block(dq, j):
      def step(i, carry):
        dk, dv, dq = carry
        dqi, dkj, dvj = pair(i, j)
        return dk + dkj, dv + dvj, dq.at[i].add(dqi)

      zeros = jnp.zeros(kb.shape[1:], jnp.float32)
      dk, dv, dq = jax.lax.fori_loop(first(j), nq, step, (zeros, zeros, dq))
      return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(one_key_block, jnp.zeros(qb.shape, jnp.float32), jnp.arange(nk))
  return dq.astype(qb.dtype), dk.astype(kb.dtype), dv.astype(vb.dtype), None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- cudnn (GPU)

def _cudnn(q, k, v, q_pos, k_pos, q_seg, k_seg, self_attention):
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    raise AttentionError(f"model.attention='cudnn' needs model.dtype bfloat16 or float16, not {q.dtype}; "
                         f"use attention=blockwise (or auto) for float32")
  k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)      # cuDNN reads [B, S, KV, D]
  if self_attention:   # the causal mask by index (positions are 0..T-1) and documents kept apart
    mask = None if q_seg is None else (q_seg[:, :, None] == k_seg[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="cudnn")
  mask = _mask(q_pos, k_pos, q_seg, k_seg)[:, None]
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")


# ----------------------------------------------------------------------------- splash (TPU)

@functools.lru_cache(maxsize=None)
def _splash_kernel(n_heads: int, t: int, s: int, interpret: bool = False):
  from jax.experimental.pallas.ops.tpu import splash_attention as sa
  mask = sa.MultiHeadMask([sa.CausalMask((t, s)) for _ in range(n_heads)])
  bq, bk = min(BLOCK, t), min(BLOCK, s)
  sizes = sa.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                        block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
  return sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash(q, k, v, q_pos, k_pos, q_seg, k_seg, self_attention, interpret=False):
  from jax.experimental.pallas.ops.tpu import splash_attention as sa
  b, t, h, d = q.shape
  if q_seg is None:
    q_seg, k_seg = jnp.zeros_like(q_pos), jnp.zeros_like(k_pos)

  def local(q, k, v, q_seg, k_seg):   # one device's rows and heads: the kernel is not partitioned by XLA
    kernel = _splash_kernel(q.shape[2], t, k.shape[2], interpret)
    qh = jnp.swapaxes(q * (d ** -0.5), 1, 2).astype(q.dtype)                  # [B, H, T, D]
    one = lambda qq, kk, vv, a, c: kernel(qq, kk, vv, segment_ids=sa.SegmentIds(a, c))
    return jnp.swapaxes(jax.vmap(one)(qh, k, v, q_seg, k_seg), 1, 2)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return local(q, k, v, q_seg, k_seg)
  from jax.sharding import PartitionSpec as P
  from mtp_jax.config import BATCH_AXES
  heads = "tensor" if "tensor" in mesh.axis_names else None
  batch = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  spec_q, spec_kv, spec_ids = P(batch, None, heads, None), P(batch, heads, None, None), P(batch, None)
  return jax.shard_map(local, in_specs=(spec_q, spec_kv, spec_kv, spec_ids, spec_ids), out_specs=spec_q,
                       check_vma=False)(q, k, v, q_seg, k_seg)


_IMPLS = {"xla": _xla, "blockwise": _blockwise, "cudnn": _cudnn, "splash": _splash}
