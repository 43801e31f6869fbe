"""Checks that need 8 devices, all in one process: `XLA_FLAGS=--xla_force_host_platform_device_count=8
python tests/sharded_checks.py [NAME ...]` runs the named checks (default: all) and prints one line
`RESULTS {"name": "ok" or the traceback, ...}` (tests/test_sharding.py starts it once, so the other
tests keep one device and the 8-device start-up is paid once)."""
import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from mtp_jax import sharding  # noqa: E402
from mtp_jax.config import base_config  # noqa: E402
from mtp_jax.model import build_model, shard_params  # noqa: E402
from mtp_jax.step import init_train_state, jit_train_step, make_optimizer  # noqa: E402
from tolerances import assert_close, network_k  # noqa: E402

ALL_MESHES = {"data8": (8, 1, 1), "fsdp8": (1, 8, 1), "d2f2t2": (2, 2, 2), "tensor8": (1, 1, 8)}
# CI runs the mesh that uses every axis and the one that splits every head and KV head over 8 devices; with
# SHARDED_CHECKS_ALL_MESHES=1 (tests/test_sharding.py's slow test) every check runs on all four.
ALL = os.environ.get("SHARDED_CHECKS_ALL_MESHES") == "1"
MESHES = ALL_MESHES if ALL else {k: ALL_MESHES[k] for k in ("d2f2t2", "tensor8")}
ONE_MESH = MESHES if ALL else {"d2f2t2": ALL_MESHES["d2f2t2"]}   # for the topologies that shard like another


def sharding_config(mesh=(1, 1, 1), n_future=2, head_type="parallel"):
  """A tiny model every mesh axis of size 8 divides: 8 heads, 8 KV heads, d_ff and vocab multiples of 8."""
  c = base_config()
  c.model.update(vocab_size=64, d_model=64, n_layers=3, n_heads=8, n_kv_heads=8, d_ff=128, max_seq_len=64,
                 n_future=n_future, head_type=head_type)
  c.data.seq_len = 16
  c.train.update(batch_size=8, warmup_steps=1, steps=10)
  c.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  return c


def batches(config, count):
  rng = np.random.default_rng(0)
  shape = (config.train.batch_size, config.data.seq_len + config.model.n_future)
  for _ in range(count):
    segments = np.ones(shape, np.int32)
    segments[:, 9:] = 2
    yield {"tokens": rng.integers(0, config.model.vocab_size, shape).astype(np.int32), "segment_ids": segments}


def train(mesh_sizes, steps=3, n_future=2, head_type="parallel"):
  config = sharding_config(mesh_sizes, n_future, head_type)
  mesh = sharding.make_mesh(config, jax.devices()[:int(np.prod(mesh_sizes))])
  model, tx = build_model(config.model), make_optimizer(config.train)
  state = init_train_state(model, tx, mesh, config, jax.random.key(0))
  step = jit_train_step(model, config, tx, mesh, jax.tree.map(lambda x: x.sharding, state))
  losses = []
  with sharding.activate(mesh, config):
    for batch in batches(config, steps):
      state, metrics = step(state, jax.device_put(batch, sharding.batch_sharding(mesh)))
      losses.append(np.asarray(metrics["head_losses"]))
  return np.stack(losses), jax.device_get(state.params), state


def check_train_steps_match_single_device():
  ref_losses, ref_params, _ = train((1, 1, 1))
  k = network_k(sharding_config(), 8)
  for name, sizes in MESHES.items():
    losses, params, state = train(sizes)
    assert_close(losses, ref_losses, k, err_msg=name)      # psum over devices: float32 reduction order
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6, err_msg=name), params, ref_params)
    # The parameters really are split: an FSDP/tensor-sharded kernel holds a fraction per device.
    kernel = state.params["trunk"]["layer"]["gate"]["kernel"]
    per_device = kernel.addressable_shards[0].data.size
    expected = kernel.size // (sizes[1] * sizes[2])
    assert per_device == expected, (name, per_device, expected)
    print(f"{name}: head losses {losses[-1]} match one device", flush=True)


