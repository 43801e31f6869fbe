"""Device meshes, logical-axis rules and the shardings of the train state and batches.

Parameters and activations carry logical axis names (model.py); `config.mesh.rules` maps them to
the mesh axes `data`, `fsdp` and `tensor`. Parameters are FSDP-sharded over `fsdp` on their
`embed` dimension and tensor-sharded over `tensor` on heads / MLP / vocabulary; batches are split
over `data` x `fsdp`. One jitted program with these shardings is pjit in its current form.
"""
from __future__ import annotations

import contextlib
import os

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from mtp_jax.config import BATCH_AXES, MESH_AXES
from mtp_jax.errors import UserError


def mesh_shape(mesh_cfg, n_devices: int) -> tuple[int, int, int]:
  """Resolve -1 (at most one axis) to the devices left over; the product must equal n_devices."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise UserError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
  fixed = int(np.prod([s for s in sizes if s != -1]))
  if free:
    if n_devices % fixed:
      raise UserError(f"mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes ({fixed}) do not divide the "
                      f"{n_devices} devices; pick sizes whose product divides {n_devices}")
    sizes[free[0]] = n_devices // fixed
  if int(np.prod(sizes)) != n_devices:
    raise UserError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices but "
                    f"{n_devices} are present; make data*fsdp*tensor = {n_devices} or set one axis to -1")
  return tuple(sizes)


def check_divisibility(config, sizes) -> None:
  """Every sharded dimension must split evenly; say which one does not, before any compile."""
  data, fsdp, tensor = sizes
  m, b = config.model, config.train.batch_size
  if b % (data * fsdp):
    raise UserError(f"train.batch_size={b} is not divisible by the data-parallel size data*fsdp={data * fsdp}; "
                    f"use a multiple of {data * fsdp}")
  for name, dim, axis, size in (("model.n_heads", m.n_heads, "tensor", tensor),
                                ("model.n_kv_heads", m.n_kv_heads, "tensor", tensor),
                                ("model.d_ff", m.d_ff, "tensor", tensor),
                                ("model.vocab_size", m.vocab_size, "tensor", tensor),
                                ("model.d_model", m.d_model, "fsdp", fsdp)):
    if dim % size:
      raise UserError(f"{name}={dim} is not divisible by mesh.{axis}={size}; pick mesh.{axis} dividing {dim}")


def make_mesh(config, devices=None) -> jax.sharding.Mesh:
  devices = list(devices if devices is not None else jax.devices())
  sizes = mesh_shape(config.mesh, len(devices))
  check_divisibility(config, sizes)
  return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def rules(config):
  return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in config.mesh.rules)


@contextlib.contextmanager
def activate(mesh, config):
  """The mesh and logical rules that model.py's activation constraints resolve against."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules(config)):
    yield


def logical_to_shardings(logical_specs, mesh, config):
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules(config))


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def bytes_per_device(abstract_tree, shardings) -> int:
  """Bytes one device holds of a pytree of ShapeDtypeStructs laid out by `shardings`."""
  total = 0
  for leaf, sh in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
    total += int(np.prod(sh.shard_shape(leaf.shape))) * np.dtype(leaf.dtype).itemsize
  return total


def _multiprocess_environment() -> bool:
  """True when the launcher started several processes of one job (TPU pod slice, SLURM, MPI, or by hand)."""
  env = os.environ
  as_int = lambda k: int(env.get(k, "1") or 1)
  return bool(env.get("JAX_COORDINATOR_ADDRESS") or as_int("SLURM_NTASKS") > 1
              or as_int("OMPI_COMM_WORLD_SIZE") > 1 or "," in env.get("TPU_WORKER_HOSTNAMES", ""))


def maybe_initialize_distributed() -> None:
  """Join the multi-host job the environment describes; jax finds the coordinator itself on TPU pods,
  SLURM and MPI, and from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID otherwise."""
  if _multiprocess_environment():
    kw = {}
    if os.environ.get("JAX_NUM_PROCESSES"):
      kw = {"num_processes": int(os.environ["JAX_NUM_PROCESSES"]), "process_id": int(os.environ["JAX_PROCESS_ID"])}
    jax.distributed.initialize(**kw)
