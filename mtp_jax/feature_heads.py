"""Heads for a pretrained model, trained on its frozen trunk's cached features (Medusa-1 / Hydra style).

When the trunk is frozen, every training step of the ordinary trainer (`train.trainable=heads`) runs
the whole trunk forward again for the same windows, and that forward is most of the step: on a
30-layer model with 3 one-layer heads it is about 29 of the 32 layers. Here the trunk runs once per
window; its output z [T, d] (the heads' input) is cached together with the base model's own greedy
next token at every position. The added heads then train on the cached features alone:

    feats = cache_features(model, params, windows)                 # trunk + head 1, once per window
    params, log = train_heads(model, params, feats, steps=..., batch=...)
    accept = head_acceptance(model, params, feats_valid)          # teacher-forced, per head

or, from a corpus with the features kept on disk (what experiments/real_model/real_model_heads.py and
notebook 02 do): `features_for(model, params, config, tokenizer, "train", count, seq_len, cache_key=...)`,
then `save_workdir(out, config, params, tokenizer, ranking)` for `generate` and the speculative benchmarks.

Targets: `target="model"` (default) trains head i to predict what greedy decoding of the base model
would emit i tokens later (head 1's argmax at position t+i-1), which is what self-speculative decoding
accepts: self-distillation, as in Medusa-2 and EAGLE. `target="greedy_path"` keeps only the positions
where the text up to there is greedy's own, where each target is exactly the token verification
compares the draft with. `target="data"` uses the corpus' tokens, as the MTP loss does.

`vocab=ids` (a draft vocabulary: the base model's most frequent greedy tokens, `draft_vocab_ranking`)
trains the heads' softmax over those tokens only, the one they draft from at decode time
(`decode.with_draft_vocab`): on SmolLM2 an 8,192-token vocabulary makes scoring every position cost
what scoring 32 of 256 does over the whole vocabulary.

Only the added heads (heads 2..n) train; the trunk, head 1, the final norm and the unembedding stay
as imported, so the model's greedy output is unchanged and every draft is verified by the original
model. Gradients flow to the head layers only (no optimizer state, no kernel gradient for the frozen
unembedding).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtp_jax import data
from mtp_jax.decode.draft import draft_logits
from mtp_jax.errors import UserError
from mtp_jax.interop import workdir as workdir_lib
from mtp_jax.model import MTPTransformer, unembedding_rows
from mtp_jax.pretrained import cache_root


@dataclasses.dataclass
class Features:
  """Cached features of token windows: z [N, T, d] (bfloat16), greedy [N, T] and tokens [N, T] (int32).

  z is what head 2 reads: the trunk's output for parallel heads, head 1's hidden state for chained ones
  (causal heads and DeepSeek-V3's sequential modules, which also read the embedding of the token ahead).
  """
  z: np.ndarray
  greedy: np.ndarray     # head 1's argmax at each position: the base model's next token there
  tokens: np.ndarray

  def __len__(self):
    return len(self.tokens)


def windows_of(docs_ids, seq_len: int, eos_id: int, max_windows: Optional[int] = None) -> np.ndarray:
  """Token id lists -> [N, seq_len] windows of one stream (documents joined by EOS), the tail dropped."""
  stream = []
  for ids in docs_ids:
    stream.extend(ids)
    stream.append(eos_id)
    if max_windows and len(stream) >= max_windows * seq_len:
      break
  n = len(stream) // seq_len
  if max_windows:
    n = min(n, max_windows)
  if n == 0:
    raise UserError(f"the text holds fewer than seq_len={seq_len} tokens: no window to train on")
  return np.asarray(stream[:n * seq_len], np.int32).reshape(n, seq_len)


def _positions(tokens):
  return jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape), jnp.ones_like(tokens)


def trunk_features(model: MTPTransformer, params, tokens):
  """(head 2's input [B, T, d], head 1's argmax [B, T]) of tokens [B, T]: what the frozen model gives the added heads."""
  pos, seg = _positions(tokens)
  z, _ = model.apply({"params": params}, tokens, pos, seg, method=MTPTransformer.run_trunk)
  h, _ = model.apply({"params": params}, 0, z, None, pos, seg, method=MTPTransformer.run_head)
  logits = model.apply({"params": params}, h, 0, method=MTPTransformer.logits)
  return (h if model.args.heads.chained else z), jnp.argmax(logits, axis=-1).astype(jnp.int32)


def cache_features(model: MTPTransformer, params, windows: np.ndarray, batch: int = 8, log=print) -> Features:
  """Run the trunk and head 1 once over every window; keep head 2's input, head 1's argmax and the tokens."""
  @jax.jit
  def features(params, tokens):
    first, greedy = trunk_features(model, params, tokens)
    return first.astype(jnp.bfloat16), greedy

  n = len(windows)
  zs, gs = [], []
  start = time.perf_counter()
  for i in range(0, n, batch):
    chunk = windows[i:i + batch]
    if len(chunk) < batch:   # one compiled shape: pad the last batch by repeating its first window
      chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch - len(chunk), axis=0)])
    z, g = features(params, jnp.asarray(chunk))
    zs.append(np.asarray(z)[:min(batch, n - i)])
    gs.append(np.asarray(g)[:min(batch, n - i)])
    if log and (i // batch) % 20 == 0:
      done = min(i + batch, n)
      log(f"features: {done}/{n} windows, {done * windows.shape[1] / (time.perf_counter() - start):.0f} tokens/s")
  return Features(np.concatenate(zs), np.concatenate(gs), np.asarray(windows, np.int32))


TARGETS = ("model", "greedy_path", "data")


def on_greedy_path(feats_greedy, tokens, i: int):
  """[B, T]: the text after position t follows greedy for i tokens (x_{t+j} = head 1's argmax at t+j-1,
  j = 1..i). There, head 1's argmax at t+i is exactly what greedy decoding from x_{<=t} emits i+1 tokens
  on: the token a chain of drafts from position t has to guess at depth i."""
  t = tokens.shape[1]
  ok = jnp.ones(tokens.shape, bool)
  for j in range(1, i + 1):
    ok &= jnp.roll(tokens, -j, axis=1) == jnp.roll(feats_greedy, -(j - 1), axis=1)
  return ok & (jnp.arange(t)[None, :] < t - i)


def head_targets(feats_greedy, tokens, i: int, target: str):
  """(targets, mask) [B, T] of head i (0-based, i >= 1): the token i+1 positions ahead of each position.

  model: head 1's argmax at t+i (what greedy decoding emits there, given the text up to t+i);
  greedy_path: the same, only where the text up to t+i is greedy's own (`on_greedy_path`), so every
  target is exactly the token that speculative decoding verifies the draft against;
  data: the corpus token x[t+i+1].
  """
  t = tokens.shape[1]
  if target in ("model", "greedy_path"):
    src, shift = feats_greedy, i
  elif target == "data":
    src, shift = tokens, i + 1
  else:
    raise UserError(f"target={target!r}: choose one of {', '.join(TARGETS)}")
  rolled = jnp.roll(src, -shift, axis=1)
  mask = jnp.broadcast_to(jnp.arange(t)[None, :] < t - shift, src.shape)
  if target == "greedy_path":
    mask = mask & on_greedy_path(feats_greedy, tokens, i)
  return jnp.where(mask, rolled, 0), mask


def ahead_tokens(tokens, i: int):
  """x_{t+i} at every position t [B, T] (0 past the window's end: those positions' targets are masked)."""
  t = tokens.shape[1]
  return jnp.where(jnp.arange(t)[None, :] < t - i, jnp.roll(tokens, -i, axis=1), 0)


def _run_added_head(model, params, i: int, z, prev, tokens):
  """Head i's hidden state on cached features: parallel heads read z, chained ones prev (head i-1's
  state) and, reading ahead, the embedding of x_{t+i}."""
  pos, seg = _positions(tokens)
  ahead = ahead_tokens(tokens, i) if model.args.heads.reads_ahead else None
  h, _ = model.apply({"params": params}, i, z, prev, pos, seg, ahead=ahead, method=MTPTransformer.run_head)
  return h


def _added(params, n_future: int) -> dict:
  return {f"heads_{i}": params[f"heads_{i}"] for i in range(1, n_future)}


def _vocab_logits(model: MTPTransformer, params, h, i: int, vocab):
  """Head i's logits [..., V] or, with a draft vocabulary (token ids [N]), over those tokens only [..., N]:
  what decoding's drafts are chosen from (`decode.with_draft_vocab`)."""
  normed = model.apply({"params": params}, i, h, method=MTPTransformer.output_norm)
  rows = None if vocab is None else (vocab, unembedding_rows(model.args, params, vocab))
  return draft_logits(model, params, rows, normed)


