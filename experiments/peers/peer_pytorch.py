"""Our train step against PyTorch + Hugging Face transformers on the same tiny Llama, weights copied across.

    python experiments/peers/peer_pytorch.py                       # ~5 min on 2 CPU cores
    python experiments/peers/peer_pytorch.py --torch_python=/path/to/venv/bin/python

The model: vocab 512, d_model 128, 4 layers, 4 query / 2 key-value heads, SwiGLU 352, batch 8 x 256.
Ours is the n=1 model under parity (a 3-layer trunk + one head layer = 4 Llama layers) and, for the
MTP overhead, the n=4 model of the same depth. The peer is `LlamaForCausalLM` with `torch.optim.AdamW`
(same betas, weight decay and gradient clipping) on 2 threads, run as a subprocess of the torch
interpreter (torch is no requirement of this project). Both start from the same weights (our pytree
mapped one to one onto the Hugging Face names, kernels transposed), and the first step's loss is
checked to agree. Reported: median seconds per train step and per forward (loss only), each side's
best of two bouts; ratios ours / peer. Then the matrix multiplies of the step's linear layers alone
(`gemm_shapes`: each layer's forward product and its two backward ones), timed on each side as plain
A @ B on the same shapes: how much of the gap is the GEMM library (XLA:CPU's against PyTorch's); and one
layer's causal attention, forward + backward, ours (`model.attention=auto`) against PyTorch's
`scaled_dot_product_attention`.
Writes experiments/peers/results/<out_name>.md and .json.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

EXPERIMENTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = dict(vocab_size=512, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=352)
BATCH, SEQ, LR = 8, 256, 1e-3


# ----------------------------------------------------------------------------- the step's GEMMs

def gemm_shapes() -> list:
  """(name, M, K, N, count) of every matrix multiply a train step does in the linear layers: for each
  projection x [T, in] @ W [in, out] (T = batch x seq tokens) the forward product, dx = dy @ W^T and
  dW = x^T @ dy. Attention's own batched products are left out (each side computes them its own way)."""
  t, d, f = BATCH * SEQ, SHAPE["d_model"], SHAPE["d_ff"]
  kv = SHAPE["n_kv_heads"] * d // SHAPE["n_heads"]
  layers = SHAPE["n_layers"]
  linears = [("q, o", d, d, 2 * layers), ("k, v", d, kv, 2 * layers), ("gate, up", d, f, 2 * layers),
             ("down", f, d, layers), ("unembed", d, SHAPE["vocab_size"], 1)]
  out = []
  for name, i, o, count in linears:
    out += [(f"{name} forward", t, i, o, count), (f"{name} dx", t, o, i, count), (f"{name} dW", i, t, o, count)]
  return out


def _median_seconds(fn, repeats: int = 50) -> float:
  """Median seconds of fn() over `repeats` calls, after 5 warm-up calls."""
  for _ in range(5):
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def time_gemms(matmul, make, repeats: int = 200) -> list:
  """Median seconds of matmul(a, b) per gemm_shapes() entry; make(shape, seed) builds an operand."""
  out = []
  for _, m, k, n, _ in gemm_shapes():
    a, b = make((m, k), 0), make((k, n), 1)
    out.append(_median_seconds(lambda: matmul(a, b), repeats))
  return out


def _attention_shapes():
  hd = SHAPE["d_model"] // SHAPE["n_heads"]
  return (BATCH, SEQ, SHAPE["n_heads"], SHAPE["n_kv_heads"], hd)


def torch_attention() -> float:
  """Seconds for one layer's causal GQA attention, forward + backward, PyTorch's fused CPU kernel."""
  import torch
  import torch.nn.functional as F
  torch.set_num_threads(2)
  b, t, h, kv, d = _attention_shapes()
  q, k, v = (torch.randn(b, n, t, d, requires_grad=True) for n in (h, kv, kv))

  def step():
    F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
  return _median_seconds(step)


