"""The library's import graph: no cycles, and none of the arrows DESIGN.md forbids.

Parsed with `ast`, not imported, so an import hidden inside a function counts as much as one at the top of a
module: a loop that only closes at call time is still a loop. Every form is read: `import mtp_jax.x`,
`from mtp_jax import x`, `from mtp_jax.x import y` (y a submodule or a name) and relative imports.
"""
import ast
import pathlib

from helpers import ROOT

PACKAGE = pathlib.Path(ROOT) / "mtp_jax"

# (importer, imported): no module under the first may reach one under the second, directly or through others.
FORBIDDEN = [
    ("mtp_jax.model", "mtp_jax.step"), ("mtp_jax.model", "mtp_jax.train"), ("mtp_jax.model", "mtp_jax.data"),
    ("mtp_jax.attention", "mtp_jax.step"), ("mtp_jax.loss", "mtp_jax.train"), ("mtp_jax.loss", "mtp_jax.data"),
    ("mtp_jax.data", "mtp_jax.model"), ("mtp_jax.data", "mtp_jax.prepare"), ("mtp_jax.data", "mtp_jax.shards.pipeline"),
    ("mtp_jax.decode", "mtp_jax.train"), ("mtp_jax.decode", "mtp_jax.step"), ("mtp_jax.decode", "mtp_jax.data"),
    ("mtp_jax.sharding", "mtp_jax.step"), ("mtp_jax.sharding", "mtp_jax.model"),
    ("mtp_jax.config", "mtp_jax.sharding"),
    ("mtp_jax.checkpoint", "mtp_jax.interop"), ("mtp_jax.workdir", "mtp_jax.interop"),
    ("mtp_jax.interop", "mtp_jax.step"), ("mtp_jax.interop", "mtp_jax.train"),
]


def modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


def _known(name: str, mods) -> str | None:
  """The module `name` is, or the innermost package or module holding it (a name imported from it)."""
  while name and name not in mods:
    name = name.rpartition(".")[0]
  return name or None


def imports_of(name: str, path: pathlib.Path, mods) -> dict[str, int]:
  """{imported mtp_jax module: first line} for every import statement in the file, at any depth."""
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  found = {}
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    targets = []
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
      else:
        source = node.module or ""
      targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in mods else source for a in node.names]
    for t in targets:
      t = _known(t, mods) if t.split(".")[0] == "mtp_jax" else None
      if t and t != name:
        found.setdefault(t, node.lineno)
  return found


def graph():
  mods = modules()
  return {m: imports_of(m, p, mods) for m, p in mods.items()}, mods


def find_cycle(edges) -> list[str] | None:
  """One import cycle as [a, b, ..., a], or None."""
  state, stack = {}, []

  def visit(v):
    state[v] = "open"
    stack.append(v)
    for w in sorted(edges.get(v, ())):
      if state.get(w) == "open":
        return stack[stack.index(w):] + [w]
      if w not in state:
        cycle = visit(w)
        if cycle:
          return cycle
    stack.pop()
    state[v] = "done"
    return None

  for v in sorted(edges):
    if v not in state:
      cycle = visit(v)
      if cycle:
        return cycle
  return None


def _under(module: str, prefix: str) -> bool:
  return module == prefix or module.startswith(prefix + ".")


def test_the_parser_sees_every_import_form(tmp_path):
  mods = {"mtp_jax", "mtp_jax.a", "mtp_jax.b", "mtp_jax.pkg", "mtp_jax.pkg.c", "mtp_jax.pkg.d", "mtp_jax.e"}
  source = tmp_path / "d.py"
  source.write_text("import mtp_jax.a\nfrom mtp_jax import b\nfrom mtp_jax.pkg.c import NAME\n"
                    "def f():\n  from . import c as x\n  from ..e import y\n")
  assert set(imports_of("mtp_jax.pkg.d", source, mods)) == {"mtp_jax.a", "mtp_jax.b", "mtp_jax.pkg.c", "mtp_jax.e"}
  assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b": 1}, "b": {}}) is None


def test_no_import_cycles():
  edges, mods = graph()
  assert len(mods) > 30
  cycle = find_cycle(edges)
  if cycle:
    where = [f"{a} -> {b} ({mods[a].relative_to(PACKAGE.parent)}:{edges[a][b]})" for a, b in zip(cycle, cycle[1:])]
    raise AssertionError("import cycle: " + " -> ".join(cycle) + "\n  " + "\n  ".join(where))


def test_no_forbidden_arrows():
  edges, mods = graph()
  wrong = []
  for src, dst in FORBIDDEN:
    for start in (m for m in mods if _under(m, src)):
      seen, todo, via = {start}, [start], {}
      while todo:
        v = todo.pop()
        for w in edges[v]:
          if w not in seen:
            seen.add(w)
            via[w] = v
            todo.append(w)
      for reached in sorted(m for m in seen if _under(m, dst)):
        chain = [reached]
        while chain[-1] != start:
          chain.append(via[chain[-1]])
        wrong.append(" -> ".join(reversed(chain)))
  assert not wrong, "forbidden imports (DESIGN.md, 'the arrows that must never exist'):\n  " + "\n  ".join(wrong)
