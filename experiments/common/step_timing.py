"""Train-step time of several configs, measured side by side on one device; and the decode loop's own step."""
import functools
import statistics
import time

import jax
import jax.numpy as jnp

from mtp_jax.model import build_model, init_params
from mtp_jax.step import make_optimizer, make_train_step, new_train_state


def prepare_runs(configs: dict) -> dict:
  """{key: run} for {key: config}: each train step compiled (ahead of time) and warmed up once, with its
  state and a random batch; `time_runs` times them."""
  runs = {}
  for key, c in configs.items():
    model, tx = build_model(c.model), make_optimizer(c.train)
    state = new_train_state(init_params(model, jax.random.key(0)), tx)
    shape = (c.train.batch_size, c.data.seq_len + c.model.n_future)
    batch = {"tokens": jax.random.randint(jax.random.key(1), shape, 0, c.model.vocab_size),
             "segment_ids": jnp.ones(shape, jnp.int32)}
    step = jax.jit(make_train_step(model, c, tx), donate_argnums=0).lower(state, batch).compile()
    state, m = step(state, batch)          # warm up
    jax.block_until_ready(m)
    runs[key] = [step, state, batch, []]
  return runs


def temporaries_mib(run) -> float:
  """A prepared run's compiled train step: its temporaries (XLA's memory analysis), MiB."""
  return run[0].memory_analysis().temp_size_in_bytes / 2**20


def time_runs(runs: dict, steps: int) -> dict:
  """{key: median seconds per train step}; the steps are interleaved across the runs so machine drift
  hits all of them alike."""
  for _ in range(steps):
    for run in runs.values():
      step, state, batch, times = run
      t0 = time.perf_counter()
      state, m = step(state, batch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
      run[1] = state
  return {key: statistics.median(run[3]) for key, run in runs.items()}


def interleaved_step_seconds(configs: dict, steps: int) -> dict:
  """{key: median seconds per train step} for {key: config}, after one compile + warm-up step each."""
  return time_runs(prepare_runs(configs), steps)


def decode_step_program(params, args, mode: str, tokens, lengths, iters: int, max_new_tokens: int,
                        n_future=None):
  """A zero-argument callable running `iters` steps of the decode loop (`decode.step`) from the prompts'
  prefill in one compiled program, returning the rows' token counts; time it and divide by `iters`.
  Iterating inside one program keeps dispatch overhead from swamping a tiny model's step.
  n_future: the speculative block (default the model's n_future)."""
  from mtp_jax import decode
  from mtp_jax.model import MTPTransformer
  model, sp = MTPTransformer(args), decode.SamplingParams.of()   # argmax modes: sampling settings unused, EOS off
  settings = decode.Settings(mode, max_new_tokens, n_future or args.n_future)
  w = jax.jit(lambda p: decode.decode_weights(p, args, settings.heads_run))(params)
  state = jax.jit(lambda w: decode.prefill(model, w, settings, sp, tokens, lengths, jax.random.key(0)))(w)
  loop = jax.jit(lambda w, s: jax.lax.fori_loop(0, iters, lambda i, s: decode.step(model, w, settings, sp, s), s).count)
  return functools.partial(loop, w, state)
