"""gcp-storage-emulator with the generation headers of real GCS on object downloads; same CLI.

    python tests/gcs_emulator_server.py start --host=127.0.0.1 --port=PORT

Real GCS answers every media download with `x-goog-generation` (and `x-goog-metageneration`); the
emulator leaves them out. Tensorstore (orbax's array store) takes an object's generation from that
header and sends it back as the precondition of its next write, so without it the second commit to
an existing OCDBT manifest fails with "Malformed StorageGeneration" (whether a checkpoint save
needs a second commit depends on timing: the intermittent failure of tests/test_bucket_run.py).
This adds the two headers from the emulator's own object record. It also writes each file of its store
whole (a temporary file renamed into place), so a test may kill the emulator at any moment, as a store that
goes away, and restart it with every object it had acknowledged.
"""
import os
import runpy
from http import HTTPStatus

from gcp_storage_emulator import storage
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj["metageneration"])


objects.download = download   # before the server module builds its routing table from it

_write_bytes = storage._FileStore.write_bytes


def write_bytes(self, rel, content):
  if self._use_memory:
    return _write_bytes(self, rel, content)
  path = self._disk_path(self._norm(rel))
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_bytes(content)
  os.replace(tmp, path)


storage._FileStore.write_bytes = write_bytes

if __name__ == "__main__":
  runpy.run_module("gcp_storage_emulator", run_name="__main__", alter_sys=True)
