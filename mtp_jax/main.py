"""Trainer entry point: `python -m mtp_jax.main --config=configs/default.py --workdir=W [--dry_run]`.

Override any config field with `--config.a.b=value`; pass a recipe variant with
`--config=configs/x.py:variant`. Everything else lives in library functions a notebook can call.
"""
from absl import flags
from ml_collections import config_flags

from mtp_jax.config import validate
from mtp_jax.errors import UserError, no_positional_args, run_cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file, e.g. configs/default.py[:variant].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: config, metrics, checkpoints.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Compile the train step on abstract shapes, report "
                             "parameters, FLOPs and memory to WORKDIR/dry_run.json, and exit.")


def main(argv):
  no_positional_args(argv)
  config = _CONFIG.value
  if config is None or not _WORKDIR.value:
    raise UserError("need --config=configs/<recipe>.py and --workdir=<run directory>")
  if _DRY_RUN.value:
    from mtp_jax.dry_run import plan_memory_like_an_accelerator
    plan_memory_like_an_accelerator()   # before anything (validate included) starts jax's backend
  else:
    from mtp_jax.cpu_flags import use_training_fusions
    use_training_fusions()              # likewise before the backend starts (cpu_flags.py: why, and measured)
  validate(config)
  from mtp_jax.train import check_workdir_path, train_and_evaluate
  workdir = check_workdir_path(_WORKDIR.value)   # before any compile; expands ~
  if _DRY_RUN.value:
    from mtp_jax.dry_run import dry_run
    dry_run(config, str(workdir))
    return
  from mtp_jax.sharding import maybe_initialize_distributed
  maybe_initialize_distributed()   # before anything asks jax for devices
  train_and_evaluate(config, workdir)


def parse_flags(argv):
  """absl's parser, but a bad `--config...` (missing file, typo, wrong type) is one line, not a traceback."""
  try:
    rest = flags.FLAGS(argv)
    if _CONFIG.value is not None:
      _CONFIG.value.keys()  # the config file loads lazily: make a missing or broken one fail here
    return rest
  except (flags.Error, OSError, AttributeError, KeyError, TypeError, ValueError) as e:
    lines = [l.strip() for l in str(e).replace("\\n", "\n").splitlines() if l.strip()]
    detail = " ".join(lines[-3:] if isinstance(e, OSError) else lines[-1:]).strip("'\"")
    bad = [a.split("=")[0] for a in argv[1:] if a.startswith("--config")]
    raise UserError(f"cannot apply {' '.join(bad) or 'the flags'}: {detail}")


def run():
  run_cli(main, parse_flags)


if __name__ == "__main__":
  run()
