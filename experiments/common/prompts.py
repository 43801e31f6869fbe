"""Held-out prompts for the decoding benchmarks: windows of the validation split's documents."""


def held_out_prompts(corpus, tokenizer, n: int, length: int, rng) -> list[list[int]]:
  """n distinct prompts of `length` tokens from the validation documents, each from a random line (code, not
  just headers): one per document in turn, and when the documents run out, another pass with new starts.
  Raises UserError where the split cannot give n of them (the flags ask for more than it holds)."""
  texts = list(corpus.texts("valid"))
  prompts, seen = [], set()
  for _ in range(4 * n):                # passes; a pass that finds nothing new ends it
    found = 0
    for text in texts:
      lines = text.splitlines(keepends=True)
      start = sum(len(l) for l in lines[:rng.integers(0, max(1, len(lines) // 2))])
      ids = tokenizer.encode(text[start:])[:length]
      if len(ids) == length and tuple(ids) not in seen:
        seen.add(tuple(ids))
        prompts.append(ids)
        found += 1
      if len(prompts) == n:
        return prompts
    if not found:
      break
  from mtp_jax.errors import UserError
  raise UserError(f"the validation split gave only {len(prompts)} distinct prompts of {length} tokens; "
                   f"lower --prompt_len or --prompts")


def valid_split_prompts(config, tokenizer, n: int, length: int, rng) -> list[list[int]]:
  """held_out_prompts from a run's whole validation split (its config's training-bytes cap lifted, which would
  otherwise cap the split read too)."""
  import ml_collections
  from mtp_jax import data
  data_cfg = ml_collections.ConfigDict(config.data.to_dict())
  data_cfg.max_train_bytes = 0
  return held_out_prompts(data.Corpus(data_cfg), tokenizer, n, length, rng)
