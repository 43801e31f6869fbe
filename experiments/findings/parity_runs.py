"""What experiments/findings/sequential_vs_parallel.py and n_sweep.py share: a recipe with its heads under
parity, held-out prompts, and greedy against self-speculative decoding at batch 1."""
import statistics

import numpy as np


def run_config(head_type: str, n: int, quick: bool, steps: int = 0, variant=None):
  """configs/default.py[:variant] (quick: configs/tiny.py) with these heads under parity; steps=0 keeps the recipe's."""
  if quick:
    from mtp_jax.recipes.tiny import get_config
    c = get_config(None if variant == "sp" else "bytes")
    c.model.update(n_layers=5, max_seq_len=128)
    c.data.update(seq_len=32, max_train_bytes=100_000)
    c.train.update(steps=4, log_every=1, eval_every=4, checkpoint_every=4, eval_batches=1)
  else:
    from mtp_jax.recipes.default import get_config
    c = get_config(variant)
  c.model.update(head_type=head_type, n_future=n, parity=True)
  if steps:
    c.train.update(steps=steps, eval_every=min(c.train.eval_every, steps))
  return c


def held_out_prompts(config, tokenizer, n: int, length: int):
  import ml_collections
  from mtp_jax import data
  cfg = ml_collections.ConfigDict(config.data.to_dict())
  cfg.max_train_bytes = 0
  prompts = []
  for text in data.Corpus(cfg).texts("valid"):
    ids = tokenizer.encode(text)[:length]
    if len(ids) == length:
      prompts.append(ids)
    if len(prompts) == n:
      return prompts
  raise SystemExit(f"error: the validation split has only {len(prompts)} documents of >= {length} tokens; "
                   f"lower --prompt_len or --prompts")


# Every head drafts every step (not auto's budget): the acceptance per draft position.
CHAIN = {"greedy": {}, "speculative": {"draft": "chain"}}


def decode_batch1(params, args, prompts, max_new: int, repeats: int) -> dict:
  """Greedy vs speculative at batch 1 over the prompts, max_new tokens each: median of repeats of
  seconds, speedup, tokens/forward, acceptance."""
  from mtp_jax import decode
  calls = [decode.pad_prompts([p], len(p)) for p in prompts]
  kw = dict(max_new_tokens=max_new, eos_id=-1)
  modes = ("greedy", "speculative")
  outs = {m: [decode.run(params, args, t, l, mode=m, **kw, **CHAIN[m])[0] for t, l in calls] for m in modes}   # compile
  seconds = {m: [] for m in modes}
  for _ in range(repeats):
    total = dict.fromkeys(modes, 0.0)
    for i, (t, l) in enumerate(calls):
      for m in modes:                      # back to back on each prompt: drift hits both modes
        outs[m][i], timing = decode.run(params, args, t, l, mode=m, **kw, **CHAIN[m])
        total[m] += timing["wall_s"]
    for m in modes:
      seconds[m].append(total[m])
  spec = outs["speculative"]
  med = {m: statistics.median(v) for m, v in seconds.items()}
  same = all(np.array_equal(a.tokens, b.tokens) for a, b in zip(outs["greedy"], spec))
  return {"greedy_tok_s": len(prompts) * max_new / med["greedy"],
          "speculative_tok_s": len(prompts) * max_new / med["speculative"],
          "speedup": med["greedy"] / med["speculative"],
          **_chain_stats(spec, len(prompts) * max_new), "identical_to_greedy": same}


def chain_acceptance(params, args, prompts, max_new: int) -> dict:
  """decode_batch1's tokens/forward and acceptance from one untimed speculative pass."""
  from mtp_jax import decode
  outs = [decode.run(params, args, *decode.pad_prompts([p], len(p)), mode="speculative", max_new_tokens=max_new,
                     eos_id=-1, **CHAIN["speculative"])[0] for p in prompts]
  return _chain_stats(outs, len(prompts) * max_new)


def _chain_stats(outs, tokens: int) -> dict:
  """Tokens per forward, and per draft position the drafts accepted over the verify steps (a draft is proposed
  only where the drafts before it were accepted)."""
  forwards = sum(int(o.forwards.sum()) for o in outs)
  proposed = sum(int((o.forwards - 1).sum()) for o in outs)
  accepted = np.sum([o.accepted.sum(0) for o in outs], axis=0)
  return {"tokens_per_forward": tokens / forwards, "acceptance": [float(a) / max(proposed, 1) for a in accepted]}
