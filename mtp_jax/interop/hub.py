"""`--from=org/name`: a Hugging Face Hub model id, fetched with `huggingface_hub.snapshot_download`.

Users name models the way transformers does; the converter reads a directory. Only the files it reads
are fetched: first the small ones (config.json, params.json, tokenizer and generation files), then the
weights of the layout they announce (model*.safetensors for a Hugging Face repo, consolidated.* for a
Meta one), so a repo that also carries .bin, .pth, ONNX or GGUF copies costs one download of one copy.
Files land in huggingface_hub's cache (HF_HOME, HF_HUB_CACHE), so a second import downloads nothing, and
HF_HUB_OFFLINE=1 reads that cache only. A path that exists, a bucket URL, a .gguf file and anything
else that is not `org/name` are never taken for an id.
"""
from __future__ import annotations

import os
import re

from mtp_jax.errors import UserError

# What mtp_jax/interop/hf.py, meta.py and tokenizer.py read.
METADATA = ["config.json", "generation_config.json", "params.json", "tokenizer.json", "tokenizer.model",
            "tokenizer_config.json", "special_tokens_map.json", "model.safetensors.index.json"]
HF_WEIGHTS = ["model.safetensors", "model-*-of-*.safetensors", "extra_heads.safetensors"]
META_WEIGHTS = ["consolidated.safetensors", "consolidated.pth", "consolidated.*.pth"]

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def is_hub_id(src) -> bool:
  """True for `org/name` that names no local file or directory (and is not a bucket URL or a .gguf file)."""
  s = str(src)
  if "://" in s or s.endswith(".gguf") or s.startswith(("/", ".", "~")) or os.path.exists(s):
    return False
  return bool(_ID.match(s)) and ".." not in s


def _offline() -> bool:
  return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def resolve(src):
  """`src` as it is, or, for a Hub id, the local snapshot directory holding the files the converter reads."""
  if not is_hub_id(src):
    return src
  import huggingface_hub
  from huggingface_hub import errors

  offline = _offline()
  kw = dict(cache_dir=os.environ.get("HF_HUB_CACHE") or None, local_files_only=offline)
  where = f"--from={src}"
  try:
    path = huggingface_hub.snapshot_download(src, allow_patterns=METADATA, **kw)
    names = set(os.listdir(path))
    weights = HF_WEIGHTS if "config.json" in names or "params.json" not in names else META_WEIGHTS
    path = huggingface_hub.snapshot_download(src, allow_patterns=METADATA + weights, **kw)
  except errors.GatedRepoError:
    raise UserError(f"{where}: the model is gated; accept its terms on huggingface.co and log in "
                    f"(hf auth login or HF_TOKEN)") from None
  except errors.RepositoryNotFoundError:
    raise UserError(f"{where}: no such model on the Hugging Face Hub (or it is private: log in with hf auth "
                    f"login or HF_TOKEN); a local directory of that name does not exist either") from None
  except errors.LocalEntryNotFoundError:
    why = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached"
    raise UserError(f"{where}: not in the Hugging Face cache and {why}; download it once online "
                    f"(or give a local directory)") from None
  except (errors.HfHubHTTPError, OSError) as e:
    line = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    raise UserError(f"{where}: the download failed ({line}); check the network, or give a local directory") \
        from None
  return path
