"""Layer pieces with hand-written backward passes that keep fewer activations than autodiff would.

Under the trunk's `lax.scan`, every buffer a layer's backward pass needs is stacked across the layers
in the forward pass and read back in the backward pass (on XLA:CPU a copy each way). Autodiff of
these pieces keeps buffers that are cheap to recompute from ones kept anyway:

- `rms_norm_lean` keeps x and each row's 1/rms, not the normalised x as well. Only layers that are not
  rematerialised use it (model.RMSNorm(lean=True)): a rematerialised layer stacks nothing, and there the
  plain `rms_norm` planned less (7B dry run at fsdp=8, bfloat16: 7.5 against 7.9 GiB of temporaries);
- `swiglu_project` (SwiGLU, then the down projection) keeps gate and up, not the sigmoid, the two
  products, or silu(gate) * up, the projection's input: the backward pass recomputes it in the
  elementwise pass that reads gate and up.

Together they drop about a quarter of the bytes a Llama layer stacks (the two norms' normalised inputs and
the MLP's hidden activation; d_ff = 2.75 d).
Each one's forward is the plain formula, and each gradient is checked against autodiff (tests/test_model.py).
"""
import functools

import jax
import jax.numpy as jnp

from mtp_jax import row_products


# ----------------------------------------------------------------------------- RMSNorm

def _rms_norm_parts(x, scale, eps):
  x32 = x.astype(jnp.float32)
  r = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (x32 * r * scale.astype(jnp.float32)).astype(x.dtype), r


def rms_norm(x, scale, eps: float):
  """x / rms(x) * scale over the last axis, computed in float32, returned in x's dtype (autodiff's backward)."""
  return _rms_norm_parts(x, scale, eps)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm_lean(x, scale, eps: float):
  """rms_norm, whose backward keeps x and 1/rms only."""
  return _rms_norm_parts(x, scale, eps)[0]


def _rms_norm_fwd(x, scale, eps):
  y, r = _rms_norm_parts(x, scale, eps)
  return y, (x, scale, r)


def _rms_norm_bwd(eps, res, g):
  x, scale, r = res
  n = x.astype(jnp.float32) * r                           # the normalised x, recomputed
  g32 = g.astype(jnp.float32)
  gs = g32 * scale.astype(jnp.float32)
  dx = r * (gs - n * jnp.mean(gs * n, axis=-1, keepdims=True))
  d_scale = jnp.sum((g32 * n).reshape(-1, n.shape[-1]), axis=0)
  return dx.astype(x.dtype), d_scale.astype(scale.dtype)


rms_norm_lean.defvjp(_rms_norm_fwd, _rms_norm_bwd)


# ----------------------------------------------------------------------------- SwiGLU

def _silu_times(gate, up):
  return jax.nn.silu(gate) * up


def _swiglu_grads(gate, up, g):
  """(d_gate, d_up) of silu(gate) * up for its cotangent g, in gate's and up's dtypes."""
  x = gate.astype(jnp.float32)
  s = jax.nn.sigmoid(x)
  g32 = g.astype(jnp.float32)
  d_up = g32 * x * s
  d_gate = g32 * up.astype(jnp.float32) * s * (1 + x * (1 - s))
  return d_gate.astype(gate.dtype), d_up.astype(up.dtype)


def _project(hidden, kernel):
  """hidden [..., F] @ kernel [F, D] (a few rows on CPU: one product per row, row_products)."""
  return row_products.project(hidden, kernel)


@jax.custom_vjp
def swiglu_project(gate, up, kernel):
  """(silu(gate) * up) @ kernel: gate, up [..., F], kernel [F, D], all in the compute dtype."""
  return _project(_silu_times(gate, up), kernel)


def _swiglu_project_fwd(gate, up, kernel):
  return swiglu_project(gate, up, kernel), (gate, up, kernel)


def _swiglu_project_bwd(res, g):
  gate, up, kernel = res
  hidden = _silu_times(gate, up)                           # the projection's input, recomputed
  lead = tuple(range(g.ndim - 1))
  d_kernel = jax.lax.dot_general(hidden, g, ((lead, lead), ((), ())))
  d_hidden = jax.lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ())))
  return (*_swiglu_grads(gate, up, d_hidden), d_kernel.astype(kernel.dtype))


swiglu_project.defvjp(_swiglu_project_fwd, _swiglu_project_bwd)
