"""Tokens/s of `prepare` (Beam, N worker processes) beside the single-process cache, one run, same corpus.

    nice -n 10 python experiments/speed/prepare_bench.py [--workers=2] [--vocab=2048] [--source=stdlib]

Both paths tokenize the same corpus with the same sentencepiece model (trained once beforehand on a
sample, outside the timings) and write their outputs to fresh temporary directories; the script
checks that both hold the same number of tokens and writes experiments/speed/results/prepare_bench.{json,md}.
"""
import os
import shutil
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # experiments/, for common/

from common.results_io import write_results  # noqa: E402
from mtp_jax import corpora, data  # noqa: E402
from mtp_jax import tokenizer as tokenizer_lib  # noqa: E402
from mtp_jax.config import base_config  # noqa: E402
from mtp_jax.shards import pipeline  # noqa: E402


def define_flags():
  """The flags (defined when run as a script, so tests can import this module)."""
  flags.DEFINE_integer("workers", 2, "Beam worker processes")
  flags.DEFINE_integer("vocab", 2048, "sentencepiece vocabulary size")
  flags.DEFINE_string("source", "stdlib", "corpus source (mtp_jax.corpora)")
  flags.DEFINE_string("path", "", "corpus path, for sources that read one")
  flags.DEFINE_integer("shards", 16, "prepare's output shards")


def main(_):
  args = flags.FLAGS
  tmp = tempfile.mkdtemp(prefix="prepare-bench-")
  try:
    c = base_config()
    c.data.source, c.data.path, c.model.vocab_size = args.source, args.path, args.vocab
    c.data.cache_dir, c.data.prepare_shards = os.path.join(tmp, "cache"), args.shards
    files = corpora.list_files(c.data)
    tok = tokenizer_lib.train_sentencepiece(pipeline.sample_texts(c.data, files, 20_000), args.vocab)
    model = os.path.join(tmp, "bench.model")
    with open(model, "wb") as f:
      f.write(tok.proto)
    c.data.tokenizer = model

    start = time.time()
    corpus = data.Corpus(c.data)
    splits, _ = data.tokenize_corpus(corpus, tokenizer_lib.for_config(c), c)
    single_s = time.time() - start
    single_tokens = sum(len(s) for s in splits.values())

    start = time.time()
    meta = pipeline.prepare(c, os.path.join(tmp, "prepared"),
                            [f"--direct_num_workers={args.workers}", "--direct_running_mode=multi_processing"])
    beam_s = time.time() - start
    beam_tokens = sum(s["tokens"] for s in meta["splits"].values())
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  assert beam_tokens == single_tokens, (beam_tokens, single_tokens)
  result = {"source": args.source, "path": args.path, "files": len(files), "vocab": args.vocab,
            "workers": args.workers, "shards": args.shards, "cpus": os.cpu_count(), "tokens": single_tokens,
            "single_process_s": round(single_s, 2), "prepare_s": round(beam_s, 2),
            "single_process_tokens_per_s": round(single_tokens / single_s),
            "prepare_tokens_per_s": round(beam_tokens / beam_s)}
  cmd = f"nice -n 10 python experiments/speed/prepare_bench.py --workers={args.workers} --vocab={args.vocab} " \
        f"--source={args.source}" + (f" --path='{args.path}'" if args.path else "")
  lines = [f"# prepare vs the single-process token cache ({args.source}, {len(files)} files, "
           f"{single_tokens:,} tokens, sentencepiece {args.vocab})", "",
           f"Command: `{cmd}` on {os.cpu_count()} CPU cores (shared with other jobs while it ran).", "",
           "| path | seconds | tokens/s |", "|---|---:|---:|",
           f"| single process (data.tokenize_corpus) | {single_s:.1f} | {result['single_process_tokens_per_s']:,} |",
           f"| prepare, Beam FnApiRunner, {args.workers} worker processes | {beam_s:.1f} | "
           f"{result['prepare_tokens_per_s']:,} |", "",
           "prepare's time includes starting the Beam workers and writing ArrayRecord shards + index files; "
           "both hold the same token count (checked)."]
  write_results("prepare_bench", result, lines)


if __name__ == "__main__":
  define_flags()
  app.run(main)
