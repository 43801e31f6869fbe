"""The decode loop's data: what is static about a decode (Settings), the traced sampling scalars, the
loop's carried state and its output. Changing a Settings field compiles a new program; nothing else does.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import flax
import jax
import jax.numpy as jnp

from mtp_jax.errors import UserError

Array = jax.Array
MODES = ("greedy", "speculative", "sample", "speculative_sample")
PAD = -1          # marks output slots past a row's end


class DecodeError(UserError):
  """A decoding request that cannot run (bad prompt, length, mode or sampling setting)."""


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything static about a decode: changing any of it compiles a new program."""
  mode: str
  max_new_tokens: int
  draft_block: int        # speculative modes: tokens a step feeds, k = 2..model n_future (last token + k-1
                          # drafts from heads 2..k); 1 drafts nothing
  batch_shards: int = 1   # the batch's split over devices: compaction keeps every stage a multiple of it
  slots: int = 0          # rows decoded at once; fewer than the prompts: finished rows take the next prompt
                          # (argmax modes). 0: every prompt at once

  def stages(self, batch: int) -> tuple:
    """Batch sizes the loop runs at, in turn (see `decode`): halving while the half is >= 2 rows and
    splits over the batch's shards. Sampling modes run at one size, so that their draws do not
    depend on how the batch was compacted."""
    sizes = [batch]
    while (not self.sampling and sizes[-1] // 2 >= max(2, self.batch_shards)
           and sizes[-1] // 2 % self.batch_shards == 0):
      sizes.append(sizes[-1] // 2)
    return tuple(sizes)

  def batch(self, n_prompts: int) -> int:
    """Rows the loop decodes at once for n_prompts prompts."""
    return min(self.slots, n_prompts) if self.slots else n_prompts

  @property
  def speculative(self) -> bool:
    return self.mode in ("speculative", "speculative_sample") and self.draft_block > 1

  @property
  def sampling(self) -> bool:
    return self.mode in ("sample", "speculative_sample")

  @property
  def block(self) -> int:       # tokens fed per step: last token + k-1 drafts
    return self.draft_block if self.speculative else 1

  @property
  def heads_run(self) -> int:   # greedy and sample need head 0 only
    return self.block


class SamplingParams(NamedTuple):
  """Traced scalars, so new values never recompile. top_k=0 and top_p=1 switch those filters off."""
  temperature: Array
  top_k: Array
  top_p: Array
  eos_id: Array     # -1: no end-of-sequence token

  @classmethod
  def of(cls, temperature=1.0, top_k=0, top_p=1.0, eos_id: Optional[int] = None) -> "SamplingParams":
    """From Python numbers, with the dtypes the compiled loop was traced with."""
    return cls(jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p),
               jnp.int32(-1 if eos_id is None else eos_id))


@flax.struct.dataclass
class DecodeState:
  cache: Any
  tokens: Array      # [B, max_new + k] generated tokens; slots at and past `count` are scratch
  count: Array       # [B] tokens generated so far
  position: Array    # [B] position of the last generated token: where the next block starts
  drafts: Array      # [B, k-1] drafted tokens that follow the last generated token
  draft_logq: Any    # [B, k-1, V] the distributions the drafts were sampled from (sampling modes only)
  done: Array        # [B] hit EOS or max_new_tokens
  key: Array
  steps: Array       # [] forward passes after the prefill
  forwards: Array    # [B] forward passes that emitted this row's tokens, prefill included
  accepted: Array    # [B, k-1] drafts of head i (1..k-1) accepted
  recent: Any = None  # sequential modules: head 0's hidden states [B, D-1, d] and the tokens [B, D-1] at the
                      # D-1 positions before `position`, where the modules' caches are rewritten next step


@flax.struct.dataclass
class DecodeOutput:
  tokens: Array      # [B, max_new_tokens], PAD past `lengths`
  lengths: Array     # [B] tokens generated (the first EOS included)
  forwards: Array    # [B] forward passes that emitted them (prefill included)
  accepted: Array    # [B, k-1] drafts accepted per draft head; each was proposed forwards-1 times
  steps: Array       # [] loop iterations (forward passes after the prefill) for the whole batch
  row_steps: Array   # [] rows x forward passes the batch ran, the prefills' included: less than
                     # batch x (steps + 1) where compaction dropped finished rows
