"""A real GCS emulator (gcp-storage-emulator) on a free loopback port, for tests of gs:// paths.

It runs through tests/gcs_emulator_server.py, which adds the generation headers real GCS sends on
downloads and the emulator omits (tensorstore needs them for its second write to an OCDBT manifest).

    with GcsEmulator(buckets=["bkt"]) as emu:
      env = emu.env          # for subprocesses; in-process code gets it through os.environ
      ...

The environment points every client of the project at it: gcsfs (and so etils.epath) through
STORAGE_EMULATOR_HOST (no credentials: gcsfs falls back to anonymous), and tensorstore, which
writes orbax's arrays, through TENSORSTORE_GCS_HTTP_URL plus a fixed testing token
(GOOGLE_AUTH_TOKEN_FOR_TESTING). gcsfs's probe of the zonal/hierarchical bucket type (a gRPC call
the emulator does not speak, 60 s of retries) is turned off with GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class GcsEmulator:

  def __init__(self, buckets=("bkt",)):
    self.buckets = list(buckets)
    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.env = {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
                "GOOGLE_CLOUD_PROJECT": "test"}
    self._saved = {}
    self.proc = None

  def start(self):
    self._dir = tempfile.TemporaryDirectory(prefix="gcs-emulator-")
    self._launch()
    for b in self.buckets:
      self.create_bucket(b)
    for k, v in self.env.items():
      self._saved[k] = os.environ.get(k)
      os.environ[k] = v
    self._clear_clients()
    return self

  def _launch(self):
    self.proc = subprocess.Popen(
        [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "gcs_emulator_server.py"),
         "start", "--host=127.0.0.1", f"--port={self.port}", "-q"],
        env={**os.environ, "STORAGE_BASE": self._dir.name, "STORAGE_DIR": "store"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
      try:
        urllib.request.urlopen(self.url + "/storage/v1/b", timeout=1)
        break
      except OSError:
        if self.proc.poll() is not None or time.time() > deadline:
          raise RuntimeError("gcp-storage-emulator did not start")
        time.sleep(0.1)

  def halt(self):
    """The store goes away (its process is killed; nothing listens on the port) but keeps its objects."""
    self.proc.kill()
    self.proc.wait(timeout=10)
    self.proc = None

  def restart(self):
    """The store comes back on the same port with the objects it held."""
    self._launch()

  @property
  def files(self) -> str:
    """The directory the emulator keeps its objects in, one file per object (for watching a save land)."""
    return os.path.join(self._dir.name, "store")

  def create_bucket(self, name: str):
    import json
    req = urllib.request.Request(self.url + "/storage/v1/b?project=test", data=json.dumps({"name": name}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(req, timeout=5).read()

  def stop(self):
    for k, v in self._saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    self._clear_clients()
    if self.proc is not None:
      self.proc.terminate()
      self.proc.wait(timeout=10)
    self._dir.cleanup()

  @staticmethod
  def _clear_clients():
    """fsspec caches filesystems (and so their endpoint): make the next one read the environment."""
    if "gcsfs" in sys.modules:
      sys.modules["gcsfs"].GCSFileSystem.clear_instance_cache()

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc):
    self.stop()
