"""The one exception type for a user's mistake (bad flag, data, checkpoint, prompt).

Entry points print its message as one line and exit with status 2; everything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
  """Bad input from the user; the message names the problem and the fix."""