def our_attention() -> float:
  import jax.numpy as jnp
  from mtp_jax import attention
  b, t, h, kv, d = _attention_shapes()
  ks = jax.random.split(jax.random.key(0), 3)
  q, k, v = jax.random.normal(ks[0], (b, t, h, d)), jax.random.normal(ks[1], (b, kv, t, d)), \
      jax.random.normal(ks[2], (b, kv, t, d))
  pos, seg = jnp.broadcast_to(jnp.arange(t), (b, t)), jnp.ones((b, t), jnp.int32)
  grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attention.attend(q, k, v, pos, pos, seg, seg)), argnums=(0, 1, 2)))
  return _median_seconds(lambda: jax.block_until_ready(grad(q, k, v)))


def torch_gemms() -> list:
  import torch
  torch.set_num_threads(2)
  return time_gemms(lambda a, b: a @ b, lambda shape, seed: torch.randn(shape, generator=torch.Generator().manual_seed(seed)))


def our_gemms() -> list:
  matmul = jax.jit(lambda a, b: a @ b)
  return time_gemms(lambda a, b: matmul(a, b).block_until_ready(),
                    lambda shape, seed: jax.random.normal(jax.random.key(seed), shape))


def gemm_lines(ours: list, peer: list, step_s: float) -> tuple:
  """The GEMM table and its summary (result dict, markdown lines); ours/peer: seconds per gemm_shapes() entry."""
  rows, lines = [], ["| product | M x K x N | per step | ours GFLOP/s | PyTorch GFLOP/s | ours / PyTorch time |",
                     "|---|---|---:|---:|---:|---:|"]
  for (name, m, k, n, count), o, p in zip(gemm_shapes(), ours, peer):
    flop = 2 * m * k * n
    rows.append({"product": name, "m": m, "k": k, "n": n, "count": count, "ours_s": o, "peer_s": p})
    lines.append(f"| {name} | {m} x {k} x {n} | {count} | {flop / o / 1e9:.0f} | {flop / p / 1e9:.0f} | {o / p:.2f} |")
  total_o = sum(r["ours_s"] * r["count"] for r in rows)
  total_p = sum(r["peer_s"] * r["count"] for r in rows)
  summary = {"rows": rows, "ours_total_s": total_o, "peer_total_s": total_p}
  lines += ["", f"- The step's linear-layer GEMMs, each timed alone and summed: ours {total_o * 1e3:.1f} ms, PyTorch "
            f"{total_p * 1e3:.1f} ms ({total_o / total_p:.2f}x); PyTorch's whole train step takes {step_s * 1e3:.1f} ms. "
            f"Our step would match PyTorch's only if everything besides these GEMMs took "
            f"{(step_s - total_o) * 1e3:.1f} ms, against PyTorch's {(step_s - total_p) * 1e3:.1f} ms."]
  return summary, lines


# ----------------------------------------------------------------------------- the torch side

