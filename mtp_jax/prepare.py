r"""Tokenize a corpus once into sharded ArrayRecord files, with Apache Beam (`pip install 'mtp_jax[pods]'`):

    mtp-jax-prepare --config=tiny --config.data.source=jsonl \
        --config.data.path='gs://BUCKET/corpus/*.jsonl.zst' --output=gs://BUCKET/prepared [BEAM OPTIONS]

Then train with --config.data.source=prepared --config.data.path=gs://BUCKET/prepared. Without
Beam options the local DirectRunner runs several worker processes; `--runner=DataflowRunner
--project=P --region=R --temp_location=gs://BUCKET/tmp` (or Flink / Spark) runs the same pipeline
on a cluster. The pipeline lives in mtp_jax/shards/pipeline.py.
"""
import json
import logging as std_logging

from absl import flags
from ml_collections import config_flags

from mtp_jax.errors import UserError, run_cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe name or file, e.g. tiny or configs/tiny.py (its data "
                                          "and tokenizer fields are used).",
                                          lock_config=True)
_OUTPUT = flags.DEFINE_string("output", None, "New directory or bucket URL for the shards.")


def main(argv):
  from mtp_jax.config import validate
  from mtp_jax.errors import require
  if not flags.FLAGS["verbosity"].present:
    from absl import logging
    logging.get_absl_handler().addFilter(_QuietBeam())
  require("apache_beam", "pods", "mtp-jax-prepare")
  from mtp_jax.shards.pipeline import prepare
  if _CONFIG.value is None or not _OUTPUT.value:
    raise UserError("need --config=<recipe name or file> and --output=<new directory or gs:// URL>")
  validate(_CONFIG.value)
  meta = prepare(_CONFIG.value, _OUTPUT.value, argv[1:])
  print(json.dumps({k: meta[k] for k in ("splits", "files", "skipped", "empty", "bad_records", "seconds")}))


class _QuietBeam(std_logging.Filter):
  """Beam warns, at import and per run, about clients a local pipeline does not use (BigQuery's apitools,
  ...); its errors, and everything with --verbosity, still show."""

  def filter(self, record):
    return record.levelno >= std_logging.ERROR or "/apache_beam/" not in record.pathname


def parse_flags(argv):
  """absl's flags first; everything it does not know is a Beam pipeline option. A bad --config... is one line."""
  from mtp_jax.config import parse_cli_flags
  return parse_cli_flags(argv, _CONFIG, known_only=True)


def run():
  run_cli(main, parse_flags)


if __name__ == "__main__":
  run()
