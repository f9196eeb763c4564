#!/usr/bin/env bash
# Dense vs γ-MoD on one GPU at the Vicuna-7B shape (LLaVA-HR layout: 1024 image + 35 system
# + 341 text tokens): prefill (capacity and threshold routing) and a training step (forward,
# backward, AdamW) in bf16 with cuDNN attention; prints samples/s, model TFLOP/s, MFU and
# memory per model, and writes every figure to OUT (JSON).
#
#   launch/gpu_benchmark.sh [CONFIG] [OUT]
#   launch/gpu_benchmark.sh                                   # configs/benchmark.py:gpu_7b -> gpu_benchmark.json
#   launch/gpu_benchmark.sh configs/benchmark.py:gpu_7b,batch=4,peak_flops=989e12
#   launch/gpu_benchmark.sh configs/benchmark.py:cpu,decode=0 # the same run on the CPU config (slow)
#
# Environment: PYTHON (default .venv/bin/python if present, else python3). One GPU: the
# first visible one (CUDA_VISIBLE_DEVICES picks another).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-configs/benchmark.py:gpu_7b}
OUT=${2:-gpu_benchmark.json}
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# One device, most of its memory for the 7B training step (parameters, gradients, moments).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
"$PYTHON" -c 'import jax; d = jax.devices()[0]; print(f"device: {d.device_kind} ({jax.default_backend()})")'
exec "$PYTHON" -m launch.benchmark --config "$CONFIG" --out "$OUT"
