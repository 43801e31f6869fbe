r"""Text generation: the `generate()` API for notebooks and the command line around it.

    mtp-jax-generate --workdir=workdirs/default --prompt="def fib(n):" \
        --mode=speculative --max_new_tokens=128 --output=out.jsonl

`generate()` batches prompts (token-id lists, or text when a tokenizer is given) into fixed
shapes, runs `decode.run` on each batch and returns one result per prompt: its tokens, text and
statistics (forward passes, tokens per forward, per-head draft acceptance, wall time).
"""
from __future__ import annotations

import json
import logging as std_logging
import os
import sys
from typing import Optional, Sequence

import jax
import numpy as np

from mtp_jax import decode
from mtp_jax.decode import DecodeError
from mtp_jax.errors import UserError, no_positional_args, run_cli
from mtp_jax.model import ModelArgs


def _model_args(config) -> ModelArgs:
  return config if isinstance(config, ModelArgs) else ModelArgs.from_config(config.model)


def _tok_value(tokenizer, name: str):
  """A tokenizer property that may be an attribute or a method (sentencepiece uses methods)."""
  v = getattr(tokenizer, name, None)
  return v() if callable(v) else v


def tokenizer_vocab_size(tokenizer) -> Optional[int]:
  for name in ("vocab_size", "get_piece_size"):
    v = _tok_value(tokenizer, name)
    if v is not None:
      return int(v)
  return None


def tokenizer_eos_id(tokenizer) -> int:
  v = _tok_value(tokenizer, "eos_id")
  return -1 if v is None else int(v)


def check_tokenizer(tokenizer, vocab_size: int) -> None:
  size = tokenizer_vocab_size(tokenizer)
  if size is not None and size != vocab_size:
    raise DecodeError(f"the tokenizer has {size} tokens but the model's vocabulary has {vocab_size}; "
                      f"use the tokenizer the checkpoint was trained with (config data.tokenizer)")


def _as_prompt_list(prompts) -> list:
  """One prompt (text or a token list) or a list of them -> a list of prompts."""
  if isinstance(prompts, str):
    return [prompts]
  prompts = list(prompts)
  if prompts and isinstance(prompts[0], (int, np.integer)):
    return [prompts]
  return prompts


def generate(params, config, prompts, tokenizer=None, *, mode: str = "greedy", max_new_tokens: int = 64,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             eos_id: Optional[int] = None, batch_size: Optional[int] = None, add_bos: Optional[bool] = None,
             prompt_bucket: Optional[int] = None, draft_heads: Optional[int] = None,
             draft: Optional[str] = None, tree_nodes: Optional[int] = None,
             tree_top: Optional[int] = None) -> list[dict]:
  """Continue each prompt; returns one dict per prompt (see `_result`).

  params: the model's parameters; config: the training config (or its ModelArgs).
  prompts: text (needs `tokenizer`, with encode/decode) or token-id lists, or one of either.
  eos_id: stop token; None = the tokenizer's EOS when it has one, -1 = never stop early.
  add_bos: start text prompts with the tokenizer's BOS, as every training document starts (default: the
    tokenizer's own policy, e.g. False for SmolLM2's GGUF; True where it states none).
  batch_size: rows decoded at once (default: all prompts). greedy / speculative: one call in which a
    finished row takes the next prompt; sampling modes: batches of batch_size, the last one padded.
  prompt_bucket: pad prompts to this length (default: a power of two), fixing the compiled shape.
  draft_heads: speculative modes: heads 2..draft_heads draft (default all n_future); see `decode.run`.
  draft: speculative modes: "chain", "auto" (the default where the heads allow), "tree" or "bestfirst"; see `decode.run`.
  tree_nodes, tree_top: the tree's size and each head's choices (draft="tree" / "bestfirst"); see `decode.run`.
  """
  request = decode.Request(mode, max_new_tokens, temperature, top_k, top_p, draft_heads, draft, tree_nodes, tree_top)
  check_batching(batch_size, seed)
  return generate_checked(params, config, prompts, request, tokenizer, seed=seed, eos_id=eos_id,
                          batch_size=batch_size, add_bos=add_bos, prompt_bucket=prompt_bucket)


def check_batching(batch_size: Optional[int], seed: int, flag: str = "") -> None:
  if batch_size is not None and batch_size < 1:
    raise DecodeError(f"{flag}batch_size={batch_size}: must be >= 1")
  if not -2 ** 63 <= seed < 2 ** 63:
    raise DecodeError(f"{flag}seed={seed}: must fit a signed 64-bit integer")


