"""The one exception type for a user's mistake (bad flag, data, checkpoint, prompt).

Entry points print its message as one line and exit with status 2; everything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
  """Bad input from the user; the message names the problem and the fix."""


def exit_with(message: str):
  """End a command-line program the way every user mistake ends: one `error:` line, status 2."""
  import sys
  from absl import logging
  logging.flush()
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def run_cli(main, flags_parser):
  """absl's app.run, with a UserError printed as one line and exit status 2 instead of a traceback."""
  from absl import app
  try:
    app.run(main, flags_parser=flags_parser)
  except UserError as e:
    exit_with(str(e))