def _in_vocab(targets, mask, vocab, vocab_size: int):
  """Targets as indices into the draft vocabulary; those outside it are masked (no draft can hit them)."""
  if vocab is None:
    return targets, mask
  index = jnp.full((vocab_size,), -1, jnp.int32).at[vocab].set(jnp.arange(len(vocab), dtype=jnp.int32))
  where = index[targets]
  return jnp.maximum(where, 0), mask & (where >= 0)


def make_loss(model: MTPTransformer, target: str = "model", vocab=None):
  """loss(head_params, frozen_params, z, greedy, tokens, picks) -> (mean CE over added heads, per-head metrics).

  vocab: token ids [N] of a draft vocabulary; the cross-entropy is then over those tokens only (targets
  outside it do not count): the softmax the heads draft from, at N/V of the unembedding's cost.

  picks [B, K] or None: the positions whose cross-entropy counts. The unembedding (d x V) costs each
  head several times its own layer, so scoring K of T positions (drawn afresh each step) cuts that
  cost by T/K while the head layer still runs, and learns, over the whole window: an unbiased, noisier
  estimate of the same loss.
  """
  n = model.args.n_future

  def head_ce(head_params, frozen, z, prev, tokens, targets, mask, picks, i):
    params = dict(frozen, **{f"heads_{i}": head_params})
    h_all = h = _run_added_head(model, params, i, z, prev, tokens)
    if picks is not None:
      take = lambda x: jnp.take_along_axis(x, picks.reshape(picks.shape + (1,) * (x.ndim - 2)), axis=1)
      h, targets, mask = take(h), take(targets), take(mask)
    logits = _vocab_logits(model, params, h, i, vocab)
    targets, mask = _in_vocab(targets, mask, vocab, model.args.vocab_size)
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
    hits = (jnp.argmax(logits, -1) == targets) & mask
    count = jnp.maximum(jnp.sum(mask), 1)
    return jnp.sum(nll * mask) / count, (jnp.sum(hits) / count, h_all)

  head_ce = jax.checkpoint(head_ce, static_argnums=(8,))   # one head's logits alive at a time

  def loss(added, frozen, z, greedy, tokens, picks=None):
    frozen = jax.lax.stop_gradient(frozen)
    losses, accs = [], []
    z = prev = z.astype(model.args.dtype)
    for i in range(1, n):   # n is small and static; each head's logits are recomputed in its backward
      targets, mask = head_targets(greedy, tokens, i, target)
      l, (acc, prev) = head_ce(added[f"heads_{i}"], frozen, z, prev, tokens, targets, mask, picks, i)
      losses.append(l)
      accs.append(acc)
    losses = jnp.stack(losses)
    return jnp.mean(losses), {"head_losses": losses, "head_accuracies": jnp.stack(accs)}

  return loss


