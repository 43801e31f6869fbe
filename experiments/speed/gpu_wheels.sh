#!/usr/bin/env bash
# Wheels for what experiments/speed/gpu_benchmarks.sh needs and the lent GPU machine's image lacks (it has jax,
# flax, optax, orbax, etils, absl and numpy, but not these; /work/.library/device/KINDS.md lists its
# packages). Run here, where pip reaches the registry; carry .whl to the device, where gpu_benchmarks.sh
# installs them under /tmp/site. Versions are requirements.txt's (or requirements-dev.txt's); Python 3.12, x86-64 Linux.
#
#   bash experiments/speed/gpu_wheels.sh        # -> .whl/ (git ignores it)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-$(command -v python || command -v python3)}
pin() { grep -h -i -E "^$1==" requirements.txt requirements-dev.txt | head -1 | cut -d" " -f1; }
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  "$(pin ml_collections)" "$(pin zstandard)" "$(pin grain)" "$(pin array-record)" portpicker==1.6.0
ls -l .whl