def torch_side(weights_path: str, tokens_path: str, steps: int) -> dict:
  import numpy as np
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM
  torch.set_num_threads(2)
  cfg = LlamaConfig(vocab_size=SHAPE["vocab_size"], hidden_size=SHAPE["d_model"], num_hidden_layers=SHAPE["n_layers"],
                    num_attention_heads=SHAPE["n_heads"], num_key_value_heads=SHAPE["n_kv_heads"],
                    intermediate_size=SHAPE["d_ff"], rms_norm_eps=1e-5, rope_theta=10000.0,
                    max_position_embeddings=2048, tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
  model = LlamaForCausalLM(cfg)
  w = np.load(weights_path)
  missing, unexpected = model.load_state_dict({k: torch.from_numpy(w[k]) for k in w.files}, strict=False)
  missing = [k for k in missing if "rotary" not in k]
  assert not missing and not unexpected, (missing, unexpected)
  tokens = torch.from_numpy(np.load(tokens_path)).long()
  decay = [p for n, p in model.named_parameters() if p.ndim > 1]
  no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=LR, betas=(0.9, 0.95))

  def step():
    out = model(input_ids=tokens, labels=tokens)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(out.loss)

  with torch.no_grad():
    first_loss = float(model(input_ids=tokens, labels=tokens).loss)
  step()                                    # warm-up
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  fwd = []
  with torch.no_grad():
    for _ in range(steps):
      t0 = time.perf_counter()
      model(input_ids=tokens, labels=tokens)
      fwd.append(time.perf_counter() - t0)
  return {"first_loss": first_loss, "step_s": statistics.median(times), "forward_s": statistics.median(fwd),
          "torch": torch.__version__, "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------- our side

def hf_weights(params, n_kv: int):
  """Our n=1 pytree -> Hugging Face Llama state dict (numpy), every leaf mapped by name."""
  import numpy as np
  p = jax.tree.map(np.asarray, params)
  layers = [jax.tree.map(lambda x, i=i: x[i], p["trunk"]["layer"]) for i in range(p["trunk"]["layer"]["attn"]["q"]["kernel"].shape[0])]
  layers.append(p["heads_0"])               # head 1 is the last layer
  out = {"model.embed_tokens.weight": p["embed"]["embedding"], "model.norm.weight": p["final_norm"]["scale"],
         "lm_head.weight": p["unembed"]["kernel"].T}
  for i, l in enumerate(layers):
    d = l["attn"]["q"]["kernel"].shape[0]
    pre = f"model.layers.{i}."
    out[pre + "self_attn.q_proj.weight"] = l["attn"]["q"]["kernel"].reshape(d, -1).T
    out[pre + "self_attn.k_proj.weight"] = l["attn"]["k"]["kernel"].reshape(d, -1).T
    out[pre + "self_attn.v_proj.weight"] = l["attn"]["v"]["kernel"].reshape(d, -1).T
    out[pre + "self_attn.o_proj.weight"] = l["attn"]["o"]["kernel"].reshape(-1, d).T
    out[pre + "input_layernorm.weight"] = l["attn_norm"]["scale"]
    out[pre + "post_attention_layernorm.weight"] = l["mlp_norm"]["scale"]
    out[pre + "mlp.gate_proj.weight"] = l["gate"]["kernel"].T
    out[pre + "mlp.up_proj.weight"] = l["up"]["kernel"].T
    out[pre + "mlp.down_proj.weight"] = l["down"]["kernel"].T
  return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def our_config(n: int):
  from mtp_jax.config import base_config
  c = base_config()
  c.model.update(**SHAPE, n_future=n, parity=True, head_type="parallel", max_seq_len=2048)
  c.data.seq_len = SEQ
  c.train.update(batch_size=BATCH, learning_rate=LR, warmup_steps=0, weight_decay=0.1)
  c.mesh.data = 1
  return c


def our_side(tokens, steps: int):
  """{n: (step_s, forward_s)} for n = 1 and 4, interleaved; and the n=1 params and first loss."""
  import jax.numpy as jnp
  import numpy as np
  from mtp_jax.loss import make_loss_fn
  from mtp_jax.model import build_model, init_params
  from mtp_jax.step import make_optimizer, make_train_step, new_train_state
  runs, first = {}, {}
  for n in (1, 4):
    c = our_config(n)
    model, tx = build_model(c.model), make_optimizer(c.train)
    params = init_params(model, jax.random.key(0))
    loss_fn = jax.jit(make_loss_fn(model, c))
    # A host copy: the train step below donates (deletes) the device parameters.
    first[n] = (jax.tree.map(np.asarray, params), float(loss_fn(params, {"tokens": jnp.asarray(tokens[:, :SEQ + 1])})[0]))
    step = jax.jit(make_train_step(model, c, tx), donate_argnums=0)
    batch = {"tokens": jnp.asarray(tokens[:, :SEQ + n])}
    state = new_train_state(params, tx)
    state, m = step(state, batch)
    jax.block_until_ready(m)
    jax.block_until_ready(loss_fn(state.params, batch))
    runs[n] = [step, state, batch, loss_fn, [], []]
  for _ in range(steps):
    for n in (1, 4):
      step, state, batch, loss_fn, times, fwd = runs[n]
      t0 = time.perf_counter()
      state, m = step(state, batch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
      t0 = time.perf_counter()
      jax.block_until_ready(loss_fn(state.params, batch))
      fwd.append(time.perf_counter() - t0)
      runs[n][1] = state
  return {n: (statistics.median(r[4]), statistics.median(r[5])) for n, r in runs.items()}, first


def our_profile(tokens) -> dict:
  """ms by JAX operation in one profiled run of our n=1 train step (experiments/common/profiling.py)."""
  import jax.numpy as jnp
  from common.profiling import profile
  from mtp_jax.model import build_model, init_params
  from mtp_jax.step import make_optimizer, make_train_step, new_train_state
  c = our_config(1)
  model, tx = build_model(c.model), make_optimizer(c.train)
  state = new_train_state(init_params(model, jax.random.key(0)), tx)
  batch = {"tokens": jnp.asarray(tokens[:, :SEQ + 1])}
  compiled = jax.jit(make_train_step(model, c, tx)).lower(state, batch).compile()
  jax.block_until_ready(compiled(state, batch))        # warm up
  return profile(compiled, (state, batch), 1)


def main():
  from mtp_jax.cpu_flags import use_training_fusions
  use_training_fusions()   # our train step as `python -m mtp_jax.main` compiles it
  from absl import app, flags
  app.define_help_flags()   # --help
  flags.DEFINE_string("torch_python", "/work/torchvenv/bin/python", "Interpreter with torch + transformers.")
  flags.DEFINE_integer("steps", 10, "Timed steps per bout (after one warm-up).")
  flags.DEFINE_string("out_name", "peer_pytorch", "Results file stem under experiments/peers/results/.")
  flags.FLAGS(sys.argv)
  f = flags.FLAGS
  probe = subprocess.run([f.torch_python, "-c", "import torch, transformers"], capture_output=True, text=True) \
      if os.path.exists(f.torch_python) else None
  if probe is None or probe.returncode:
    raise SystemExit(f"--torch_python={f.torch_python}: needs an interpreter with torch and transformers "
                     f"({'not found' if probe is None else probe.stderr.strip().splitlines()[-1]}); make one with "
                     f"`python -m venv V && V/bin/pip install torch transformers` and pass --torch_python=V/bin/python")
  import numpy as np
  from common.matmul_work import matmul_macs
  from common.results_io import write_results
  tokens = np.random.default_rng(0).integers(0, SHAPE["vocab_size"], (BATCH, SEQ + 4)).astype(np.int32)
  tmp = tempfile.mkdtemp(prefix="peer_pytorch_")
  ours, first = [], None
  peers = []
  for bout in range(2):                     # ours, torch, ours, torch: drift on a shared machine hits both
    o, first = our_side(tokens, f.steps)
    ours.append(o)
    if bout == 0:
      np.savez(os.path.join(tmp, "w.npz"), **hf_weights(first[1][0], SHAPE["n_kv_heads"]))
      np.save(os.path.join(tmp, "tokens.npy"), tokens[:, :SEQ + 1])
    r = subprocess.run([f.torch_python, os.path.abspath(__file__), "--torch_side", os.path.join(tmp, "w.npz"),
                        os.path.join(tmp, "tokens.npy"), str(f.steps)], capture_output=True, text=True, check=True)
    peers.append(json.loads(r.stdout.strip().splitlines()[-1]))
  if abs(first[1][1] - peers[0]["first_loss"]) > 1e-3:   # the same weights must give the same model
    sys.exit(f"error: the first loss differs (ours {first[1][1]:.5f}, Hugging Face {peers[0]['first_loss']:.5f}): "
             "the weights did not map one to one, so the two steps would not time the same model")
  best = lambda xs, key: min(x[key] for x in xs)
  peer = {"step_s": best(peers, "step_s"), "forward_s": best(peers, "forward_s"), "first_loss": peers[0]["first_loss"]}
  our = {n: {"step_s": min(o[n][0] for o in ours), "forward_s": min(o[n][1] for o in ours)} for n in (1, 4)}
  result = {"device": f"{jax.devices()[0].device_kind} ({jax.default_backend()})", "shape": SHAPE, "batch": BATCH,
            "seq_len": SEQ, "ours": our, "peer": peer, "peer_versions": {"torch": peers[0]["torch"]},
            "first_loss": {"ours_n1": first[1][1], "peer": peer["first_loss"]},
            "ratio_step_ours_n1_over_peer": our[1]["step_s"] / peer["step_s"],
            "ratio_forward_ours_n1_over_peer": our[1]["forward_s"] / peer["forward_s"],
            "ratio_step_ours_n4_over_n1": our[4]["step_s"] / our[1]["step_s"],
            "ratio_matmul_work_ours_n4_over_n1": matmul_macs(our_config(4).model, SEQ) / matmul_macs(our_config(1).model, SEQ)}
  lines = [f"Train step, tiny Llama (vocab 512, d 128, 4 layers, GQA 4/2, SwiGLU 352), batch {BATCH} x {SEQ}, "
           f"{result['device']}, same initial weights (first loss: ours {first[1][1]:.4f}, "
           f"Hugging Face {peer['first_loss']:.4f}). Best of two bouts of {f.steps}-step medians.", "",
           "| side | s/step | s/forward |", "|---|---:|---:|",
           f"| ours n=1 (parity) | {our[1]['step_s']:.4f} | {our[1]['forward_s']:.4f} |",
           f"| ours n=4 (parity) | {our[4]['step_s']:.4f} | {our[4]['forward_s']:.4f} |",
           f"| PyTorch {peers[0]['torch']} + transformers LlamaForCausalLM, AdamW, 2 threads | "
           f"{peer['step_s']:.4f} | {peer['forward_s']:.4f} |", "",
           f"- ours n=1 / PyTorch, train step: {result['ratio_step_ours_n1_over_peer']:.2f}x "
           f"(forward only: {result['ratio_forward_ours_n1_over_peer']:.2f}x)",
           f"- ours n=4 / ours n=1, train step: {result['ratio_step_ours_n4_over_n1']:.2f}x (matrix-multiply work, "
           f"counted by matmul_work.py: {result['ratio_matmul_work_ours_n4_over_n1']:.2f}x)", "",
           f"Command: `python experiments/peers/peer_pytorch.py --out_name={f.out_name}`"]
  from common.profiling import top
  ops = our_profile(tokens)
  result["ours_n1_profile_ms"] = ops
  lines[-1:-1] = [f"Where our n=1 step's time goes (one run under jax.profiler, {sum(ops.values()):.0f} ms of device ops; "
                  "fwd / bwd: the forward and backward pass; top 12 operations, ms):", ""]
  lines[-1:-1] = [f"- `{op}` {ms:.1f}" for op, ms in top(ops, 12)] + [""]
  ours_g, ours_a = our_gemms(), our_attention()
  r = subprocess.run([f.torch_python, os.path.abspath(__file__), "--torch_gemms"], capture_output=True, text=True, check=True)
  theirs = json.loads(r.stdout.strip().splitlines()[-1])
  result["gemms"], g_lines = gemm_lines(ours_g, theirs["gemms"], peer["step_s"])
  result["attention_s"] = {"ours": ours_a, "peer": theirs["attention_s"]}
  lines[-1:-1] = ["The linear layers' matrix multiplies alone, plain A @ B on each side (float32, 2 threads, median "
                  "of 200 calls each):", ""] + g_lines + [
      f"- One layer's causal attention (batch {BATCH} x {SEQ}, {SHAPE['n_heads']} query / {SHAPE['n_kv_heads']} "
      f"key-value heads of {SHAPE['d_model'] // SHAPE['n_heads']}), forward + backward, median of 50: ours "
      f"(`model.attention=auto`) {ours_a * 1e3:.2f} ms, PyTorch `scaled_dot_product_attention` "
      f"{theirs['attention_s'] * 1e3:.2f} ms ({ours_a / theirs['attention_s']:.2f}x).", ""]
  write_results(f.out_name, result, lines)


if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] == "--torch_side":
    print(json.dumps(torch_side(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
  elif len(sys.argv) > 1 and sys.argv[1] == "--torch_gemms":
    print(json.dumps({"gemms": torch_gemms(), "attention_s": torch_attention()}))
  else:
    sys.path.insert(0, EXPERIMENTS)   # for common/
    import jax  # noqa: E402
    main()