def generate_checked(params, config, prompts, request: decode.Request, tokenizer=None, *, seed: int = 0,
                     eos_id: Optional[int] = None, batch_size: Optional[int] = None, add_bos: Optional[bool] = None,
                     prompt_bucket: Optional[int] = None) -> list[dict]:
  """generate() for options already checked (`decode.Request`, `check_batching`): the command line checks
  them from its flags before it loads a model, and nothing checks them again. Checks what needs the model."""
  args = _model_args(config)
  prompts = _as_prompt_list(prompts)
  if tokenizer is not None:
    check_tokenizer(tokenizer, args.vocab_size)
  if add_bos is None:
    add_bos = bool(getattr(tokenizer, "add_bos", True))
  ids = []
  for i, p in enumerate(prompts):
    if isinstance(p, str):
      if tokenizer is None:
        raise DecodeError(f"prompt {i} is text but no tokenizer was given; pass tokenizer= or token ids")
      if not p:
        raise DecodeError(f"prompt {i} is empty: give at least one character")
      bos = _tok_value(tokenizer, "bos_id")
      p = ([int(bos)] if add_bos and bos is not None and bos >= 0 else []) + list(tokenizer.encode(p))
    ids.append([int(t) for t in p])
  decode.check_request(args, ids, request)
  mode, max_new_tokens = request.mode, request.max_new_tokens
  if eos_id is None:
    eos_id = tokenizer_eos_id(tokenizer) if tokenizer is not None else -1
  if not -1 <= eos_id < args.vocab_size:
    raise DecodeError(f"eos_id={eos_id}: outside the vocabulary [0, {args.vocab_size}); give a token id, or -1 for "
                      f"no stop token")
  batch_size = len(ids) if batch_size is None else batch_size
  limit = decode.max_prompt_len(args, max_new_tokens)
  bucket = prompt_bucket or decode.prompt_bucket(max(len(p) for p in ids), limit)
  if bucket < max(len(p) for p in ids) or bucket > limit:
    raise DecodeError(f"prompt_bucket={bucket}: must hold the longest prompt ({max(len(p) for p in ids)}) "
                      f"and be <= {limit} (model.max_seq_len - max_new_tokens - n_future)")

  results = []
  # Argmax modes decode every prompt in one call of batch_size rows: a finished row takes the next
  # prompt (continuous batching). Sampling modes run batch after batch, so draws follow the seed and batch.
  per_call = len(ids) if mode in ("greedy", "speculative") else batch_size
  rows = min(batch_size, per_call)
  for start in range(0, len(ids), per_call):
    chunk = ids[start:start + per_call]
    padded = chunk + [chunk[0]] * (rows - len(chunk))   # fixed batch shape: repeat a prompt, drop it
    tokens, lengths = decode.pad_prompts(padded, bucket)
    out, timing = decode.execute(params, args, tokens, lengths, request, eos_id=eos_id, slots=rows,
                                 key=jax.random.fold_in(jax.random.key(seed), start))
    batch = {"batch": start // per_call, "batch_size": rows, "batch_forward_passes": int(out.steps) + 1,
             **({"batch_draft_budget_steps": [int(x) for x in out.budget_steps]} if mode.startswith("speculative")
                else {}),
             **({"batch_draft_grows": int(out.grows)} if request.draft_kind(args) == "auto" and mode.startswith("speculative")
                else {}),
             "batch_new_tokens": int(np.sum(out.lengths[:len(chunk)])), **{f"batch_{k}": v for k, v in timing.items()}}
    for r in range(len(chunk)):
      prompt = prompts[start + r]
      prompt = prompt if isinstance(prompt, str) else chunk[r]   # token prompts as plain ints (JSON-ready)
      results.append(_result(prompt, chunk[r], out, r, mode, eos_id, batch, tokenizer))
  return results


