"""One path type for local and bucket paths: `io.path("~/runs/a")`, `io.path("gs://bucket/run")`.

`etils.epath` is what orbax itself uses: local paths are `pathlib.Path`s, gs:// (gcsfs) and s3://
(s3fs, when installed) go through fsspec. Writes are whole: on local disk a temporary file renamed
into place, on a bucket one object upload (GCS makes an object visible only once it is complete),
so a reader never sees half a file either way. Bucket failures (unreachable endpoint, missing
bucket, no credentials) become one-line UserErrors through `user_errors`; a store that does not answer at all
is found by mtp_jax.deadline's probes in seconds (gcsfs alone retries each call for about 35 s).
"""
from __future__ import annotations

import contextlib
import glob as globlib
import os
from typing import Iterator

from etils import epath

from mtp_jax import deadline
from mtp_jax.errors import UserError, require

Path = epath.Path
PathLike = epath.PathLike
_SCHEMES = ("gs://", "s3://")


def is_remote(p: PathLike) -> bool:
  return str(p).startswith(_SCHEMES)


def path(p: PathLike) -> Path:
  """The path `p` names: `~` expanded for local paths, bucket URLs kept as they are."""
  s = os.fspath(p) if not isinstance(p, str) else p
  if s.startswith("gs:/") and not s.startswith("gs://") or s.startswith("s3:/") and not s.startswith("s3://"):
    raise UserError(f"{s!r}: a bucket URL needs two slashes (gs://BUCKET/dir)")
  if s.startswith("gs://"):
    require("gcsfs", "pods", f"{s}: a gs:// path")
  return epath.Path(s) if is_remote(s) else epath.Path(os.path.expanduser(s))


def absolute(p: PathLike) -> Path:
  """Bucket paths as they are, local ones made absolute (orbax wants absolute paths)."""
  p = path(p)
  return p if is_remote(p) else Path(os.path.abspath(p))


def write_bytes(p: PathLike, data: bytes) -> None:
  """Write the whole file at once: readers see the old contents or the new, never a part."""
  p = path(p)
  if is_remote(p):
    p.write_bytes(data)   # one object upload: visible only when complete
    return
  p.parent.mkdir(parents=True, exist_ok=True)
  tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
  tmp.write_bytes(data)
  os.replace(tmp, p)


def write_text(p: PathLike, text: str) -> None:
  write_bytes(p, text.encode("utf-8"))


def upload(local: PathLike, dst: PathLike) -> None:
  """Copy a finished local file to `dst` (a bucket object or a local path), whole."""
  dst = path(dst)
  if is_remote(dst):
    fs, target = fsspec_of(dst)
    fs.put_file(os.fspath(local), target)
  else:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    Path(local).copy(tmp, overwrite=True)
    os.replace(tmp, dst)


def stage_in(src: PathLike, what: str) -> Path:
  """A local copy of the directory `src`: itself when local; a bucket directory is downloaded (file by
  file, to disk: never held in memory) into a fresh directory under ~/.cache/mtp_jax/staged."""
  if not is_remote(src):
    return path(src)
  import hashlib
  import shutil
  import tempfile
  check_bucket(src, what)
  fs, rel = fsspec_of(src)
  with user_errors(f"{what}={src}"):
    if not fs.isdir(rel):
      raise UserError(f"{what}={src}: no such directory on the bucket")
    root = Path(os.path.expanduser("~/.cache/mtp_jax/staged"))
    root.mkdir(parents=True, exist_ok=True)
    final = root / hashlib.sha256(str(src).rstrip("/").encode()).hexdigest()[:16]
    tmp = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    try:
      for remote in fs.find(rel):
        local = tmp / os.path.relpath(remote, rel.rstrip("/"))
        local.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(remote, os.fspath(local))
      if final.exists():
        shutil.rmtree(final)
      os.replace(tmp, final)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
  return final


