"""How an experiment script ends on bad input: one `error:` line and exit status 2 (mtp_jax.errors.exit_with)."""


def run(main):
  """absl's app.run, with a UserError (a bad flag, a workdir without a checkpoint, too few prompts, ...) as one
  `error:` line and status 2 instead of a traceback. Unlike mtp_jax.errors.run_cli it leaves logging as absl
  sets it."""
  from absl import app
  from mtp_jax.errors import UserError, exit_with
  try:
    app.run(main)
  except UserError as e:
    exit_with(str(e))
