"""The one exception type for a user's mistake (bad flag, data, checkpoint, prompt), and the one place
that turns expected failures into one `error:` line and exit status 2.

Expected failures: a UserError (raised wherever input is checked), and an OSError on a path the user
gave (no permission, read-only or full disk, a file where a directory should be). Everything else is
a bug and keeps its traceback.
"""
import errno

# OSErrors that say something about the user's files or disk, not about the code.
_ENVIRONMENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR,
                       errno.EISDIR, errno.ENOENT, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP, errno.EIO}


class UserError(Exception):
  """Bad input from the user; the message names the problem and the fix."""


def exit_with(message: str):
  """End a command-line program the way every user mistake ends: one `error:` line, status 2."""
  import sys
  from absl import logging
  logging.flush()
  message = " ".join(str(message).split())   # one line, whatever the message held
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def describe_os_error(e: OSError) -> str:
  where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f)
  return f"{where + ': ' if where else ''}{e.strerror or e}; check that path (it must exist and be writable)"


def run_cli(main, flags_parser):
  """absl's app.run, with every expected failure (UserError, OSError on a user's path) as one `error:` line
  and exit status 2 instead of a traceback. flags_parser may raise UserError too."""
  from absl import app
  try:
    app.run(main, flags_parser=flags_parser)
  except UserError as e:
    exit_with(str(e))
  except OSError as e:
    if e.errno not in _ENVIRONMENT_ERRNOS:
      raise
    exit_with(describe_os_error(e))


def no_positional_args(argv) -> None:
  """absl passes unparsed words through; a stray one (a typo'd flag without --) must not be ignored."""
  if len(argv) > 1:
    raise UserError(f"unexpected argument {argv[1]!r}: every setting is a flag, --name=value")
