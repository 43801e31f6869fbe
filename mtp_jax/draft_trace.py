"""Which generated tokens were drafted by heads 2..n and accepted, recomputed from one plain forward.

Self-speculative greedy decoding emits exactly greedy's tokens, so its steps can be replayed on the
finished sequence: the model's uncached forward over prompt + output gives every head's argmax at
every position, and the decode loop's rule (drafts from the last accepted position, the longest
agreeing prefix accepted, then one token from the next-token head) says which token each step
emitted and how. Notebooks use it to highlight accepted drafts; tests check it against the decode
loop's own forward-pass and acceptance counts.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from mtp_jax.decode.forward import DRAFT_VOCAB
from mtp_jax.model import build_model


def draft_trace(params, config, prompt_ids, new_tokens) -> dict:
  """Replay speculative greedy decoding of `new_tokens` after `prompt_ids`.

  Params from decode.with_draft_vocab replay drafts among its tokens, as the decode loop drafts them.
  Sequential modules replay too: module i at q reads x_{q+i}, which is the token decoding fed it whenever
  the drafts before it were accepted, the only case that counts.

  Returns {"drafted": [bool per new token] (True: a draft head proposed it and it was accepted),
  "forward_passes": the prefill plus one per verify step, "accepted": [per draft head count],
  "steps": [(index of the step's first new token, tokens it emitted) per verify step]}.
  """
  model = build_model(config.model)
  n = config.model.n_future
  seq = np.asarray(list(prompt_ids) + list(new_tokens), np.int32)[None]
  ids = params.get(DRAFT_VOCAB)
  params = {k: v for k, v in params.items() if k != DRAFT_VOCAB}
  logits, _ = model.apply({"params": params}, jnp.asarray(seq))           # [n, 1, T, V]
  guess = np.array(jnp.argmax(logits[:, 0], axis=-1))                      # guess[i, q]: head i at q -> q+1+i
  if ids is not None:
    ids = np.asarray(ids)
    guess[1:] = ids[np.asarray(jnp.argmax(logits[1:, 0][..., ids], axis=-1))]
  total, start = len(new_tokens), len(prompt_ids)
  drafted = [False] * total
  accepted = [0] * (n - 1)
  anchor, emitted, forwards = start - 1, 1, 1   # the prefill emits head 1's token at `start`
  steps = []
  while emitted < total:
    forwards += 1
    a = 0                                      # drafts made at `anchor` for positions anchor+2 ..
    while a < n - 1 and emitted + a < total and guess[a + 1, anchor] == seq[0, anchor + 2 + a]:
      a += 1
    for i in range(a):
      drafted[emitted + i] = True
      accepted[i] += 1
    steps.append((emitted, min(a + 1, total - emitted)))
    emitted += a + 1                           # the accepted drafts, then head 1's token after them
    anchor += a + 1
  return {"drafted": drafted, "forward_passes": forwards, "accepted": accepted, "steps": steps}


def in_repeats(seq, start: int, n: int) -> np.ndarray:
  """[len(seq) - start] bool: whether the n tokens ending at each position from `start` on occurred earlier in
  seq (a small model's long greedy generation loops; its heads predict a loop well)."""
  seen, out = set(), np.zeros(len(seq) - start, bool)
  for q in range(n - 1, len(seq)):
    gram = tuple(seq[q - n + 1:q + 1])
    if q >= start:
      out[q - start] = gram in seen
    seen.add(gram)
  return out
