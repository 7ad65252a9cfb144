#!/usr/bin/env bash
# One prepared check for one H100/H200 without network, <= 8 minutes: see benchmarks/gpu_check.py for what it runs.
#
#   benchmarks/gpu_check.sh OUT_DIR                      # on the GPU machine (uses .venv/bin/python if present)
#   benchmarks/gpu_check.sh OUT_DIR --device cpu --tiny  # dry run on a CPU, < 2 minutes
#
# Writes OUT_DIR/results.md, OUT_DIR/results.json, OUT_DIR/log.txt and OUT_DIR/nvidia-smi.txt; the last line of the
# log is one JSON object. The Python side stops starting checks after --budget-s (420 s); `timeout` is the backstop.
set -euo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR [--device cpu --tiny] [gpu_check.py options]}
shift
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export CUBLAS_WORKSPACE_CONFIG=:4096:8 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || echo "no nvidia-smi" > "$out/nvidia-smi.txt"
timeout "${GPU_CHECK_TIMEOUT:-470}" "$PY" benchmarks/gpu_check.py "$out" "$@" 2>&1 | tee "$out/log.txt"
