"""draft_trace replays speculative decoding from one plain forward: its step and acceptance counts
must match the decode loop's own, row by row."""
import numpy as np
import pytest

from mtp_jax import decode
from mtp_jax.draft_trace import draft_trace, in_repeats

from helpers import MIXED, decode_run, tiny_config, tiny_decoder


@pytest.mark.parametrize("head_type,draft_vocab", [("parallel", None), ("linear", None),
                                                    ("sequential", [6, 1, 3, 4, 0])])
def test_trace_matches_the_decode_loop(head_type, draft_vocab):
  """For sequential modules this is what says the loop feeds each module what training does (head 1's
  hidden state and the next token's embedding at every position, its cache over the accepted tokens):
  a module fed anything else drafts other tokens, and verification would hide that behind exact output.
  With a draft vocabulary (in params) the drafts choose among its tokens in both."""
  n = 4
  vocab = 8 if head_type == "sequential" else 48    # random modules: drafts right by chance, often enough to count
  model, params = tiny_decoder(n=n, head_type=head_type, vocab=vocab, shared=head_type != "sequential")
  config = tiny_config(vocab_size=vocab, n_future=n, head_type=head_type, n_layers=n + 1)
  prompts = [[t % vocab for t in p] for p in MIXED]
  greedy = decode_run(model, params, prompts, "greedy", max_new_tokens=24)
  if draft_vocab is not None:
    params = decode.with_draft_vocab(params, draft_vocab, vocab)
  out = decode_run(model, params, prompts, "speculative", max_new_tokens=24, draft="chain")   # the chain it replays
  np.testing.assert_array_equal(out.tokens, greedy.tokens)
  for r, prompt in enumerate(prompts):
    tokens = out.tokens[r, :int(out.lengths[r])].tolist()
    trace = draft_trace(params, config, prompt, tokens)
    assert trace["forward_passes"] == int(out.forwards[r])
    assert sum(trace["drafted"]) == sum(trace["accepted"]) and not trace["drafted"][0]
    steps = trace["steps"]   # consecutive, after the prefill's token, one per verify pass
    assert len(steps) == trace["forward_passes"] - 1 and sum(n for _, n in steps) == len(tokens) - 1
    assert [i for i, _ in steps] == [1 + sum(n for _, n in steps[:j]) for j in range(len(steps))]
    assert all(1 <= n <= 4 for _, n in steps)
    # The loop also counts drafts accepted past max_new_tokens in its last step (at most one per head).
    dec = out.accepted[r].tolist()
    assert all(t <= d <= t + 1 for t, d in zip(trace["accepted"], dec)), (trace["accepted"], dec)
  assert out.accepted.sum() > 0


def test_in_repeats_marks_ngrams_seen_before():
  #                      prompt [1 2 3], then 1 2 3 (the prompt's 3-gram again, at its last token) and 4
  assert in_repeats([1, 2, 3, 1, 2, 3, 4], 3, 3).tolist() == [False, False, True, False]
  assert in_repeats([5, 5, 5, 5], 1, 2).tolist() == [False, True, True]