def train_heads(model: MTPTransformer, params, feats: Features, *, steps: int, batch: int = 8, lr: float = 1e-3,
                warmup: int = 20, target: str = "model", ce_positions: int = 0, seed: int = 0, log=print,
                log_every: int = 20, on_log=None, vocab: Optional[np.ndarray] = None):
  """Adam on heads 2..n over the cached features; returns (params with the trained heads, log rows).

  ce_positions: score the cross-entropy at this many random positions per window (0: all of them).
  vocab: a draft vocabulary's token ids (see make_loss); None: the whole vocabulary.
  on_log(step, params): called at every log row (for example to write the model so far).
  """
  n = model.args.n_future
  if n < 2:
    raise UserError("the model has one head: import it with --n_future >= 2 to add heads to train")
  if batch > len(feats):
    raise UserError(f"batch={batch} is more than the {len(feats)} cached windows")
  added = _added(params, n)
  frozen = {k: v for k, v in params.items() if k not in added}
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr * 0.1),
                   weight_decay=0.0)
  opt_state = tx.init(added)
  loss_fn = make_loss(model, target, None if vocab is None else jnp.asarray(vocab, jnp.int32))

  seq_len = feats.tokens.shape[1]
  if not 0 <= ce_positions <= seq_len:
    raise UserError(f"ce_positions={ce_positions}: choose 1..{seq_len} positions per window, or 0 for all")

  @jax.jit
  def step(added, opt_state, z, greedy, tokens, picks):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(added, frozen, z, greedy, tokens, picks)
    updates, opt_state = tx.update(grads, opt_state, added)
    return optax.apply_updates(added, updates), opt_state, dict(metrics, loss=loss)

  rng = np.random.default_rng(seed)
  rows, start, tokens_seen = [], time.perf_counter(), 0
  order = rng.permutation(len(feats))
  cursor = 0
  for s in range(1, steps + 1):
    if cursor + batch > len(order):
      order, cursor = rng.permutation(len(feats)), 0
    idx = np.sort(order[cursor:cursor + batch])
    cursor += batch
    picks = None
    if ce_positions and ce_positions < seq_len:
      picks = np.sort(np.argsort(rng.random((batch, seq_len)), axis=1)[:, :ce_positions], axis=1).astype(np.int32)
    added, opt_state, m = step(added, opt_state, feats.z[idx], feats.greedy[idx], feats.tokens[idx], picks)
    tokens_seen += batch * feats.tokens.shape[1]
    if s % log_every == 0 or s == steps:
      m = jax.device_get(m)
      row = {"step": s, "loss": float(m["loss"]), "head_accuracies": [round(float(a), 4) for a in m["head_accuracies"]],
             "tokens_per_s": tokens_seen / (time.perf_counter() - start), "elapsed_s": time.perf_counter() - start}
      rows.append(row)
      if log:
        log(f"heads step {s}/{steps}: loss {row['loss']:.3f}, accuracy per head {row['head_accuracies']}, "
            f"{row['tokens_per_s']:.0f} tokens/s")
      if on_log:
        on_log(s, dict(frozen, **added))
  return dict(frozen, **added), rows


