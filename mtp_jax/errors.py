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


_in_cli = False


def in_cli() -> bool:
  """Whether run_cli is running this process's command (a library call may not end the process)."""
  return _in_cli


def exit_with(message: str, now: bool = False):
  """End a command-line program the way every user mistake ends: one `error:` line, status 2. `now`: at
  once, without joining other threads (those still waiting on an object store that stopped answering)."""
  import os
  import sys
  from absl import logging
  logging.flush()
  message = " ".join(str(message).split())   # one line, whatever the message held
  print(f"error: {message}", file=sys.stderr, flush=True)
  if now:
    sys.stdout.flush()
    os._exit(2)
  sys.exit(2)


def describe_os_error(e: OSError) -> str:
  where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f)
  return f"{where + ': ' if where else ''}{e.strerror or e}; check that path (it must exist and be writable)"


def run_cli(main, flags_parser):
  """absl's app.run, with every expected failure (UserError, OSError on a user's path) as one `error:` line
  and exit status 2 instead of a traceback. flags_parser may raise UserError too.

  Libraries' INFO lines (orbax per checkpoint, jax probing for a TPU on a CPU machine) show only when
  --verbosity (or -v) asks for them; warnings and the command's own output always do."""
  from absl import app
  _help_for_console_script(main)

  def parse(argv):
    try:
      rest = flags_parser(argv)
    except SystemExit as e:   # absl ends --help with status 1; asking for help is not a failure
      asked = {"--help", "-help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml"} & set(argv[1:])
      raise SystemExit(0 if asked and e.code == 1 else e.code)
    _quiet_unless_asked()
    return rest

  global _in_cli
  _in_cli = True
  try:
    app.run(main, flags_parser=parse)
  except UserError as e:
    exit_with(str(e), now=getattr(e, "abandons_io", False))
  except OSError as e:
    if e.errno not in _ENVIRONMENT_ERRNOS:
      raise
    exit_with(describe_os_error(e))


def _quiet_unless_asked() -> None:
  from absl import flags, logging
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def _help_for_console_script(main) -> None:
  """Run as a console script (mtp-jax-train), `__main__` is pip's stub: give --help the command's own
  docstring and list its flags, as `python -m mtp_jax.main --help` does."""
  import sys
  from absl import flags
  module, stub = sys.modules.get(main.__module__), sys.modules.get("__main__")
  if module is None or stub is None or module is stub:
    return
  if not stub.__doc__:
    stub.__doc__ = module.__doc__
  for flag in flags.FLAGS.flags_by_module_dict().get(main.__module__, []):
    flags.FLAGS.register_flag_by_module(sys.argv[0], flag)


def require(module: str, extra: str, what: str):
  """`module`, imported; if it is not installed, a UserError naming the extra that installs it, so a missing
  optional dependency is one line (`pip install 'mtp_jax[pods]'`), not an ImportError's traceback."""
  import importlib
  try:
    return importlib.import_module(module)
  except ImportError as e:
    missing = (e.name or module).split(".")[0]
    raise UserError(f"{what} needs {missing}, which is not installed; install it with: "
                    f"pip install 'mtp_jax[{extra}]'") from None


def no_positional_args(argv) -> None:
  """absl passes unparsed words through; a stray one (a typo'd flag without --) must not be ignored."""
  if len(argv) > 1:
    raise UserError(f"unexpected argument {argv[1]!r}: every setting is a flag, --name=value")
