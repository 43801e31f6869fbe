"""One matrix-vector product per row in a decode step's few-row products (mtp_jax.row_products), on and off,
timed side by side on a trained run: greedy and speculative decoding at each chain length and with auto.

    python experiments/speed/row_products.py --workdir=workdirs/default
    python experiments/speed/row_products.py --quick        # a random tiny model (the CI smoke run)

"off" sets row_products.ROWS_UP_TO = 1, so every product over 2+ rows is one GEMM (XLA:CPU's YNNPACK), as
before the change; "on" is the default (2..3 rows: one product per row). Each setting compiles its own
programs; the timed runs then alternate between the settings, scheme by scheme, and the table gives the
medians, each setting's speedup over its own greedy, and on / off. Every output is checked token for token
against greedy with the split off. Writes experiments/speed/results/<out_name>.{md,json}.
"""
import os
import sys
import time

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # experiments/, for common/

import jax  # noqa: E402
import numpy as np  # noqa: E402

from common import cli  # noqa: E402
from common.decode_models import tiny_drafting_model, with_workdir_draft_vocab  # noqa: E402
from common.prompts import valid_split_prompts  # noqa: E402
from common.results_io import results_folder, write_results  # noqa: E402
from mtp_jax.errors import exit_with  # noqa: E402
from mtp_jax import decode, row_products  # noqa: E402
from mtp_jax.cpu_flags import cpu_model  # noqa: E402
from mtp_jax.model import ModelArgs  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "workdirs/default", "Trained run to decode with.")
_N_PROMPTS = flags.DEFINE_integer("prompts", 8, "Held-out prompts, decoded one call per scheme.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "Prompt length in tokens.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens generated per prompt (EOS off).")
_BATCH = flags.DEFINE_integer("batch_size", 1, "Rows decoded at once (a finished row takes the next prompt).")
_SCHEMES = flags.DEFINE_list("schemes", ["greedy", "chain2", "chain3", "chain4", "auto"],
                             "greedy, chainK (a chain of K-1 drafts: --draft_heads=K) or auto.")
_DRAFT_VOCAB = flags.DEFINE_integer("draft_vocab", 0, "Drafts choose among the N most frequent tokens of "
                                    "<workdir>/draft_vocab.npy (decode.with_draft_vocab); 0: the whole vocabulary.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per setting and scheme, interleaved.")
_QUICK = flags.DEFINE_bool("quick", False, "A random tiny model, 4 prompts of 8 tokens, 8 new tokens, greedy and "
                           "chain2, 1 repeat.")
_OUT_DIR = flags.DEFINE_string("out_dir", results_folder(__file__), "Results folder.")
_OUT = flags.DEFINE_string("out_name", "", "Results stem (default: row_products[_quick]).")

SETTINGS = {"off": 1, "on": row_products.ROWS_UP_TO}


def load():
  """(params, args, prompts, where they came from)."""
  rng = np.random.default_rng(0)
  if _QUICK.value:
    params, config = tiny_drafting_model()
    prompts = [rng.integers(1, 48, 8).tolist() for _ in range(4)]
    return params, ModelArgs.from_config(config.model), prompts, "random init (heads copies of head 0)"
  from mtp_jax.generate import load_workdir
  params, config, tokenizer = load_workdir(_WORKDIR.value)
  prompts = valid_split_prompts(config, tokenizer, _N_PROMPTS.value, _PROMPT_LEN.value, rng)
  args = ModelArgs.from_config(config.model)
  if _DRAFT_VOCAB.value:
    params = with_workdir_draft_vocab(params, args.vocab_size, _WORKDIR.value, _DRAFT_VOCAB.value)
  return params, args, prompts, f"{_WORKDIR.value}, valid split"


def scheme_kwargs(scheme: str, n_future: int) -> dict:
  if scheme == "greedy":
    return {"mode": "greedy"}
  if scheme == "auto":
    return {"mode": "speculative", "draft": "auto"}
  if scheme.startswith("chain") and scheme[5:].isdigit() and 2 <= int(scheme[5:]) <= n_future:
    return {"mode": "speculative", "draft": "chain", "draft_heads": int(scheme[5:])}
  exit_with(f"--schemes: {scheme!r} is not greedy, auto or chainK with K in 2..{n_future}")


def main(_):
  params, args, prompts, source = load()
  max_new = 8 if _QUICK.value else _MAX_NEW.value
  repeats = 1 if _QUICK.value else _REPEATS.value
  schemes = ["greedy", "chain2"] if _QUICK.value else _SCHEMES.value
  kws = {s: scheme_kwargs(s, args.n_future) for s in schemes}
  tokens, lengths = decode.pad_prompts(prompts, max(map(len, prompts)))
  default = row_products.ROWS_UP_TO

  def run(setting, scheme):
    row_products.ROWS_UP_TO = SETTINGS[setting]
    try:
      out, timing = decode.run(params, args, tokens, lengths, max_new_tokens=max_new, eos_id=-1,
                               slots=_BATCH.value, **kws[scheme])
    finally:
      row_products.ROWS_UP_TO = default
    return out, timing

  t0 = time.time()
  outputs, walls, forwards = {}, {}, {}
  for setting in SETTINGS:          # compile (and auto's cost timing) once per setting and scheme
    for scheme in kws:
      out, _ = run(setting, scheme)
      outputs[setting, scheme] = np.asarray(out.tokens)
      forwards[setting, scheme] = float(np.sum(out.lengths) / np.sum(out.forwards))
      walls[setting, scheme] = []
  for _ in range(repeats):
    for scheme in kws:
      for setting in SETTINGS:
        walls[setting, scheme].append(run(setting, scheme)[1]["wall_s"])
  reference = outputs["off", "greedy"]
  identical = {k: bool(np.array_equal(v, reference)) for k, v in outputs.items()}
  med = {k: float(np.median(v)) for k, v in walls.items()}
  n_tokens = len(prompts) * max_new
  device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
  if jax.devices()[0].platform == "cpu":
    device += f" ({cpu_model()})"
  rows = []
  for scheme in kws:
    rows.append({"scheme": scheme, "tokens_per_forward": forwards["on", scheme],
                 **{f"{s}_tokens_per_s": n_tokens / med[s, scheme] for s in SETTINGS},
                 **{f"{s}_speedup": med[s, "greedy"] / med[s, scheme] for s in SETTINGS if "greedy" in kws},
                 "on_over_off": med["off", scheme] / med["on", scheme],
                 "identical": identical["on", scheme] and identical["off", scheme]})
  wall = time.time() - t0
  lines = ["# A few rows' products as one matrix-vector product per row: on and off, side by side", "",
           f"{device}; weights: {source}; {len(prompts)} prompts of {len(prompts[0])} tokens, {max_new} new "
           f"tokens each (EOS off), batch {_BATCH.value}; medians of {repeats} timed runs per setting, the "
           f"settings alternating. off: every product over 2+ rows one GEMM; on: 2..{default} rows one "
           "matrix-vector product per row (mtp_jax/row_products.py). Speedup: over the same setting's greedy.", "",
           "| scheme | tokens per forward | off tokens/s | on tokens/s | off speedup | on speedup | on / off | "
           "identical to greedy |", "|---|---:|---:|---:|---:|---:|---:|---|"]
  for r in rows:
    lines.append(f"| {r['scheme']} | {r['tokens_per_forward']:.2f} | {r['off_tokens_per_s']:,.0f} | "
                 f"{r['on_tokens_per_s']:,.0f} | {r.get('off_speedup', float('nan')):.2f}x | "
                 f"{r.get('on_speedup', float('nan')):.2f}x | {r['on_over_off']:.2f} | "
                 f"{'yes' if r['identical'] else 'NO'} |")
  command = " ".join(["python experiments/speed/row_products.py", *sys.argv[1:]])
  lines += ["", f"Wall time {wall:.0f} s.", "", f"Command: `{command}`"]
  result = {"device": device, "weights": source, "prompts": len(prompts), "max_new_tokens": max_new,
            "batch_size": _BATCH.value, "repeats": repeats, "rows": rows, "walls": {f"{k[0]}/{k[1]}": v
                                                                                   for k, v in walls.items()},
            "all_identical": all(identical.values()), "wall_s": wall}
  write_results(_OUT.value or ("row_products_quick" if _QUICK.value else "row_products"), result, lines,
                _OUT_DIR.value)
  print("\n".join(lines))
  if not result["all_identical"]:
    sys.exit(1)


if __name__ == "__main__":
  cli.run(main)