def head_acceptance(model: MTPTransformer, params, feats: Features, batch: int = 8,
                    vocab: Optional[np.ndarray] = None) -> dict:
  """Teacher-forced acceptance on cached features: head i's argmax (among `vocab`'s tokens if given, as
  drafts choose) equal to greedy's token i positions ahead, overall (accuracy), given heads 2..i-1 were
  all right (what a speculative chain keeps), and where the text is greedy's own up to there
  (greedy_path_*: there a hit is exactly a draft that verification accepts at that depth, and
  greedy_path_tokens_per_forward is a chain's 1 + sum over depths of P(drafts 2..i all accepted))."""
  n = model.args.n_future
  ids = None if vocab is None else jnp.asarray(vocab, jnp.int32)

  @jax.jit
  def hits(params, z, greedy, tokens):
    out, path = [], []
    z = h = z.astype(model.args.dtype)
    # Only positions where every head can be scored, so the chain's conditional rates share positions.
    common = jnp.arange(tokens.shape[1])[None, :] < tokens.shape[1] - (n - 1)
    for i in range(1, n):
      targets, mask = head_targets(greedy, tokens, i, "model")
      h = _run_added_head(model, params, i, z, h, tokens)
      pred = jnp.argmax(_vocab_logits(model, params, h, i, ids), -1)
      pred = pred if ids is None else ids[pred]
      out.append((pred == targets) & mask & common)
      path.append(on_greedy_path(greedy, tokens, i) & common)
    return jnp.stack(out), jnp.stack(path)

  all_hits, all_path = [], []
  for i in range(0, len(feats) - batch + 1, batch):
    sl = slice(i, i + batch)
    h, p = hits(params, feats.z[sl], feats.greedy[sl], feats.tokens[sl])
    all_hits.append(np.asarray(h))
    all_path.append(np.asarray(p))
  h, p = np.concatenate(all_hits, axis=1), np.concatenate(all_path, axis=1)    # [n-1, N, T]
  t = feats.tokens.shape[1]
  positions = h.shape[1] * (t - (n - 1))
  chain = np.cumprod(h, axis=0)
  given = np.concatenate([[positions], chain[:-1].sum(axis=(1, 2))])
  return {"positions": int(positions),
          "accuracy": [float(x) for x in h.sum(axis=(1, 2)) / positions],
          "chain_acceptance": [float(a / max(g, 1)) for a, g in zip(chain.sum(axis=(1, 2)), given)],
          "greedy_path_accuracy": [float((hi & pi).sum() / max(pi.sum(), 1)) for hi, pi in zip(h, p)],
          "greedy_path_positions": [int(pi.sum()) for pi in p],
          "expected_tokens_per_forward": float(1 + chain.sum() / positions),
          "greedy_path_tokens_per_forward": float(1 + sum((ci & pi).sum() / max(pi.sum(), 1)
                                                          for ci, pi in zip(chain, p)))}


