"""Trainer entry point: `mtp-jax-train --config=default --workdir=W [--dry_run]` (or `python -m mtp_jax.main`).

--config names an installed recipe (tiny, default, paper_7b, imported) or a recipe file such as
configs/default.py; a variant follows a colon (`--config=default:n1`). Override any config field with
`--config.a.b=value`. Everything else lives in library functions a notebook can call.
"""
from absl import flags
from ml_collections import config_flags

from mtp_jax.config import parse_cli_flags, validate
from mtp_jax.errors import UserError, no_positional_args, run_cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe: a name such as tiny or default:n1 (the "
                                          "installed recipes), or a file such as configs/default.py[:variant].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: config, metrics, checkpoints.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Compile the train step on abstract shapes, report "
                             "parameters, FLOPs and memory to WORKDIR/dry_run.json, and exit.")


def main(argv):
  no_positional_args(argv)
  config = _CONFIG.value
  if config is None or not _WORKDIR.value:
    raise UserError("need --config=<recipe name or file> (e.g. --config=tiny) and --workdir=<run directory>")
  if _DRY_RUN.value:
    from mtp_jax.dry_run import plan_memory_like_an_accelerator
    plan_memory_like_an_accelerator()   # before anything (validate included) starts jax's backend
  else:
    from mtp_jax.cpu_flags import use_training_fusions
    use_training_fusions()              # likewise before the backend starts (cpu_flags.py: why, and measured)
  validate(config)
  from mtp_jax import workdir as workdir_lib
  from mtp_jax.train import train_and_evaluate
  workdir = workdir_lib.check_path(_WORKDIR.value)   # before any compile; expands ~
  if _DRY_RUN.value:
    from mtp_jax.dry_run import dry_run
    dry_run(config, str(workdir))
    return
  from mtp_jax.sharding import maybe_initialize_distributed
  maybe_initialize_distributed()   # before anything asks jax for devices
  train_and_evaluate(config, workdir)


def parse_flags(argv):
  """absl's parser with --config=NAME[:variant] resolved; every mistake in the flags is one line."""
  return parse_cli_flags(argv, _CONFIG)


def run():
  run_cli(main, parse_flags)


if __name__ == "__main__":
  run()
