"""Attention implementations against the einsum reference: outputs and gradients (float32, tight),
with packed documents, grouped-query heads, ragged blocks, cached decode steps and prefill; the
model and its loss with each; and the clear error for an implementation the backend lacks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtp_jax import attention
from mtp_jax.attention import AttentionError
from mtp_jax.loss import make_loss_fn
from mtp_jax.model import build_model, init_params
from tolerances import assert_close, assert_trees_close, network_k

CPU_IMPLS = ["xla", "blockwise"]


def _qkv(b, t, s, h, kv, d, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (b, t, h, d)), jax.random.normal(ks[1], (b, kv, s, d)),
          jax.random.normal(ks[2], (b, kv, s, d)))


def _value_and_grads(fn, q, k, v, *rest):
  loss = lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, *rest)))   # a non-trivial cotangent
  return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v), fn(q, k, v, *rest)


def _assert_same(fn, ref, q, k, v, *rest):
  """Outputs, the summed loss and the gradients agree within float32 reassociation (tests/tolerances.py):
  forward sums over head_dim then the S slots; the loss sums every output's error; backward adds the T queries."""
  (l1, g1), o1 = _value_and_grads(fn, q, k, v, *rest)
  (l0, g0), o0 = _value_and_grads(ref, q, k, v, *rest)
  t, s, d = q.shape[1], k.shape[2], q.shape[-1]
  assert_close(o1, o0, d + s)
  assert_close(l1, l0, (d + s) * o0.size, scale=np.max(np.abs(o0)))
  for a, b in zip(g1, g0):
    assert_close(a, b, 2 * (d + s) + t * q.shape[2] // k.shape[1])


@pytest.mark.parametrize("unroll", [False, True])   # XLA loops over the blocks, or static code
@pytest.mark.parametrize("block", [8, 16, 512])   # many blocks with a ragged last one, and a single block
def test_blockwise_self_attention_matches_xla(block, unroll):
  """Training / prefill: causal by position, packed documents (and padding segment 0), GQA 4:2."""
  q, k, v = _qkv(2, 37, 37, 4, 2, 8)
  pos = jnp.broadcast_to(jnp.arange(37), (2, 37))
  seg = jnp.array([[1] * 10 + [2] * 20 + [0] * 7, [3] * 37])
  blockwise = lambda *a: attention._blockwise(*a, True, block=block, unroll=unroll)
  xla = lambda *a: attention._xla(*a, True)
  _assert_same(blockwise, xla, q, k, v, pos, pos, seg, seg)


@pytest.mark.parametrize("unroll", [False, True])
def test_blockwise_decode_step_matches_xla(unroll):
  """A decode step over a cache: 3 queries per row at per-row positions, 40 cached slots, no segments
  (slots past a row's position hold stale junk and must stay invisible)."""
  q, k, v = _qkv(2, 3, 40, 4, 1, 8, seed=1)
  q_pos = jnp.array([[5, 6, 7], [30, 31, 32]])
  k_pos = jnp.broadcast_to(jnp.arange(40), (2, 40))
  blockwise = lambda *a: attention._blockwise(*a, False, block=16, unroll=unroll)
  xla = lambda *a: attention._xla(*a, False)
  _assert_same(blockwise, xla, q, k, v, q_pos, k_pos, None, None)


# float32: sums over head_dim (8) and the 40 slots; bfloat16: those sums run in float32, one rounding to bf16 at the end
@pytest.mark.parametrize("dtype,terms", [(jnp.float32, 48), (jnp.bfloat16, 1)])
@pytest.mark.parametrize("t", [1, 4, attention.DECODE_MAX_QUERIES + 1])   # the streaming path, and the einsum past it
def test_xla_decode_step_matches_a_numpy_reference(t, dtype, terms):
  """xla's own decode-step path (probs x V as a fused multiply-reduce over the slots) against numpy,
  with GQA 4:2 and a stale slot past every row's position holding huge values that must stay unseen;
  in bfloat16 against the reference computed from the same rounded inputs."""
  q, k, v = _qkv(2, t, 40, 4, 2, 8, seed=2)
  k, v = k.at[:, :, 39].set(1e4), v.at[:, :, 39].set(1e4)
  q, k, v = (x.astype(dtype) for x in (q, k, v))
  q_pos = jnp.array([5, 20])[:, None] + jnp.arange(t)[None]
  k_pos = jnp.broadcast_to(jnp.arange(40), (2, 40))
  got = np.asarray(attention._xla(q, k, v, q_pos, k_pos, None, None, False).astype(jnp.float32))
  qn, kn, vn = (np.asarray(x.astype(jnp.float32), np.float64) for x in (q, k, v))
  want = np.zeros_like(got, np.float64)
  for b in range(2):
    for i in range(t):
      for head in range(4):
        kk, vv = kn[b, head // 2], vn[b, head // 2]          # query heads 0-1 read kv head 0, 2-3 read 1
        sc = kk @ qn[b, i, head] / np.sqrt(8)
        sc[np.arange(40) > int(q_pos[b, i])] = -np.inf
        p = np.exp(sc - sc.max())
        want[b, i, head] = (p / p.sum()) @ vv
  assert_close(got, want, terms, dtype)


def test_splash_kernel_matches_xla_in_interpret_mode():
  """The TPU splash kernel, run by Pallas's interpreter on CPU (slow, so one small shape)."""
  q, k, v = _qkv(1, 128, 128, 4, 2, 16, seed=2)
  pos = jnp.broadcast_to(jnp.arange(128), (1, 128))
  seg = jnp.array([[1] * 50 + [2] * 78])
  splash = lambda *a: attention._splash(*a, True, interpret=True)
  xla = lambda *a: attention._xla(*a, True)
  _assert_same(splash, xla, q, k, v, pos, pos, seg, seg)


@pytest.mark.parametrize("unroll_blocks", [0, 16])   # blockwise in XLA loops, and as static code (3 x 3 blocks)
@pytest.mark.parametrize("impl", [i for i in CPU_IMPLS if i != "xla"])   # each against the xla reference
@pytest.mark.parametrize("head_type", ["parallel", "causal"])
def test_model_loss_and_grads_match_xla(make_config, monkeypatch, impl, head_type, unroll_blocks):
  """The whole multi-token loss and its gradients with each implementation; small blocks so the
  blockwise path really iterates (seq 16 in blocks of 8) over packed documents."""
  monkeypatch.setattr(attention, "CPU_BLOCK", 8)
  monkeypatch.setattr(attention, "CPU_SHORT_BLOCK", 8)
  monkeypatch.setattr(attention, "UNROLL_BLOCKS", unroll_blocks)
  tokens = jax.random.randint(jax.random.key(3), (2, 19), 0, 64)
  batch = {"tokens": tokens, "segment_ids": jnp.array([[1] * 7 + [2] * 12, [1] * 19])}

  def loss_and_grads(attn):
    c = make_config(n_future=3, head_type=head_type, attention=attn)
    model = build_model(c.model)
    params = init_params(model, jax.random.key(0))
    return jax.jit(jax.value_and_grad(make_loss_fn(model, c), has_aux=True))(params, batch)

  (loss, _), grads = loss_and_grads(impl)
  (ref, _), ref_grads = loss_and_grads("xla")
  k = network_k(make_config(n_future=3), 2, seq_len=16)
  assert_close(loss, ref, k)
  assert_trees_close(grads, ref_grads, k)


def test_auto_picks_by_backend_and_size():
  assert attention.resolve("auto", 32, 32, jnp.float32, "cpu") == "xla"
  assert attention.resolve("auto", attention.DECODE_MAX_QUERIES, 4096, jnp.float32, "cpu") == "xla"   # a decode step
  assert attention.resolve("auto", 64, 64, jnp.float32, "cpu") == "blockwise"
  assert attention.resolve("auto", 256, 256, jnp.float32, "cpu") == "blockwise"
  assert attention.resolve("auto", 256, 256, jnp.bfloat16, "gpu") == "cudnn"
  assert attention.resolve("auto", 256, 256, jnp.float32, "gpu") == "blockwise"
  assert attention.resolve("auto", 256, 256, jnp.bfloat16, "tpu") == "splash"
  assert attention.resolve("xla", 4096, 4096, jnp.float32, "tpu") == "xla"


def test_block_plan_unrolls_short_sequences_on_cpu_only():
  assert attention.block_plan(64, 64, "cpu") == (attention.CPU_SHORT_BLOCK, True)
  assert attention.block_plan(256, 256, "cpu") == (attention.CPU_SHORT_BLOCK, True)   # 4 x 4 pairs
  assert attention.block_plan(512, 512, "cpu") == (attention.CPU_BLOCK, False)        # loops beyond
  assert attention.block_plan(256, 256, "gpu") == attention.block_plan(256, 256, "tpu") == (attention.BLOCK, False)


@pytest.mark.parametrize("impl,backend", [("cudnn", "cpu"), ("splash", "cpu"), ("splash", "gpu"), ("cudnn", "tpu")])
def test_missing_implementation_names_the_available_ones(impl, backend):
  with pytest.raises(AttentionError, match=f"model.attention='{impl}' is not available on backend '{backend}'"):
    attention.check_available(impl, backend)
  for ok in ("auto", "xla", "blockwise"):
    attention.check_available(ok, backend)


def test_build_model_refuses_before_compiling(make_config):
  if jax.default_backend() != "cpu":
    pytest.skip("checks the CPU backend's list")
  with pytest.raises(AttentionError, match="it has: auto, xla, blockwise"):
    build_model(make_config(attention="cudnn").model)
