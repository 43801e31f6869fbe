"""`convert import --from=org/name`: Hugging Face Hub ids, offline, against a cache laid out as
huggingface_hub lays it out (models--org--name/refs/main, snapshots/<commit>/...), built from the
tests' fixture checkpoints. Nothing here reaches the network."""
import fnmatch
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from mtp_jax import interop
from mtp_jax.errors import UserError
from mtp_jax.interop import hub

from helpers import FIXTURES, ROOT
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root, repo: str, fixture: str) -> str:
  """A huggingface_hub cache at root holding `repo` at refs/main with the fixture's files."""
  org, name = repo.split("/")
  entry = os.path.join(root, f"models--{org}--{name}")
  os.makedirs(os.path.join(entry, "refs"), exist_ok=True)
  with open(os.path.join(entry, "refs", "main"), "w") as f:
    f.write(COMMIT)
  snapshot = os.path.join(entry, "snapshots", COMMIT)
  shutil.copytree(os.path.join(FIXTURES, fixture), snapshot,
                  ignore=shutil.ignore_patterns("reference.npz", "greedy.json"))
  return root


@pytest.mark.parametrize("src, is_id", [
    ("HuggingFaceTB/SmolLM2-135M", True), ("meta-llama/Llama-3.2-1B", True), ("org/model.v1_x", True),
    ("gs://bucket/model", False), ("model.gguf", False), ("org/model.gguf", False), ("./org/name", False),
    ("/abs/org/name", False), ("~/org/name", False), ("name", False), ("a/b/c", False), ("org/../etc", False),
])
def test_what_is_a_hub_id(src, is_id):
  assert hub.is_hub_id(src) == is_id


def test_an_existing_local_path_wins(tmp_path, monkeypatch):
  (tmp_path / "org" / "name").mkdir(parents=True)
  monkeypatch.chdir(tmp_path)
  assert not hub.is_hub_id("org/name") and hub.resolve("org/name") == "org/name"


def test_the_patterns_fetch_every_file_the_converter_reads():
  wanted = hub.METADATA + hub.HF_WEIGHTS
  for fixture in ("hf_gqa_untied", "hf_tied_sp", "hf_llama3_sharded"):
    for f in os.listdir(os.path.join(FIXTURES, fixture)):
      if f.endswith((".safetensors", ".json", ".model")) and f != "greedy.json":
        assert any(fnmatch.fnmatch(f, p) for p in wanted), (fixture, f)
  for f in os.listdir(os.path.join(FIXTURES, "meta_mtp")):
    if f != "greedy.json" and not f.endswith(".npz"):
      assert any(fnmatch.fnmatch(f, p) for p in hub.METADATA + hub.META_WEIGHTS), f
  for skipped in ("pytorch_model.bin", "model.onnx", "model-q4.gguf", "original/consolidated.00.pth", "README.md"):
    assert not any(fnmatch.fnmatch(skipped, p) for p in wanted), skipped


def test_offline_read_from_the_cache_equals_the_directory(tmp_path, monkeypatch):
  cache = hub_cache(str(tmp_path / "hf"), "mtp-test/tiny-llama", "hf_gqa_untied")
  monkeypatch.setenv("HF_HUB_CACHE", cache)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.chdir(tmp_path)
  config, params, _ = interop.read_checkpoint("mtp-test/tiny-llama", n_future=2)
  ref_config, ref, _ = interop.read_checkpoint(os.path.join(FIXTURES, "hf_gqa_untied"), n_future=2)
  assert config.model.to_dict() == ref_config.model.to_dict()
  flat = lambda t, p="": {f"{p}/{k}": v for k, x in t.items() for k, v in (flat(x, k).items() if isinstance(x, dict)
                                                                           else [(k, x)])}
  a, b = flat(params), flat(ref)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_offline_and_not_cached_is_one_line(tmp_path, monkeypatch):
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.chdir(tmp_path)
  with pytest.raises(UserError, match="not in the Hugging Face cache and HF_HUB_OFFLINE is set") as e:
    interop.read_checkpoint("mtp-test/absent")
  assert "\n" not in str(e.value)


def test_convert_import_of_a_hub_id_through_the_cli(tmp_path):
  cache = hub_cache(str(tmp_path / "hf"), "mtp-test/tiny-sp", "hf_tied_sp")
  env = {**os.environ, "HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, "-m", "mtp_jax.convert", "import", "--from=mtp-test/tiny-sp",
                      f"--workdir={tmp_path / 'w'}", "--n_future=2"], cwd=tmp_path, env=env, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.startswith("imported mtp-test/tiny-sp into"), r.stdout
  assert (tmp_path / "w" / "config.json").exists()
