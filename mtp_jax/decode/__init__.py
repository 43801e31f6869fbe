"""KV-cached decoding, greedy, sampled and self-speculative, as one jit-compiled program per static setting.

The package by concern:

    types.py    what is static about a decode (Settings), the traced sampling scalars, the loop's state
    forward.py  the model's layers as the loop runs them: weights rearranged once, KV caches, the cached
                forward pass over a block
    draft.py    drafting and verification: the drafters behind one interface, exact speculative acceptance
    loop.py     the compiled program: prefill, then one `jax.lax.while_loop` over blocks, with continuous
                batching and compaction of finished rows
    rows.py     the loop's rows: each prompt's results as its row ends, rows moved between batches
    host.py     the host side: a caller's options checked once (Request), prompts padded, programs cached
    costs.py    --draft=auto's cost table: a step of j drafts over a greedy step, timed once per program
    tree.py     --draft=tree / bestfirst: a static or per-row best-first tree of the heads' top choices, verified
                in one pass (greedy or by multi-draft rejection sampling), its path kept; auto's tree too

Everything a caller uses is importable from here: `from mtp_jax import decode; decode.run(...)`.
"""
from mtp_jax.decode.draft import adjusted_logprobs
from mtp_jax.decode.forward import (Weights, decode_weights, forward_hidden, init_decode_cache, run_heads, unembed,
                                    with_draft_vocab)
from mtp_jax.decode.host import (DRAFTS, MIN_TEMPERATURE, Request, check_request, check_slots, clear_compiled,
                                 compiled_decode, execute, max_prompt_len, pad_prompts, prompt_bucket, run)
from mtp_jax.decode.loop import decode, prefill, step, trace_count
from mtp_jax.decode.types import (MODES, PAD, Budget, Candidates, DecodeError, DecodeOutput, DecodeState, SamplingParams, Settings,
                                  Tree, choose_budget)

__all__ = [
    "DRAFTS", "MIN_TEMPERATURE", "MODES", "PAD", "Budget", "Candidates", "DecodeError", "DecodeOutput", "DecodeState", "Request",
    "SamplingParams", "Settings", "Tree", "Weights", "adjusted_logprobs", "check_request", "check_slots", "choose_budget",
    "clear_compiled", "compiled_decode", "decode", "decode_weights", "execute", "forward_hidden",
    "init_decode_cache", "max_prompt_len", "pad_prompts", "prefill", "prompt_bucket", "run", "run_heads", "step",
    "trace_count", "unembed", "with_draft_vocab",
]
