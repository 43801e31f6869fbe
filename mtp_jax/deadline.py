"""A deadline on the object store, because a bucket that stops answering must end a run with one line.

The clients under a bucket run retry on their own clocks: gcsfs six times over about 35 s per call,
tensorstore (orbax's array writer) up to 32 times with up to 32 s between tries, google-cloud-storage (the
workdir lease) for 120 s. The trainer's main thread waits on them without a bound, and a SIGTERM that arrives
meanwhile waits too. So the store itself is watched, not each call:

- `check_reachable(url)` (through io.check_bucket, before anything starts): every endpoint the clients of a
  gs:// path use must answer an HTTP request: gcsfs's and the lease's (STORAGE_EMULATOR_HOST, else
  storage.googleapis.com) and tensorstore's (TENSORSTORE_GCS_HTTP_URL, else the same). One that has not
  answered within START_LIMIT_S (or the deadline, if shorter) is one UserError naming it.
- `watch({flag: path})` around a run (after `check_reachable`): a thread asks each endpoint every
  PROBE_EVERY_S; any HTTP answer counts (a 401 too: the store is there). After SILENT_S without one it
  prints `waiting for gs://...: ... (12 s of 45)` every PROGRESS_EVERY_S; when the silence reaches the
  deadline (MTP_STORE_DEADLINE seconds, 45 by default: below the workdir lease's 60 s, so a run stops before
  another may take its workdir over) it raises StoreUnavailable in the main thread wherever that thread waits
  (a signal sent to the main thread wakes any blocking wait). After SIGTERM / SIGINT (`stop_requested`) the
  limit is STOP_GRACE_S of silence: a save the store cannot take is abandoned, not waited for.
- The clients' threads keep waiting on the store; `given_up()` tells closers to ask nothing more of it, and a
  command-line program exits right after its one line (errors.run_cli). If the main thread does not come
  back within HARD_EXIT_S, the watch of a command-line program prints the line and exits itself.
- `bound_tensorstore_retries()`: tensorstore's own retries end a little after the deadline, so a store that
  answers but refuses (say with 503s) fails the save instead of retrying for a quarter of an hour.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import threading
import time
from typing import Iterator

from mtp_jax import errors
from mtp_jax.errors import UserError

DEADLINE_ENV = "MTP_STORE_DEADLINE"
DEFAULT_DEADLINE_S = 45.0
START_LIMIT_S = 15.0     # a store not reached yet: most likely a wrong URL or variable, not a blip
STOP_GRACE_S = 5.0       # silence tolerated once a stop signal came
SILENT_S = 5.0           # silence before the first "waiting for" line
PROBE_EVERY_S = 2.0
PROBE_TIMEOUT_S = 5.0
PROGRESS_EVERY_S = 10.0
HARD_EXIT_S = 15.0
GCS_URL = "https://storage.googleapis.com"
_INTERRUPT = signal.SIGUSR1
_LIBRARIES = ("/gcsfs/", "/fsspec/", "/orbax/", "/aiohttp/", "/google/", "/etils/", "/grain/", "/tensorboardX/")


class StoreUnavailable(UserError):
  """The object store did not answer within the deadline, or while a stop signal waited on it."""
  abandons_io = True   # the clients' threads may wait on it for minutes: a command-line program exits at once


def deadline_s() -> float:
  """The seconds a store may stay silent before a run ends: MTP_STORE_DEADLINE, 45 by default."""
  raw = os.environ.get(DEADLINE_ENV, "").strip()
  if not raw:
    return DEFAULT_DEADLINE_S
  try:
    value = float(raw)
  except ValueError:
    value = math.nan
  if not 0 < value < math.inf:
    raise UserError(f"{DEADLINE_ENV}={raw!r}: give the seconds an object store may stay silent before a run "
                    f"ends, a number > 0 (default {DEFAULT_DEADLINE_S:.0f})")
  return value


def endpoints(p) -> dict[str, str]:
  """{URL: which clients use it, when not all} of the HTTP endpoints behind a gs:// path; {} for other paths."""
  if not str(p).startswith("gs://"):
    return {}
  emulator = os.environ.get("STORAGE_EMULATOR_HOST", "").strip()
  if emulator in ("", "default"):
    listing = GCS_URL
  else:
    listing = emulator if emulator.startswith(("http://", "https://")) else f"http://{emulator}"
  arrays = os.environ.get("TENSORSTORE_GCS_HTTP_URL", "").strip() or GCS_URL
  listing, arrays = listing.rstrip("/"), arrays.rstrip("/")
  if listing == arrays:
    return {listing: ""}
  return {listing: "listings and files" + (", STORAGE_EMULATOR_HOST" if listing != GCS_URL else ""),
          arrays: "checkpoint arrays" + (", TENSORSTORE_GCS_HTTP_URL" if arrays != GCS_URL else "")}


