"""Tokenize a corpus once into sharded ArrayRecord files, with Apache Beam:

    python -m mtp_jax.prepare --config=configs/tiny.py --config.data.source=jsonl \
        --config.data.path='gs://BUCKET/corpus/*.jsonl.zst' --output=gs://BUCKET/prepared [BEAM OPTIONS]

Then train with --config.data.source=prepared --config.data.path=gs://BUCKET/prepared. Without
Beam options the local DirectRunner runs several worker processes; `--runner=DataflowRunner
--project=P --region=R --temp_location=gs://BUCKET/tmp` (or Flink / Spark) runs the same pipeline
on a cluster. The pipeline lives in mtp_jax/shards/pipeline.py.
"""
import json

from absl import flags
from ml_collections import config_flags

from mtp_jax.errors import UserError, exit_with, run_cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file (its data and tokenizer fields are used).",
                                          lock_config=True)
_OUTPUT = flags.DEFINE_string("output", None, "New directory or bucket URL for the shards.")


def main(argv):
  from mtp_jax.config import validate
  from mtp_jax.shards.pipeline import prepare
  if _CONFIG.value is None or not _OUTPUT.value:
    raise UserError("need --config=configs/<recipe>.py and --output=<new directory or gs:// URL>")
  validate(_CONFIG.value)
  meta = prepare(_CONFIG.value, _OUTPUT.value, argv[1:])
  print(json.dumps({k: meta[k] for k in ("splits", "files", "skipped", "empty", "bad_records", "seconds")}))


def parse_flags(argv):
  """absl's flags first; everything it does not know is a Beam pipeline option. A bad --config... is one line."""
  try:
    rest = flags.FLAGS(argv, known_only=True)
    if _CONFIG.value is not None:
      _CONFIG.value.keys()   # the config file loads lazily: make a broken one fail here
    return rest
  except (flags.Error, OSError, AttributeError, KeyError, TypeError, ValueError) as e:
    lines = [l.strip() for l in str(e).replace("\\n", "\n").splitlines() if l.strip()]
    exit_with(f"cannot apply the flags: {(lines or [type(e).__name__])[-1]}")


if __name__ == "__main__":
  run_cli(main, parse_flags)