def draft_vocab_ranking(greedy: np.ndarray, vocab_size: int) -> np.ndarray:
  """Every token id, the base model's most frequent greedy tokens first (ties by id): the ranking whose head
  `decode.with_draft_vocab` drafts among (FR-Spec ranks by corpus frequency; greedy's own tokens are
  what speculative decoding has to draft)."""
  counts = np.bincount(np.asarray(greedy).ravel(), minlength=vocab_size)
  return np.argsort(-counts, kind="stable").astype(np.int32)


def corpus_windows(config, tokenizer, split: str, count: int, seq_len: int) -> np.ndarray:
  """Up to `count` windows of `seq_len` tokens from `config.data`'s corpus split, in the model's tokenizer."""
  corpus = data.Corpus(config.data)
  ids = (tokenizer.encode(t) for t in corpus.texts(split))
  return windows_of(ids, seq_len, tokenizer.eos_id, max_windows=count)


def features_path(cache_key: str, split: str, count: int, seq_len: int, chained: bool) -> Path:
  kind = "_head1" if chained else ""   # chained heads read head 1's state, not the trunk's
  return cache_root() / "features" / f"{cache_key}_{split}_{count}x{seq_len}{kind}.npz"


def features_for(model: MTPTransformer, params, config, tokenizer, split: str, count: int, seq_len: int, *,
                 batch: int = 8, cache_key: Optional[str] = None, log=print) -> Features:
  """The features of a corpus split's first `count` windows. With `cache_key` (name it after the model
  file: the features belong to its trunk), they are computed once and kept under the cache's features/."""
  path = features_path(cache_key, split, count, seq_len, model.args.heads.chained) if cache_key else None
  if path is not None and path.exists():
    import ml_dtypes
    with np.load(path) as f:
      return Features(f["z"].view(ml_dtypes.bfloat16), f["greedy"], f["tokens"])
  feats = cache_features(model, params, corpus_windows(config, tokenizer, split, count, seq_len), batch, log=log)
  if path is not None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")    # written whole, then renamed: a cut run leaves no half file
    np.savez(tmp, z=feats.z.view(np.uint16), greedy=feats.greedy, tokens=feats.tokens)
    os.replace(tmp, path)
  return feats


def save_workdir(out: str, config, params, tokenizer, ranking: Optional[np.ndarray] = None) -> None:
  """The model as an mtp_jax workdir at `out` (for `generate`, export and the speculative benchmarks),
  written beside it and renamed over it. `ranking` (draft_vocab_ranking) goes with it as draft_vocab.npy."""
  out = str(out)
  tmp = out + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  workdir_lib.write_workdir(tmp, config, jax.tree.map(np.asarray, params), tokenizer)
  if ranking is not None:
    np.save(os.path.join(tmp, "draft_vocab.npy"), ranking)
  old = out + ".old"
  if os.path.exists(out):
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out, old)      # the previous model stays whole until the new one is in place
  os.replace(tmp, out)
  shutil.rmtree(old, ignore_errors=True)