def _bucket(p) -> str:
  return str(p)[len("gs://"):].split("/", 1)[0]


def ask(url: str, bucket: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
  """None when an HTTP server answers at `url` (any status), else why not, in a few words."""
  import http.client
  import socket
  import ssl
  import urllib.error
  import urllib.parse
  import urllib.request
  try:
    urllib.request.urlopen(f"{url}/storage/v1/b/{urllib.parse.quote(bucket)}?fields=name", timeout=timeout).close()
    return None
  except urllib.error.HTTPError:
    return None
  except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
    reason = getattr(e, "reason", e)
    if isinstance(reason, ssl.SSLError):   # a TLS handshake happened: the store is there (certificates are the
      return None                          # clients' business, with their own CA settings)
    if isinstance(reason, ConnectionRefusedError):
      return "connection refused"
    if isinstance(reason, (socket.timeout, TimeoutError)):
      return f"no answer in {timeout:.0f} s"
    if isinstance(reason, socket.gaierror):
      return "unknown host"
    return (str(reason).strip() or type(reason).__name__)[:120]


def _silent(urls: dict[str, str], bucket: str) -> list[tuple[str, str, str]]:
  """(url, what uses it, why) of each endpoint that does not answer now."""
  out = []
  for url, use in urls.items():
    why = ask(url, bucket)
    if why is not None:
      out.append((url, use, why))
  return out


def _describe(silent: list[tuple[str, str, str]], quiet: float | None = None) -> str:
  verb = "does not answer" if quiet is None else f"has not answered for {quiet:.0f} s"
  return "; ".join(f"the object store at {url}{f' ({use})' if use else ''} {verb} ({why})"
                   for url, use, why in silent)


def check_reachable(p, what: str) -> None:
  """Wait (with a line every few seconds) until every endpoint behind the gs:// path `p` answers; UserError
  once START_LIMIT_S (or the deadline, if shorter) has passed without that."""
  urls = endpoints(p)
  if not urls:
    return
  limit = min(START_LIMIT_S, deadline_s())
  began, said = time.monotonic(), 0.0
  while True:
    silent = _silent(urls, _bucket(p))
    waited = time.monotonic() - began
    if not silent:
      return
    if waited >= limit:
      raise UserError(f"{what}={p}: {_describe(silent)} after {waited:.0f} s; check the network, the URL "
                      f"and STORAGE_EMULATOR_HOST / TENSORSTORE_GCS_HTTP_URL if set")
    if waited - said >= SILENT_S:
      said = waited
      print(f"waiting for {p}: {_describe(silent)} ({waited:.0f} s of {limit:.0f})", file=sys.stderr, flush=True)
    time.sleep(min(PROBE_EVERY_S, max(limit - waited, 0.05)))


_given_up: str | None = None
_active: "_Watch | None" = None


def given_up() -> bool:
  """Whether this process gave up on its object store: ask nothing more of it (close nothing on it)."""
  return _given_up is not None


def stop_requested(name: str) -> None:
  """A stop signal (SIGTERM / SIGINT) came: from now on a silent store is waited for STOP_GRACE_S at most.
  Safe to call from a signal handler; nothing happens when no store is watched."""
  if _active is not None:
    _active.stop(name)


def silent_for() -> float:
  """Seconds since the watched store last answered (0 when it answers or nothing is watched)."""
  return _active.silent_for() if _active is not None else 0.0


class _Quiet(logging.Filter):
  """While the store is silent, its clients' logs (a traceback per failed retry) say what the watch says."""

  def filter(self, record):
    silent = given_up() or silent_for() >= SILENT_S
    return not (silent and any(p in record.pathname for p in _LIBRARIES))


class _Watch:

  def __init__(self, urls: dict[str, str], where: str, bucket: str, limit: float):
    self.urls, self.where, self.bucket, self.limit = urls, where, bucket, limit
    self.last_answer = time.monotonic()
    self.silent: list = []
    self.signal_name = None
    self.fired: str | None = None
    self._done, self._poke, self._lock = threading.Event(), threading.Event(), threading.Lock()
    self._main = threading.main_thread().ident if threading.current_thread() is threading.main_thread() else None
    self._thread = threading.Thread(target=self._run, name="store-watch", daemon=True)

  def silent_for(self) -> float:
    return time.monotonic() - self.last_answer if self.silent else 0.0

  def stop(self, name: str) -> None:
    self.signal_name = name
    self._poke.set()

  def _message(self, quiet: float) -> str:
    what = _describe(self.silent, quiet)
    if self.signal_name:
      return f"stopped by {self.signal_name}: {what}, so nothing more could be saved"
    return f"{self.where}: {what}; that is the deadline ({DEADLINE_ENV}={self.limit:g})"

  def _run(self) -> None:
    said = 0.0
    while not self._done.is_set():
      silent = _silent(self.urls, self.bucket)
      now = time.monotonic()
      if not silent:
        if self.silent and said:
          print(f"the object store answers again; continuing ({self.where})", file=sys.stderr, flush=True)
        self.silent, self.last_answer, said = [], now, 0.0
      else:
        self.silent = silent
        quiet = now - self.last_answer
        limit = min(self.limit, STOP_GRACE_S) if self.signal_name else self.limit
        if quiet >= limit:
          self._fire(self._message(quiet))
          return
        if quiet >= SILENT_S and (not said or quiet - said >= PROGRESS_EVERY_S):
          said = quiet
          print(f"waiting for {self.where}: {_describe(silent)} ({quiet:.0f} s of {limit:.0f})", file=sys.stderr,
                flush=True)
      self._poke.wait(PROBE_EVERY_S)
      self._poke.clear()

  def _fire(self, message: str) -> None:
    """Give up: interrupt the main thread until it leaves the watch; a command-line program that does not
    come back within HARD_EXIT_S is ended here, with the same line."""
    global _given_up
    self.fired = _given_up = message
    began = time.monotonic()
    while True:
      with self._lock:   # never after the watch has put the old handler back
        if self._done.is_set():
          return
        if self._main is not None:
          signal.pthread_kill(self._main, _INTERRUPT)
      if time.monotonic() - began >= HARD_EXIT_S and errors.in_cli():
        errors.exit_with(message, now=True)
      self._done.wait(5.0)

  def _interrupt(self, signum, frame):
    if self.fired is not None:
      raise StoreUnavailable(self.fired)


def watching() -> bool:
  return _active is not None


@contextlib.contextmanager
def watch(paths: dict) -> Iterator[None]:
  """Watch the object store behind the first gs:// path of `paths` ({flag name: path}) while the block runs
  (nothing happens for local paths): first `check_reachable`, then the watch of the module docstring."""
  global _active, _given_up
  what, remote = next(((k, p) for k, p in paths.items() if str(p or "").startswith("gs://")), (None, None))
  urls = endpoints(remote) if remote else {}
  if not urls or _active is not None:
    yield
    return
  check_reachable(remote, what)
  _given_up = None
  w = _Watch(urls, str(remote), _bucket(remote), deadline_s())
  quiet = _Quiet()
  loggers = [logging.getLogger(n) for n in ("gcsfs", "fsspec", "absl", "asyncio")]
  old = None
  if w._main is not None:
    old = signal.signal(_INTERRUPT, w._interrupt)
  for logger in loggers:
    logger.addFilter(quiet)
  _active = w
  w._thread.start()
  try:
    yield
  finally:
    with w._lock:
      w._done.set()
    w._poke.set()
    _active, _given_up = None, None
    for logger in loggers:
      logger.removeFilter(quiet)
    if w._main is not None:
      signal.signal(_INTERRUPT, old)


def bound_tensorstore_retries() -> None:
  """Make orbax's tensorstore give up on a request a little after the deadline (the default is 32 tries up to
  32 s apart). Orbax builds its contexts from two module-level dicts and offers no option for this."""
  try:
    from orbax.checkpoint._src.serialization import tensorstore_utils as tsu
  except ImportError:
    return
  total, tries, delay = 0.0, 0, 1.0
  while total < deadline_s() + 2 * PROBE_EVERY_S + PROBE_TIMEOUT_S:
    total, tries, delay = total + delay, tries + 1, min(2 * delay, 8.0)
  retries = {"max_retries": tries, "initial_delay": "1s", "max_delay": "8s"}
  for name in ("_BASE_TS_CONTEXT", "_DEFAULT_OCDBT_TS_CONTEXT"):
    context = getattr(tsu, name, None)
    if isinstance(context, dict):
      context["gcs_request_retries"] = retries