def put_tree(local: PathLike, dst: PathLike, last: str | None = None) -> None:
  """Upload the local directory `local` under the bucket directory `dst`, the file named `last` (its
  marker of completeness, such as config.json) after every other; on failure the upload is removed."""
  import pathlib
  fs, rel = fsspec_of(dst)
  local = pathlib.Path(local)
  files = sorted((p for p in local.rglob("*") if p.is_file()), key=lambda p: p.name == last)
  try:
    for f in files:
      fs.put_file(os.fspath(f), f"{rel.rstrip('/')}/{f.relative_to(local).as_posix()}")
  except BaseException:
    with contextlib.suppress(Exception):
      fs.rm(rel, recursive=True)
    raise


def is_empty_dir(p: PathLike) -> bool:
  """True when nothing is at `p` or it is a directory (or bucket prefix) holding nothing."""
  p = path(p)
  if is_remote(p):
    fs, rel = fsspec_of(p)
    return not fs.exists(rel) or (fs.isdir(rel) and not fs.find(rel))
  return not p.exists() or (p.is_dir() and not any(p.iterdir()))


def require_new_dir(p: PathLike, what: str, verb: str = "write", error=UserError) -> Path:
  """`p` made absolute, or `error` when something is already there (on a bucket: reachable, checked first)."""
  if is_remote(p):
    check_bucket(p, what)
  with user_errors(f"{what}={p}"):
    empty = is_empty_dir(p)
  p = absolute(p)
  if not empty:
    raise error(f"{what}={p} is not empty; {verb} into a new directory (nothing was written)")
  return p


@contextlib.contextmanager
def new_dir(dst: PathLike, what: str, last: str | None = None) -> Iterator:
  """A local temporary directory to fill; when the block ends it becomes `dst` whole: renamed into place
  on local disk, or uploaded to a bucket with the file named `last` after every other (a failed upload is
  removed). On any error the temporary directory is deleted and `dst` is left as it was."""
  import pathlib
  import shutil
  import tempfile
  dst = absolute(dst)
  remote = is_remote(dst)
  if not remote:
    dst.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{dst.name}.new-", dir=None if remote else os.fspath(dst.parent)))
  try:
    yield tmp
    if remote:
      with user_errors(f"{what}={dst}"):
        put_tree(tmp, dst, last)
      shutil.rmtree(tmp)
    else:
      if dst.exists():
        dst.rmdir()        # empty (checked by the caller): rename needs the name free
      os.replace(tmp, dst)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def forget_listings(p: PathLike) -> None:
  """Drop the store client's cached listings under `p` (gcsfs caches directory listings), so that what is
  read next is what the store holds now; nothing to do on local disk."""
  if is_remote(p):
    fs, rel = fsspec_of(p)
    fs.invalidate_cache(rel)


def fsspec_of(p: PathLike):
  """(fsspec filesystem, path in it) for `p`; local paths get the local filesystem."""
  import fsspec
  return fsspec.core.url_to_fs(str(path(p)))


