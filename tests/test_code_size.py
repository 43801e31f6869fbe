"""Every library file stays readable in one sitting: no mtp_jax file over 450 lines, no function over 80.

Measured with `ast` (a function's lines run from its first decorator to its last line), so the check is fast
and needs nothing imported. A file or function that grows past a limit is split by concern, not exempted.
"""
import ast
import pathlib

from helpers import ROOT

PACKAGE = pathlib.Path(ROOT) / "mtp_jax"
MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 80


def _sources():
  return sorted(PACKAGE.rglob("*.py"))


def test_no_file_over_the_limit():
  long = [f"{p.relative_to(PACKAGE.parent)}: {n} lines" for p in _sources()
          if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES]
  assert not long, f"over {MAX_FILE_LINES} lines (split by concern):\n  " + "\n  ".join(long)


def test_no_function_over_the_limit():
  long = []
  for p in _sources():
    for node in ast.walk(ast.parse(p.read_text(), str(p))):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        if (n := node.end_lineno - start + 1) > MAX_FUNCTION_LINES:
          long.append(f"{p.relative_to(PACKAGE.parent)}:{start} {node.name}: {n} lines")
  assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n  " + "\n  ".join(long)