def _result(prompt, prompt_ids, out, r: int, mode: str, eos_id: int, batch: dict, tokenizer) -> dict:
  """One prompt's output: tokens (its first EOS included), text, finish reason and statistics:

  new_tokens          tokens generated
  forward_passes      forward passes that emitted them, the prefill included (greedy: = new_tokens)
  tokens_per_forward  new_tokens / forward_passes
  draft_proposed      per draft head (heads 2..n): drafts proposed (chain: every forward after the prefill;
                      --draft=auto: the forwards whose budget reached the head); speculative modes only
  draft_accepted      per draft head; a draft counts only if every earlier one was accepted
  acceptance_rate     per draft head: accepted / proposed
  accepted_per_step   drafts accepted per forward after the prefill (tokens per forward - 1, but for EOS)
  batch_*             of its batch: forward passes (prefill included), wall_s (compile excluded), compile_s,
                      draft_budget_steps (forwards with 0, 1, .. drafts), --draft=auto's draft_costs (C per
                      draft length), costs_s (their one-off timing) and draft_grows (times the budget grew back)
  """
  n = int(out.lengths[r])
  tokens = [int(t) for t in out.tokens[r, :n]]
  forwards = int(out.forwards[r])
  proposed = [int(p) for p in out.proposed[r]]
  accepted = [int(a) for a in out.accepted[r]]
  finished = "eos" if (n and tokens[-1] == eos_id) else "length"
  res = {"prompt": prompt, "prompt_tokens": list(prompt_ids), "tokens": tokens, "finish_reason": finished}
  if tokenizer is not None:
    res["text"] = tokenizer.decode(tokens[:-1] if finished == "eos" else tokens)
  drafts = {}
  if mode.startswith("speculative"):   # greedy and sample runs draft nothing: no draft statistics
    drafts = {"draft_proposed": proposed, "draft_accepted": accepted,
              "acceptance_rate": [a / p if p else 0.0 for a, p in zip(accepted, proposed)],
              "accepted_per_step": sum(accepted) / max(forwards - 1, 1)}
  res["stats"] = {"mode": mode, "new_tokens": n, "forward_passes": forwards, "tokens_per_forward": n / max(forwards, 1),
                  **drafts, **batch}
  return res


def summarize(results: Sequence[dict]) -> dict:
  """Totals over results: tokens, wall time (per batch, counted once), tokens/s, tokens per forward, acceptance."""
  batches = {r["stats"]["batch"]: r["stats"] for r in results}
  wall = sum(b["batch_wall_s"] for b in batches.values())
  tokens = sum(r["stats"]["new_tokens"] for r in results)
  forwards = sum(r["stats"]["forward_passes"] for r in results)
  drafted = [r["stats"] for r in results if "draft_proposed" in r["stats"]]
  proposed = np.sum([s["draft_proposed"] for s in drafted], axis=0) if drafted else []
  accepted = np.sum([s["draft_accepted"] for s in drafted], axis=0) if drafted else []
  return {"prompts": len(results), "new_tokens": tokens, "wall_s": wall,
          "compile_s": sum(b["batch_compile_s"] for b in batches.values()),
          "tokens_per_s": tokens / wall if wall else 0.0,
          "batch_forward_passes": sum(b["batch_forward_passes"] for b in batches.values()),
          "tokens_per_forward": tokens / max(forwards, 1),
          "acceptance_rate": [float(a) / p if p else 0.0 for a, p in zip(np.atleast_1d(accepted),
                                                                           np.atleast_1d(proposed))]}


# ----------------------------------------------------------------------------- loading a workdir

def load_workdir(workdir: str):
  """(params, config, tokenizer) of a training run's latest good checkpoint."""
  from mtp_jax import io
  io.check_bucket(workdir, "--workdir")
  root = io.path(workdir)
  if root.exists() and not root.is_dir():
    raise DecodeError(f"--workdir={workdir} is a file, not a training run directory")
  if not root.is_dir():
    raise DecodeError(f"--workdir={workdir}: no such directory")
  from mtp_jax import workdir as workdir_lib
  if not workdir_lib.is_run(root):
    raise DecodeError(f"--workdir={workdir} has no {workdir_lib.CONFIG_FILE}: not a training run directory")
  ckpt_dir = root / workdir_lib.CHECKPOINTS
  has_ckpt = ckpt_dir.is_dir() and any(d.name.isdigit() for d in ckpt_dir.iterdir())
  if not has_ckpt and not workdir_lib.has_pretrained(root):   # pretrained: convert import
    raise DecodeError(f"--workdir={workdir} has no checkpoint in {ckpt_dir}: train first "
                      f"(python -m mtp_jax.main --config=... --workdir={workdir})")
  from mtp_jax import checkpoint, tokenizer as tokenizer_lib   # orbax and sentencepiece only when loading a run
  params, config = checkpoint.load_params(workdir)
  tokenizer = tokenizer_lib.load_tokenizer(workdir)
  check_tokenizer(tokenizer, int(params["embed"]["embedding"].shape[0]))
  return params, config, tokenizer


