"""Fresh virtual environments holding mtp_jax as `pip install` puts it there, without downloading its
dependencies again.

The package is built into a wheel and pip-installed with `--no-index`. Its dependencies come from this
interpreter's environment, but only those the wheel's metadata asks for: each one's files (by its
RECORD), with those of everything it requires in turn, are linked into a directory that a .pth file puts
on the new environment's path. A dependency the metadata forgets is therefore missing there, as it
would be on a user's machine, and so is every optional extra that was not asked for: a test can check
what a user without `[pods]` sees.
"""
from __future__ import annotations

import email.parser
import importlib.metadata as md
import os
import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _key(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def source_copy(dst: pathlib.Path) -> pathlib.Path:
  """The clone's files as a fresh clone has them (git's tracked and not-ignored files), copied to `dst`: a
  build from the clone itself would reuse its build/ directory, where files deleted since linger."""
  listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                          capture_output=True, timeout=60)
  if listed.returncode != 0:   # not a git checkout: everything but what builds and runs leave behind
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "workdirs",
                                                             "__pycache__"))
    return dst
  for name in filter(None, listed.stdout.decode().split("\0")):
    src = ROOT / name
    if src.is_file():
      (dst / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(src, dst / name)
  return dst


def build_wheel(out: pathlib.Path) -> pathlib.Path:
  """The clone built into a wheel in `out` (pip's isolated build fetches setuptools once, then caches it)."""
  src = source_copy(out.parent / "source")
  r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  return next(out.glob("mtp_jax-*.whl"))


def wheel_requirements(wheel: pathlib.Path, extras: tuple[str, ...] = ()) -> list[Requirement]:
  """The wheel's Requires-Dist that apply with `extras` (and always the unconditional ones)."""
  with zipfile.ZipFile(wheel) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    message = email.parser.Parser().parsestr(z.read(meta).decode())
  out = []
  for line in message.get_all("Requires-Dist") or []:
    req = Requirement(line)
    if req.marker is None or any(req.marker.evaluate({**default_environment(), "extra": e}) for e in extras):
      out.append(req)
  return out


def closure(requirements: list[Requirement]) -> dict[str, md.Distribution]:
  """The installed distributions that `requirements` need, transitively, by normalised name.

  Raises LookupError naming a requirement this environment does not have installed."""
  found: dict[str, md.Distribution] = {}
  extras_seen: dict[str, set] = {}
  todo = list(requirements)
  while todo:
    req = todo.pop()
    key = _key(req.name)
    if key in found and set(req.extras) <= extras_seen[key]:
      continue
    try:
      dist = found.get(key) or md.distribution(req.name)
    except md.PackageNotFoundError:
      raise LookupError(req.name)
    found[key] = dist
    extras_seen[key] = extras_seen.get(key, set()) | set(req.extras)
    for line in dist.requires or []:
      sub = Requirement(line)
      if sub.marker is None or any(sub.marker.evaluate({**default_environment(), "extra": e})
                                   for e in [""] + sorted(extras_seen[key])):
        todo.append(sub)
  return found


def link_view(dists, dst: pathlib.Path) -> pathlib.Path:
  """A directory holding symbolic links to every installed file of `dists` (scripts outside site-packages
  left out), laid out as in site-packages."""
  dst.mkdir(parents=True, exist_ok=True)
  for dist in dists:
    for f in dist.files or []:
      if f.parts[0] == ".." or f.suffix == ".pyc":
        continue
      src = pathlib.Path(dist.locate_file(f))
      target = dst / f
      if not src.exists() or target.exists():
        continue
      target.parent.mkdir(parents=True, exist_ok=True)
      os.symlink(src, target)
  return dst


def make_venv(path: pathlib.Path, views: list[pathlib.Path]) -> pathlib.Path:
  """A new virtual environment at `path` whose path also holds `views`; returns its python."""
  subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=300)
  py = path / "bin" / "python"
  (purelib_of(py) / "mtp_jax_test_views.pth").write_text("".join(f"{v}\n" for v in views))
  return py


def pip_install(py: pathlib.Path, wheel_dir: pathlib.Path, spec: str) -> subprocess.CompletedProcess:
  """`pip install spec` from the built wheel only: everything else must already be on the path."""
  return subprocess.run([py, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheel_dir), spec],
                        capture_output=True, text=True, timeout=600)


def clean_env(venv: pathlib.Path, **extra) -> dict:
  """This process's environment without a PYTHONPATH that would reach the clone, with the venv's bin first."""
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
  env.update(extra)
  return env


def purelib_of(py: pathlib.Path) -> pathlib.Path:
  out = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       capture_output=True, text=True, check=True).stdout.strip()
  return pathlib.Path(out)
