"""Reading checkpoint tensors by name, one file at a time: safetensors (any shard layout) and torch .pth.

A `TensorFiles` knows every key's file and [out, in] shape from the headers alone (nothing is read
until `items()`), so a converter can refuse a missing, unexpected or misshapen key before reading a
byte of weights, and then read shard after shard: at most one tensor beyond the target tree is in
host memory at a time.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mtp_jax.errors import UserError

_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


class ConvertError(UserError):
  """A checkpoint or workdir that cannot be converted; the message names the file, key or field."""


class TensorFiles:
  """key -> (file, shape) over safetensors files; `items(dtype)` yields (key, numpy array) file by file."""

  def __init__(self, files: list[Path]):
    from safetensors import SafetensorError, safe_open
    self.where, self.shapes = {}, {}
    for path in files:
      if not path.exists():
        raise ConvertError(f"{path} is missing (the index names it); download every shard of the checkpoint")
      try:
        with safe_open(str(path), framework="numpy") as f:
          for key in f.keys():
            s = f.get_slice(key)
            if s.get_dtype() not in _DTYPES:
              raise ConvertError(f"{path.name}: tensor {key} has dtype {s.get_dtype()}; only float32, bfloat16 "
                                 f"and float16 checkpoints convert (quantized ones do not)")
            self.where[key], self.shapes[key] = path, tuple(s.get_shape())
      except SafetensorError as e:
        raise ConvertError(f"{path} is not a readable safetensors file ({e}); it is truncated or damaged: "
                           f"download it again")

  def keys(self) -> set:
    return set(self.where)

  def items(self, keys, dtype):
    """(key, array in `dtype`) for the given keys, reading each file once, in file order."""
    from safetensors import safe_open
    by_file = {}
    for k in keys:
      by_file.setdefault(self.where[k], []).append(k)
    with _progress(sum(len(ks) for ks in by_file.values())) as bar:
      for path, ks in by_file.items():
        with safe_open(str(path), framework="numpy") as f:
          for k in ks:
            yield k, f.get_tensor(k).astype(dtype)
            bar.update()


class TorchFile:
  """A torch state dict (`consolidated.pth`), memory-mapped; torch is imported only here."""

  def __init__(self, path: Path):
    try:
      import torch
    except ImportError:
      raise ConvertError(f"{path} is a torch checkpoint and reading it needs torch, which is not installed "
                         f"(pip install torch, CPU is enough), or convert it to consolidated.safetensors first")
    try:
      self.state = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # truncated zip, pickle that weights_only refuses, ...
      raise ConvertError(f"cannot read {path} ({type(e).__name__}: {str(e).splitlines()[0][:160]}); it is "
                         f"truncated, damaged or not a plain state dict")
    self.shapes = {k: tuple(v.shape) for k, v in self.state.items()}
    bad = [k for k, v in self.state.items() if str(v.dtype) not in ("torch.float32", "torch.bfloat16", "torch.float16")]
    if bad:
      raise ConvertError(f"{path.name}: tensor {bad[0]} has dtype {self.state[bad[0]].dtype}; only float32, "
                         f"bfloat16 and float16 convert")

  def keys(self) -> set:
    return set(self.state)

  def items(self, keys, dtype):
    import torch
    keys = list(keys)
    with _progress(len(keys)) as bar:
      for k in keys:
        yield k, self.state[k].to(torch.float32).numpy().astype(dtype)
        bar.update()


def _progress(total: int):
  """A progress bar of tensors converted, on a terminal only (tqdm's disable=None); logs and tests get none."""
  from tqdm import tqdm
  return tqdm(total=total, unit="tensor", desc="convert", disable=None, leave=False)


def safetensors_in(directory: Path, single: str, index: str) -> TensorFiles:
  """The safetensors files of a checkpoint: `single`, or the shards `index` (a .index.json) names."""
  if (directory / index).exists():
    try:
      weight_map = json.loads((directory / index).read_text())["weight_map"]
    except (ValueError, KeyError) as e:
      raise ConvertError(f"{directory / index} is not a safetensors index (no weight_map: {e}); download it again")
    files = sorted({directory / f for f in weight_map.values()})
    tf = TensorFiles(files)
    stray = sorted(set(weight_map) ^ tf.keys())
    if stray:
      raise ConvertError(f"{directory / index} and its shards disagree about tensor {stray[0]}; download the "
                         f"checkpoint again")
    return tf
  if (directory / single).exists():
    return TensorFiles([directory / single])
  raise ConvertError(f"{directory} has neither {single} nor {index}: no weights to convert")


def numpy_dtype(name: str):
  import ml_dtypes
  return {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[name]