def read_prompts(prompt: Sequence[str], prompt_file: Optional[str]) -> list[str]:
  """--prompt values, then --prompt_file: JSONL ({"prompt": ...} or a JSON string per line) or one per line."""
  prompts = list(prompt or [])
  if prompt_file:
    prompt_file = os.path.expanduser(prompt_file)
    if not os.path.exists(prompt_file):
      raise DecodeError(f"--prompt_file={prompt_file}: no such file")
    if os.path.isdir(prompt_file):
      raise DecodeError(f"--prompt_file={prompt_file} is a directory; give a .jsonl or text file")
    try:
      with open(prompt_file, encoding="utf-8") as f:
        numbered = [(i + 1, l) for i, l in enumerate(f.read().splitlines()) if l.strip()]   # file line numbers
    except UnicodeDecodeError as e:
      raise DecodeError(f"--prompt_file={prompt_file} is not UTF-8 text (byte {e.start}); save it as UTF-8")
    if prompt_file.endswith(".jsonl"):
      prompts += [_jsonl_prompt(prompt_file, n, l) for n, l in numbered]
    else:
      prompts += [l.replace("\\n", "\n") for _, l in numbered]
  if not prompts:
    raise DecodeError("no prompt: give --prompt=TEXT or --prompt_file=FILE")
  for i, p in enumerate(prompts):
    if not p:
      raise DecodeError(f"prompt {i} is empty: give at least one character")
  return prompts


def _jsonl_prompt(path: str, n: int, line: str) -> str:
  """Line n of a JSONL prompt file: a JSON string, or an object with a string "prompt" (or "text")."""
  try:
    row = json.loads(line)
  except json.JSONDecodeError as e:
    raise DecodeError(f"--prompt_file={path} line {n}: not JSON ({e.msg})")
  if isinstance(row, dict):
    row = row.get("prompt", row.get("text"))
  if not isinstance(row, str):
    raise DecodeError(f"--prompt_file={path} line {n}: expected a JSON string or an object with a string "
                      f"\"prompt\" field")
  return row


