#!/usr/bin/env bash
# On a machine with a GPU or TPU: the memory, cross-entropy, attention, step-time and speculative-decoding
# benchmarks in one command, each writing <name>_<device>.{md,json} with the device named in its table
# (the scripts print jax's device kind).
#
#   bash experiments/speed/gpu_benchmarks.sh                            # speculative on random weights
#   WORKDIR=workdirs/default bash experiments/speed/gpu_benchmarks.sh   # speculative on a trained run
#   SMOKE=1 bash experiments/speed/gpu_benchmarks.sh                    # tiny sizes on any backend, ~3 min on
#                                                                 # 2 CPU cores: checks the script itself
#
# Tables go to each script's results/ folder (experiments/memory/results/, experiments/speed/results/),
# or all to $MTP_RESULTS_DIR where set. Where $OUT is set (a
# folder of files to bring back, at most 8 of them), they are also packed into one file,
# $OUT/gpu_tables_<device>.tar.gz. Packages the accelerator machine lacks travel as wheels: make them here with
# `bash experiments/speed/gpu_wheels.sh` and carry .whl; where the interpreter lacks them, this script installs
# them under /tmp/site first. The image's jax (0.11.2 when last read) is newer than requirements.txt's:
# the registry here has none that new, so the script has been run end to end on 0.10.2 only (SMOKE=1,
# tests/test_experiments.py).
# PYTHON sets the interpreter (default: python, else python3). Budget: at most 5 x BENCH_TIMEOUT (110 s).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-$(command -v python || command -v python3)}
if ! "$PY" -c "import ml_collections, grain, zstandard" 2> /dev/null && compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# The scripts import the installed mtp_jax (with its recipes as mtp_jax.recipes); a bare clone gets the
# package laid out as pip installs it, under /tmp/site.
if ! "$PY" -c "import mtp_jax.recipes" 2> /dev/null; then
  rm -rf /tmp/site/mtp_jax && mkdir -p /tmp/site && cp -r mtp_jax /tmp/site/ && cp -r configs /tmp/site/mtp_jax/recipes
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# One jax start-up names the device (stdout) and logs what jax sees (stderr).
DEV=$("$PY" -c "import sys, jax; d = jax.devices()[0]; print('jax', jax.__version__, jax.devices(), file=sys.stderr)
print((d.platform + '_' + d.device_kind).lower().replace(' ', '_').replace('-', '_'))")

if [[ -n "${SMOKE:-}" ]]; then
  DEV="${DEV}_smoke"
  MEMORY=(--vocab=512 --seq_len=64 --chunk=32 --n=1,4 --sequential_d=1,2 --notiming)
  CE=(--vocab=512 --steps=1)
  ATTENTION=(--lengths=64,128 --repeats=1)
  RATIO=(--quick --out_name="step_ratio_$DEV")
  SPECULATIVE=(--config=configs/tiny.py --random_init --batch_sizes=1,2 --prompts=2 --prompt_len=8
               --max_new_tokens=8 --repeats=1 --forward_iters=2 --forward_repeats=1)
else
  MEMORY=() CE=() ATTENTION=() RATIO=(--out_name="step_ratio_$DEV")
  # 16 prompts, 3 repeats: the CPU table's 64 and 5 would not fit BENCH_TIMEOUT
  if [[ -n "${WORKDIR:-}" ]]; then
    SPECULATIVE=(--workdir="$WORKDIR" --prompts=16 --repeats=3)
  else
    SPECULATIVE=(--config=configs/default.py --random_init --prompts=16 --repeats=3)
  fi
fi
echo "device: $DEV"
# Each benchmark runs under its own time limit (BENCH_TIMEOUT seconds, default 110: five of them fit the
# 10 min a lent machine's call may run), and a failed or timed-out one does not stop the others: what finished is
# still packed, and the script exits non-zero naming what did not.
FAILED=()
bench() {
  local name=$1; shift
  echo "+ $*"
  if ! timeout "${BENCH_TIMEOUT:-110}" "$PY" "$@"; then
    echo "FAILED or timed out: $name" >&2
    FAILED+=("$name")
  fi
}
# Train-step memory of the multi-token loss (naive / scan / scan+chunk, n = 1, 2, 4, 8), and n4 / n1 time.
bench memory experiments/memory/memory.py "${MEMORY[@]}" --out_name="memory_$DEV"
# Fused cross-entropy on configs/default.py:sp at vocab 32000: unchunked vs automatic chunk, n = 1 and 4.
bench ce_chunk experiments/memory/ce_chunk.py "${CE[@]}" --out_name="ce_chunk_$DEV"
# Attention implementations side by side (every one the backend has), forward + backward.
bench attention_speed experiments/speed/attention_speed.py "${ATTENTION[@]}" --out_name="attention_speed_$DEV"
# n=4 / n=1 train-step time at parity on configs/default.py:sp, by part.
bench step_ratio experiments/speed/step_ratio.py "${RATIO[@]}"
# Self-speculative decoding, batch 1 / 4 / 16.
bench speculative experiments/speed/speculative.py "${SPECULATIVE[@]}" --out_name="speculative_$DEV"

if [[ -n "${MTP_RESULTS_DIR:-}" ]]; then DIRS=("$MTP_RESULTS_DIR"); else DIRS=(experiments/*/results); fi
TABLES=$(find "${DIRS[@]}" -maxdepth 1 \( -name "*_${DEV}*.md" -o -name "*_${DEV}*.json" \) 2> /dev/null | sort || true)
if [[ -n "${OUT:-}" && -n "$TABLES" ]]; then
  tar -czf "$OUT/gpu_tables_$DEV.tar.gz" --transform 's#.*/##' $TABLES    # the files by name, without folders
  echo "packed: $OUT/gpu_tables_$DEV.tar.gz"
fi
echo "tables:" $TABLES
if (( ${#FAILED[@]} )); then
  echo "error: these benchmarks failed or ran past BENCH_TIMEOUT=${BENCH_TIMEOUT:-110}s: ${FAILED[*]}" >&2
  exit 1
fi