def check_decode_matches_single_device():
  """Greedy and speculative tokens on every mesh equal the single-device tokens (batch split over data);
  parallel and sequential heads on all four meshes, causal heads on the one that uses every axis.

  Meshes that shard the batch (over data x fsdp) decode 8 rows, so d2f2t2 compacts a sharded batch
  into a smaller stage; tensor8 (batch unsharded) decodes 2 rows, one stage, to keep the compiles few."""
  from mtp_jax import decode
  from mtp_jax.model import init_params
  # Chains: auto's cost timing would run every draft length's program several times per mesh, and auto, trees and
  # chains run the same sharded forward pass (tests/test_draft_budget.py checks them against greedy).
  chain = lambda mode: {"draft": "chain"} if mode == "speculative" else {}
  for head_type in ("parallel", "causal", "sequential"):
    config = sharding_config(n_future=3, head_type=head_type)
    model = build_model(config.model)
    params = init_params(model, jax.random.key(1))
    if head_type != "sequential":  # make drafts often right (heads copy head 0) so acceptance paths run on the mesh too
      params = dict(params, heads_1=params["heads_0"], heads_2=params["heads_0"])
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(1, 64, size=rng.integers(3, 12))) for _ in range(8)]
    # causal heads shard like parallel ones (the same head subtrees), sequential modules like trunk layers: in CI
    # one mesh with every axis for them
    meshes = MESHES if head_type == "parallel" else ONE_MESH
    padded = {rows: decode.pad_prompts(prompts[:rows], 16)
              for rows in {8 if d * f > 1 else 2 for d, f, _ in meshes.values()}}
    ref = {(rows, mode): decode.run(params, model.args, *padded[rows], mode=mode, max_new_tokens=12, **chain(mode))[0].tokens
           for rows in padded for mode in ("greedy", "speculative")}
    for rows in padded:
      np.testing.assert_array_equal(ref[rows, "greedy"], ref[rows, "speculative"])
    for name, sizes in meshes.items():
      config.mesh.update(data=sizes[0], fsdp=sizes[1], tensor=sizes[2])
      mesh = sharding.make_mesh(config)
      sharded = shard_params(params, model, mesh, config)
      batch_sh = sharding.batch_sharding(mesh)
      rows = 8 if sizes[0] * sizes[1] > 1 else 2     # the batch splits over data x fsdp
      tokens, lengths = padded[rows]
      with sharding.activate(mesh, config):
        for mode in ("greedy", "speculative"):
          out = decode.run(sharded, model.args, jax.device_put(tokens, batch_sh), jax.device_put(lengths, batch_sh),
                           mode=mode, max_new_tokens=12, **chain(mode))[0]
          np.testing.assert_array_equal(out.tokens, ref[rows, mode], err_msg=f"{head_type} {name} {mode}")
        if head_type == "parallel" and name == "d2f2t2":   # auto's per-length loops on the mesh (a given cost
          out = decode.run(sharded, model.args, jax.device_put(tokens, batch_sh),   # table: no timing runs)
                           jax.device_put(lengths, batch_sh), mode="speculative", max_new_tokens=12, draft="auto",
                           draft_costs=[1.0, 1.1, 1.2])[0]
          np.testing.assert_array_equal(out.tokens, ref[rows, "greedy"], err_msg=f"auto {name}")
      print(f"{head_type} {name}: greedy and speculative tokens match one device", flush=True)


def check_sequential_train_steps_match_single_device():
  """DeepSeek sequential modules (D=2): losses and parameters after 3 steps on a mesh equal one device's."""
  ref_losses, ref_params, _ = train((1, 1, 1), n_future=3, head_type="sequential")
  k = network_k(sharding_config(n_future=3, head_type="sequential"), 8)
  for name, sizes in ONE_MESH.items():
    losses, params, state = train(sizes, n_future=3, head_type="sequential")
    assert_close(losses, ref_losses, k, err_msg=name)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6, err_msg=name), params, ref_params)
    kernel = state.params["heads_1"]["eh_proj"]["kernel"]
    assert kernel.addressable_shards[0].data.size == kernel.size // (sizes[1] * sizes[2]), name
    print(f"sequential {name}: head losses {losses[-1]} match one device", flush=True)


def check_restore_on_another_mesh():
  """Train on data=8, keep only the step-3 checkpoint, resume on (2,2,2) (and (1,8,1)): the losses of steps
  4..6 match the uninterrupted data=8 run (to float32 reduction-order tolerance)."""
  import json
  import shutil
  import tempfile
  from configs.tiny import get_config
  from mtp_jax.train import train_and_evaluate

  tmp = tempfile.mkdtemp(prefix="mesh_restore_")

  def config(mesh):
    c = get_config()
    c.data.cache_dir = os.path.join(tmp, "cache")
    c.data.max_train_bytes = 200_000
    c.train.update(steps=6, batch_size=8, log_every=1, eval_every=6, checkpoint_every=3, keep_checkpoints=5)
    c.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
    return c

  def losses(workdir):
    records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["head_losses"] for r in records if r.get("split") != "valid"}

  reference = os.path.join(tmp, "reference")
  train_and_evaluate(config((8, 1, 1)), reference)
  expected = losses(reference)
  for mesh in ((2, 2, 2), (1, 8, 1)) if ALL else ((2, 2, 2),):
    workdir = os.path.join(tmp, f"resumed_{'_'.join(map(str, mesh))}")
    shutil.copytree(reference, workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))      # as if the run died after step 3's save
    train_and_evaluate(config(mesh), workdir)
    got = losses(workdir)
    assert sorted(got) == list(range(1, 7)), sorted(got)
    for step in (4, 5, 6):
      assert_close(got[step], expected[step], network_k(config(mesh), 8), err_msg=f"{mesh} step {step}")
    print(f"saved on (8,1,1), resumed on {mesh}: steps 4-6 match", flush=True)


CHECKS = [name[len("check_"):] for name in list(globals()) if name.startswith("check_")]


def run_checks(names):
  """{name: "ok" or the traceback} for each check, each run whatever the others did."""
  results = {}
  for name in names:
    try:
      globals()[f"check_{name}"]()
      results[name] = "ok"
    except Exception:   # reported by the test that owns the check
      results[name] = traceback.format_exc()
  return results


if __name__ == "__main__":
  assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
  print("RESULTS " + json.dumps(run_checks(sys.argv[1:] or CHECKS)), flush=True)