def check_output(path: str) -> str:
  """Refuse an --output that cannot be written, before any generation is done (and would be lost)."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(path):
    raise DecodeError(f"--output={path} is a directory; give a file name such as out.jsonl")
  place = os.path.dirname(path)
  while not os.path.exists(place) and place != os.path.dirname(place):
    place = os.path.dirname(place)
  if not os.path.isdir(place):
    raise DecodeError(f"--output={path} cannot be created: {place} is a file")
  target = path if os.path.exists(path) else place
  if not os.access(target, os.W_OK):
    raise DecodeError(f"--output={path}: cannot write {'it' if target == path else 'in ' + place} "
                      f"(read-only or no permission); give a writable path")
  return path


# ----------------------------------------------------------------------------- command line

def _define_flags():
  """Flags are defined only when run as a program, so importing this module never clashes with main.py's."""
  from absl import flags
  flags.DEFINE_string("workdir", None, "Training run directory (config.json, checkpoints/).")
  flags.DEFINE_multi_string("prompt", [], "Prompt text (repeatable).")
  flags.DEFINE_string("prompt_file", None, "Prompts: .jsonl with {'prompt': ...} per line, or one per line (\\n escapes).")
  flags.DEFINE_enum("mode", "greedy", decode.MODES, "Decoding mode.")
  flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate per prompt (at most).")
  flags.DEFINE_integer("batch_size", 8, "Rows decoded at once. greedy / speculative: a finished row takes "
                       "the next prompt (continuous batching); sampling modes: prompts per batch.")
  flags.DEFINE_integer("draft_heads", None, "Speculative modes: the block k, 2..n_future (default n_future): heads "
                       "2..k draft; fewer can be faster where a verify step is bound by arithmetic (CPU, big batches).")
  flags.DEFINE_string("draft", None, "Speculative modes: chain (every step drafts --draft_heads-1 tokens) or auto "
                      "(the default where the heads allow: each step drafts the 0..--draft_heads-1 tokens that pay "
                      "most, from the measured step costs and acceptance) or tree (a static tree of the heads' top choices, "
                      "verified in one forward pass) or bestfirst (a tree of as many nodes, each row's most probable "
                      "under the heads at every step).")
  flags.DEFINE_integer("tree_nodes", None, "--draft=tree / bestfirst: the tree's nodes, so a verify step feeds "
                       "1 + tree_nodes tokens (default: the static tree's count, 9 with 4 heads; tree: at most that). "
                       "--draft=auto (mode=speculative): the static tree of that many nodes is one more budget auto "
                       "may choose per step (0: chains only; default: the whole tree on an accelerator, none on a CPU).")
  flags.DEFINE_integer("tree_top", None, "--draft=bestfirst: each head's top choices the trees choose among "
                       "(default 4).")
  flags.DEFINE_integer("draft_vocab", None, "Speculative modes: drafts choose among the N most frequent tokens "
                       "that W/draft_vocab.npy ranks (decode.with_draft_vocab); default: the whole vocabulary.")
  flags.DEFINE_float("temperature", 1.0, "Sampling temperature (sampling modes).")
  flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off; sampling modes).")
  flags.DEFINE_float("top_p", 1.0, "Nucleus mass (1 = off; sampling modes).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_integer("eos_id", None, "Stop token id (default: the tokenizer's EOS; -1: none).")
  flags.DEFINE_string("output", None, "Write one JSON object per prompt to this .jsonl file.")
  flags.DEFINE_bool("chat", False, "Wrap each prompt as a user message in the model's chat template and stop at "
                    "its end-of-turn token (imported chat models).")
  flags.DEFINE_string("system", None, "--chat: a system message before each prompt (default: the template's own).")


def main(argv):
  from absl import flags
  no_positional_args(argv)
  f = flags.FLAGS
  if not f.workdir:
    raise DecodeError("need --workdir=<training run directory>")
  # Every flag is checked once, here, before loading or generating anything, whatever the mode.
  request = decode.Request(f.mode, f.max_new_tokens, f.temperature, f.top_k, f.top_p, f.draft_heads, f.draft,
                           f.tree_nodes, f.tree_top,
                           flag="--")
  check_batching(f.batch_size, f.seed, flag="--")
  if f.draft_vocab is not None and f.draft_vocab < 1:
    raise DecodeError(f"--draft_vocab={f.draft_vocab}: give how many token ids drafts choose among (>= 1)")
  if f.draft_vocab and f.tree_top and f.tree_top > f.draft_vocab:
    raise DecodeError(f"--tree_top={f.tree_top}: drafts choose among --draft_vocab={f.draft_vocab} tokens only")
  output = check_output(f.output) if f.output else None
  prompts = read_prompts(f.prompt, f.prompt_file)
  params, config, tokenizer = load_workdir(f.workdir)
  if f.draft_vocab:
    from mtp_jax import workdir as workdir_lib
    ids = workdir_lib.read_draft_vocab(f.workdir, f.draft_vocab)
    params = decode.with_draft_vocab(params, ids, config.model.vocab_size)
  eos_id, add_bos, shown = f.eos_id, None, prompts
  if f.chat:   # the template writes any BOS itself, and the reply ends with the end-of-turn token
    from mtp_jax import chat
    prompts = [chat.render(tokenizer, p, f.system) for p in prompts]
    eos_id = chat.end_of_turn_id(tokenizer) if eos_id is None else eos_id
    add_bos = False
  results = generate_checked(params, config, prompts, request, tokenizer, seed=f.seed, eos_id=eos_id,
                             batch_size=min(f.batch_size, len(prompts)), add_bos=add_bos)
  for r, p in zip(results, shown):
    r["prompt"] = p
  if output:
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output, "w") as out:
      for r in results:
        out.write(json.dumps(r) + "\n")
  else:
    for r in results:
      print(f"--- {r['prompt']!r}\n{r.get('text', r['tokens'])}")
  print(json.dumps(summarize(results)), file=sys.stderr)


class _QuietOrbax(std_logging.Filter):
  """Orbax logs tens of INFO/WARNING lines per restore; a generation run only needs its errors."""

  def filter(self, record):
    return record.levelno >= std_logging.ERROR or "/orbax/" not in record.pathname


def _parse_flags(argv):
  from absl import flags
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:   # unknown flag, bad --mode value, ...: one line, like every other mistake
    raise UserError(str(e).strip().splitlines()[0])


def run():
  """Like mtp_jax.main.run: user mistakes are one line on stderr and exit status 2, no traceback."""
  from absl import logging
  _define_flags()
  logging.get_absl_handler().addFilter(_QuietOrbax())
  run_cli(main, _parse_flags)


if __name__ == "__main__":
  run()