def glob(pattern: str) -> list[str]:
  """The files `pattern` matches, sorted (`**` recurses), as local paths or full bucket URLs."""
  if not is_remote(pattern):
    return sorted(p for p in globlib.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
  fs, rel = fsspec_of(pattern)
  scheme = pattern.split("://", 1)[0]
  hits = fs.glob(rel, detail=True) if any(c in rel for c in "*?[") else (
      {rel: fs.info(rel)} if fs.exists(rel) else {})
  return sorted(f"{scheme}://{k}" for k, v in hits.items() if v.get("type") == "file")


_COMPRESSED = {".gz": "gzip", ".zst": "zstandard", ".bz2": "bz2", ".xz": "lzma"}


def open_text(p: PathLike):
  """A text stream of `p`, decompressed by its suffix (.gz, .zst, .bz2, .xz), local or on a bucket. Bytes
  that are not UTF-8 arrive as lone surrogates (U+DC80..U+DCFF), never as U+FFFD: a reader can tell them
  from text, and skip what holds them."""
  if str(p).endswith(".zst"):
    require("zstandard", "pods", f"{p}: a .zst file")
  import fsspec
  from fsspec.utils import infer_compression
  suffix = os.path.splitext(str(p))[1].lower()
  compression = infer_compression(str(p))
  if suffix in _COMPRESSED and compression is None:
    # fsspec registers its codecs once, at its first import: one imported while the codec's package was
    # missing would read the compressed bytes as text, silently.
    raise UserError(f"{p}: fsspec has no {suffix} codec in this process (it was imported before "
                    f"{_COMPRESSED[suffix]} was installed); restart Python with {_COMPRESSED[suffix]} installed")
  return fsspec.open(str(path(p)), "rt", compression=compression, encoding="utf-8",
                     errors="surrogateescape").open()


def open_binary(p: PathLike):
  import fsspec
  return fsspec.open(str(path(p)), "rb").open()


def _describe(e: BaseException) -> str | None:
  """A bucket failure in words, or None when `e` is not one."""
  import importlib
  name = type(e).__name__
  text = str(e).strip().splitlines()[0][:200] if str(e).strip() else name
  auth = importlib.import_module("google.auth.exceptions") if _imported("google.auth") else None
  if auth is not None and isinstance(e, auth.GoogleAuthError):
    return f"no usable cloud credentials ({text}); run `gcloud auth application-default login` or set " \
           f"GOOGLE_APPLICATION_CREDENTIALS"
  code = getattr(e, "code", None)
  if code in (401, 403):
    return f"access denied ({text}); check the credentials and the bucket's permissions"
  if isinstance(e, (ConnectionError, TimeoutError)) or "ClientConnector" in name or "Connect" in name:
    return f"cannot reach the object store ({text}); check the network (and STORAGE_EMULATOR_HOST if set)"
  if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and ("gcsfs" in repr(type(e)) or code):
    return f"the object store refused the request ({text})"
  return None


def store_failure(e: BaseException) -> str | None:
  """`e` (or an exception it was raised from) as a bucket failure in words; None when it is none."""
  for _ in range(8):
    if e is None:
      return None
    message = _describe(e)
    if message is not None:
      return message
    e = e.__cause__ or e.__context__
  return None


def _imported(module: str) -> bool:
  import sys
  return module in sys.modules


@contextlib.contextmanager
def user_errors(what: str) -> Iterator[None]:
  """Turn a bucket failure inside the block into one UserError line about `what`.

  gcsfs logs each request that ran out of retries with a traceback; the error line says it instead.
  """
  import logging
  logger = logging.getLogger("gcsfs")
  level = logger.level
  logger.setLevel(logging.CRITICAL)
  try:
    yield
  except UserError:
    raise
  except Exception as e:
    message = _describe(e)
    if message is None:
      raise
    raise UserError(f"{what}: {message}") from e
  finally:
    logger.setLevel(level)


def check_bucket(p: PathLike, what: str) -> None:
  """Fail early, with one line, when `p` is on a bucket that is missing or cannot be reached."""
  if not is_remote(p):
    return
  deadline.check_reachable(p, what)   # seconds, not gcsfs's retries, for a store that does not answer at all
  fs, rel = fsspec_of(p)
  bucket = rel.split("/", 1)[0]
  with user_errors(f"{what}={p}"):
    try:
      found = fs.exists(bucket) if not hasattr(fs, "_info") else bool(fs.info(bucket))
    except FileNotFoundError:
      found = False
  if not found:
    raise UserError(f"{what}={p}: the bucket {bucket!r} does not exist (or these credentials cannot see it); "
                    f"create it (gcloud storage buckets create gs://{bucket}) or fix the URL")


def move_tree(src: PathLike, dst: PathLike) -> None:
  """Move a directory (a bucket "directory" is every object under its prefix: copied, then deleted)."""
  src, dst = path(src), path(dst)
  if not is_remote(src):
    import shutil
    if dst.exists():
      shutil.rmtree(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(src), str(dst))
    return
  fs, rel = fsspec_of(src)
  _, rel_dst = fsspec_of(dst)
  if fs.exists(rel_dst):
    fs.rm(rel_dst, recursive=True)
  fs.copy(rel, rel_dst, recursive=True)
  fs.rm(rel, recursive=True)


# ----- one training run per workdir -----

LOCK = ".lock"
LEASE_SECONDS = 60.0   # a bucket lease not renewed for this long is stale (renewed every third of it)


class _LocalLock:
  """W/.lock held with flock: the OS drops it when the process dies, even on SIGKILL."""

  def __init__(self, workdir: Path):
    import fcntl
    workdir.mkdir(parents=True, exist_ok=True)
    self.file = open(workdir / LOCK, "a")
    try:
      fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self.file.close()
      raise UserError(f"{workdir} is in use by another training run; wait for it or stop it, or use another --workdir")

  def close(self):
    self.file.close()


class _BucketLease:
  """W/.lock on a bucket: an object a run creates only if absent (ifGenerationMatch=0), renews every
  LEASE_SECONDS/3 with ifGenerationMatch=<its generation>, and deletes at exit. A bucket has no flock and
  nothing drops a lease when its holder dies, so a lease counts as stale once it is LEASE_SECONDS old, or
  at once when it names a process of this machine that is gone (a SIGKILLed run resumed on its own host).
  A stale lease is taken over with ifGenerationMatch=<the stale generation>, so of two racing runs one wins."""

  def __init__(self, workdir: Path):
    import json
    import socket
    import threading
    require("google.cloud.storage", "pods", f"--workdir={workdir}: a gs:// workdir")
    from google.api_core import exceptions
    from google.cloud import storage
    self.workdir, self._exceptions = workdir, exceptions
    bucket, _, prefix = str(workdir)[len("gs://"):].partition("/")
    self.blob = storage.Client().bucket(bucket).blob(f"{prefix.rstrip('/')}/{LOCK}".lstrip("/"))
    self.me = {"host": socket.gethostname(), "pid": os.getpid()}
    self.json = json
    with user_errors(f"--workdir={workdir}"):
      match = 0
      if self.blob.exists():
        self.blob.reload()
        held = json.loads(self.blob.download_as_bytes(if_generation_match=self.blob.generation))
        if not self._stale(held):
          raise UserError(f"{workdir} is in use by another training run ({held['host']}, pid {held['pid']}; "
                          f"its lease is renewed every {LEASE_SECONDS / 3:.0f}s); wait for it or stop it, or use "
                          f"another --workdir")
        match = self.blob.generation
      self.generation = self._write(match)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._renew, daemon=True)
    self._thread.start()

  def _stale(self, held: dict) -> bool:
    import time
    if held.get("host") == self.me["host"]:
      try:
        os.kill(int(held["pid"]), 0)
      except ProcessLookupError:
        return True
      except (PermissionError, ValueError, KeyError):
        pass
    return time.time() - float(held.get("renewed", 0)) > LEASE_SECONDS

  def _write(self, match: int) -> int:
    import time
    try:
      self.blob.upload_from_string(self.json.dumps({**self.me, "renewed": time.time()}), if_generation_match=match)
    except self._exceptions.PreconditionFailed:
      raise UserError(f"{self.workdir} was just claimed by another training run; use another --workdir")
    return self.blob.generation

  def _renew(self):
    while not self._stop.wait(LEASE_SECONDS / 3):
      try:
        self.generation = self._write(self.generation)
      except Exception:  # a lost lease or a network blip: the next renewal tries again
        pass

  def close(self):
    self._stop.set()
    if deadline.given_up():   # the store stopped answering: the lease goes stale on its own
      return
    self._thread.join()
    try:
      self.blob.delete(if_generation_match=self.generation)
    except Exception:
      pass


def lock_workdir(workdir: PathLike):
  """Hold the workdir for this run (keep the result; `.close()` at exit): two runs in one workdir would
  interleave metrics and checkpoints."""
  workdir = path(workdir)
  if str(workdir).startswith("gs://"):
    return _BucketLease(workdir)
  if is_remote(workdir):
    raise UserError(f"--workdir={workdir}: only local and gs:// workdirs can be locked against a second run")
  return _LocalLock(workdir)
