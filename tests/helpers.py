"""What several test files share, imported one way: `from helpers import ...`.

pytest puts tests/ on the import path (as Python does for a script run from tests/), and this module puts the
clone's root there too, so `configs` and `mtp_jax` import from the clone. Fixtures live in conftest.py;
plain constants and functions that more than one file uses live here, not in one test file that others import.
"""
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "pretrained")
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from mtp_jax import decode  # noqa: E402
from mtp_jax.config import base_config  # noqa: E402
from mtp_jax.model import abstract_params, build_model  # noqa: E402


def tiny_config(**model):
  """A config small enough to compile in seconds, built in code so no test depends on a recipe file."""
  c = base_config()
  c.model.update(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=128)
  c.model.update(model)
  c.data.seq_len = 16
  c.train.batch_size = 2
  return c


# ----------------------------------------------------------------------------- the trainer

def train_config(cache_dir, **train_fields):
  """configs/tiny.py with a shared tokenizer cache, a capped corpus and a log line per step."""
  from configs.tiny import get_config
  c = get_config()
  c.data.cache_dir = cache_dir
  c.data.max_train_bytes = 200_000
  c.train.update({"log_every": 1, "eval_every": 1000, "checkpoint_every": 10, **train_fields})
  return c


def records(workdir, split=None):
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return [r for r in lines if r.get("split") == split]


def snapshot(workdir):
  return {os.path.relpath(os.path.join(d, f), workdir): open(os.path.join(d, f), "rb").read()
          for d, _, fs in os.walk(workdir) for f in fs}


def run_main(workdir, cache_dir, *flags, wait=True, config="configs/tiny.py", cwd=ROOT):
  """`python -m mtp_jax.main` on a recipe (configs/tiny.py) with train_config's settings, in a subprocess."""
  cmd = [sys.executable, "-m", "mtp_jax.main", f"--config={os.path.join(ROOT, config)}", f"--workdir={workdir}",
         f"--config.data.cache_dir={cache_dir}", "--config.data.max_train_bytes=200000",
         "--config.train.log_every=1", "--config.train.eval_every=1000", *flags]
  # XLA's persistent cache: every subprocess here compiles the same tiny model.
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_COMPILATION_CACHE_DIR": os.path.join(cache_dir, "xla"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  if not wait:
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def main_command(*flags):
  """`python -m mtp_jax.main` with exactly these flags (for checks that fail before any training)."""
  return subprocess.run([sys.executable, "-m", "mtp_jax.main", *flags], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)


def loss_batch(n, seq_len=16, batch=3):
  """Tokens for n heads with two documents per row (the boundary moving row to row) and padding in row 2."""
  tokens = jax.random.randint(jax.random.key(1), (batch, seq_len + n), 0, 64)
  segments = np.ones((batch, seq_len + n), np.int32)
  for r in range(batch):
    segments[r, 5 + 3 * r:] = 2
  segments[2, -3:] = 0
  return {"tokens": tokens, "segment_ids": jnp.asarray(segments)}


# ----------------------------------------------------------------------------- decoding

MIXED = [[3, 17, 5], [9, 2, 30, 41, 7, 7, 12, 40, 1], [22]]   # right-padded into one batch


@functools.lru_cache(maxsize=None)
def tiny_decoder(n=4, head_type="parallel", vocab=48, shared=False, seed=0, attention="auto"):
  """(model, params) of a random tiny model; shared=True copies head 0 into every head, so drafts are often right."""
  c = tiny_config(vocab_size=vocab, n_future=n, head_type=head_type, n_layers=n + 1, attention=attention)
  if shared:
    model, params = tiny_decoder(n, head_type, vocab, False, seed, attention)
    return model, {**params, **{f"heads_{i}": params["heads_0"] for i in range(1, n)}}
  model = build_model(c.model)
  return model, random_params(model, seed)


def random_params(model, seed):
  """Random parameters of the model's shapes, drawn with numpy: compiling the model's init takes seconds."""
  shapes, _ = abstract_params(model)
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return jnp.ones(x.shape, x.dtype)
    fan_in = model.args.d_ff if "down" in name else model.args.d_model
    return jnp.asarray(rng.normal(0, fan_in ** -0.5, x.shape), x.dtype)
  return jax.tree_util.tree_map_with_path(leaf, shapes)


def decode_run(model, params, prompts, mode, max_new_tokens=24, bucket=16, **kw):
  """decode.run on token prompts padded to `bucket`: the DecodeOutput."""
  tokens, lengths = decode.pad_prompts(prompts, bucket)
  out, _ = decode.run(params, model.args, tokens, lengths, mode=mode, max_new_tokens=max_new_tokens, **kw)
  return out


def bytes_workdir(path, vocab_size, n_future=2):
  """A training workdir as the trainer leaves it (config.json, an orbax params checkpoint), random weights."""
  import orbax.checkpoint as ocp
  config = tiny_config(vocab_size=vocab_size, n_future=n_future, n_layers=3)
  config.data.tokenizer = "bytes"
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(config.to_json())
  params = random_params(build_model(config.model), 0)
  with ocp.CheckpointManager(path / "checkpoints") as mgr:
    mgr.save(5, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
    mgr.wait_until_finished()
  return params


def check_same(g, s, max_new):
  """A speculative output `s` is the greedy output `g`, token for token, in no more forward passes."""
  np.testing.assert_array_equal(s.tokens, g.tokens)
  np.testing.assert_array_equal(s.lengths, g.lengths)
  assert np.all(s.lengths <= max_new) and np.all(s.forwards <= g.forwards)
  assert np.all(g.forwards == g.lengths)          # greedy: one token per forward, prefill included


def exact_joint(model, params, prompt, temperature, top_k, top_p):
  """Exact law of the first 3 sampled tokens [V, V, V], and the law if every draft were accepted."""
  v, t = model.args.vocab_size, len(prompt)
  adj = lambda logits: np.asarray(jnp.exp(decode.adjusted_logprobs(logits, temperature, top_k, top_p)), np.float64)
  # One forward over every prompt + [a, b]; causality gives each conditional at its position.
  seqs = np.array([prompt + [a, b] for a in range(v) for b in range(v)])
  logits = jax.jit(lambda x: model.apply({"params": params}, x)[0])(jnp.asarray(seqs))   # [n, V*V, t+2, V]
  p1 = adj(logits[0, 0, t - 1])
  p2 = adj(logits[0, ::v, t])                                                      # [V, V]
  p3 = adj(logits[0, :, t + 1]).reshape(v, v, v)
  exact = p1[:, None, None] * p2[:, :, None] * p3
  q1, q2 = adj(logits[1, 0, t - 1]), adj(logits[2, 0, t - 1])   # heads 1, 2 at the prompt's end
  always_accept = p1[:, None, None] * q1[None, :, None] * q2[None, None, :]
  return exact / exact.sum(), always_accept / always_accept.sum()


def chi2_pvalue(samples, probs):
  """Chi-square goodness of fit of flat outcome ids against probs; cells expecting < 5 are pooled."""
  from scipy import stats
  n = len(samples)
  counts = np.bincount(samples, minlength=probs.size).astype(float)
  expected = probs.ravel() * n
  small = expected < 5
  obs = np.append(counts[~small], counts[small].sum())
  exp = np.append(expected[~small], expected[small].sum())
  if exp[-1] == 0:
    if obs[-1] > 0:
      return 0.0                       # samples fell on impossible outcomes
    obs, exp = obs[:-1], exp[:-1]
  return stats.chi2.sf(np.sum((obs - exp) ** 2 / exp), len(exp) - 1)
