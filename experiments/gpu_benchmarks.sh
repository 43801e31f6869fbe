#!/usr/bin/env bash
# On a machine with a GPU or TPU: the memory, cross-entropy, speculative-decoding and attention
# benchmarks in one command, each writing experiments/results/<name>_<device>.{md,json} with the
# device named in its table (the scripts print jax's device kind).
#
#   bash experiments/gpu_benchmarks.sh                        # random-init speculative smoke run
#   WORKDIR=workdirs/default bash experiments/gpu_benchmarks.sh   # speculative on a trained run
#
# Set PYTHON to the interpreter (default: python). Budget: ~10 min on one H100/H200 or TPU v5e.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DEV=$($PY -c "import jax; d = jax.devices()[0]; print((d.platform + '_' + d.device_kind).lower().replace(' ', '_').replace('-', '_'))")
echo "device: $DEV"
$PY -c "import jax; print(jax.devices())"

# Train-step memory and time of the multi-token loss (naive / scan / scan+chunk, n = 1, 2, 4, 8).
$PY experiments/memory.py --out_name="memory_$DEV"
# Fused cross-entropy: unchunked vs automatic chunk, n = 1 and 4, memory and step time.
# Attention implementations side by side (every one the backend has), forward + backward.
$PY experiments/attention_speed.py --out_name="attention_speed_$DEV"
# Self-speculative decoding, batch 1 / 4 / 16.
if [[ -n "${WORKDIR:-}" ]]; then
  $PY experiments/speculative.py --workdir="$WORKDIR" --out_name="speculative_$DEV"
else
  $PY experiments/speculative.py --config=configs/default.py --random_init --out_name="speculative_random_$DEV"
fi
echo "tables: experiments/results/*_$DEV.md"
