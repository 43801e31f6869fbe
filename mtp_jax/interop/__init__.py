"""Pretrained models in and out: Hugging Face Llama-family and Meta MTP checkpoints <-> mtp_jax workdirs.

    import_checkpoint(src, workdir, n_future=None, head_init="copy")   HF dir, Hub id, Meta dir, .gguf -> workdir
    read_checkpoint(src, ...) -> (config, params, tokenizer)           the same, in memory
    export_workdir(workdir, to)                                        workdir -> HF dir (+ Meta extra_heads)

Command line: `python -m mtp_jax.convert import|export` (mtp_jax/convert.py). The key tables and
transposes are in mapping.py.
"""
from __future__ import annotations

from pathlib import Path

IMPORT_HEAD_TYPES = ("parallel", "causal", "sequential")   # added heads a checkpoint's last layer can seed


def read_checkpoint(src, n_future=None, head_init: str = "copy", param_dtype: str = "float32", seed: int = 0,
                    head_type: str = "parallel"):
  """(config, numpy params, tokenizer) of a Hugging Face directory (config.json), a Meta one (params.json) or a
  llama GGUF file (*.gguf)."""
  from mtp_jax import io
  from mtp_jax.interop import hf, meta
  from mtp_jax.interop.tensors import ConvertError
  from mtp_jax.interop import hub
  src = hub.resolve(src)                   # a Hub id (org/name) is downloaded to huggingface_hub's cache first
  src = Path(io.stage_in(src, "--from"))   # a bucket directory is downloaded to a local cache first
  if head_init not in ("copy", "random"):
    raise ConvertError(f"--head_init={head_init!r}: choose copy (heads start as head 1) or random")
  if head_type not in IMPORT_HEAD_TYPES:
    raise ConvertError(f"--head_type={head_type!r}: choose one of {', '.join(IMPORT_HEAD_TYPES)} (added heads are "
                       f"transformer layers, or DeepSeek-V3 modules around one)")
  if n_future is not None and n_future < 1:
    raise ConvertError(f"--n_future={n_future}: need at least 1 head")
  if src.suffix == ".gguf":
    from mtp_jax.interop import gguf
    return gguf.read(src, n_future, head_init, param_dtype, seed, head_type)
  if src.is_dir() and not (src / "config.json").exists() and (src / meta.PARAMS).exists():
    return meta.read(src, n_future, head_init, param_dtype, seed, head_type)
  return hf.read(src, n_future, head_init, param_dtype, seed, head_type)


def import_checkpoint(src, workdir, n_future=None, head_init: str = "copy", param_dtype: str = "float32",
                      seed: int = 0, head_type: str = "parallel"):
  """Write `workdir` (new or empty) holding the checkpoint as an mtp_jax model; returns its config."""
  from mtp_jax.interop import workdir as workdir_lib
  workdir_lib.check_target(workdir)   # before reading gigabytes
  config, params, tok = read_checkpoint(src, n_future, head_init, param_dtype, seed, head_type)
  workdir_lib.write_workdir(workdir, config, params, tok)
  return config


def export_workdir(workdir, to):
  """Write the Hugging Face directory `to` from a workdir's newest checkpoint (see export.py)."""
  from mtp_jax.interop.export import export
  return export(workdir, to)
