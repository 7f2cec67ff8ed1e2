#!/usr/bin/env bash
# The TensorRT GPU check (issue 7, item 5): paper-shaped random encoders -> FP16 TensorRT engines
# with the accuracy gate (min cosine vs ONNX Runtime FP32 >= 0.999) -> served by Triton (gpu-trt)
# behind the front-end -> throughput and latency per fusion mode, the card named. Writes
# OUTPUT_DIR/gpu_check_trt.{json,md}; well within 10 minutes on one GPU (hard cap: MOFSERVE_CHECK_S).
#
# Needs a full Triton (TensorRT backend), the `tensorrt` package and a CUDA GPU: run it inside the
# project's image, e.g.
#   docker run --rm --gpus all --shm-size=1g -v "$PWD/gpu-check:/out" \
#       --entrypoint /opt/mofserve/benchmarks/gpu_check_trt.sh mofserve:0.1.0 /out
# Anywhere else it stops at once (exit 2), naming what is missing.
# benchmarks/gpu_check.sh is the other check: the gpu-torch target on a machine with PyTorch only.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-results/gpu-check-trt-$(date -u +%Y%m%dT%H%M%SZ)}"
if [ -z "${PYTHON:-}" ]; then  # the checkout's venv where there is one (make install), else the image's python3
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export MOFSERVE_HOME="${MOFSERVE_HOME:-$PWD/.mofserve}"
mkdir -p "$OUT"
exec timeout --signal=TERM --kill-after=20 "${MOFSERVE_CHECK_S:-570}" \
    "$PYTHON" -m mofserve.benchmarks.gpu_check_trt --out "$OUT" "${@:2}"
