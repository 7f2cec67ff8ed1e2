#!/usr/bin/env bash
# The prepared GPU check of the gpu-torch target (docs/benchmarks.md, "GPU check (gpu-torch)").
#
#   benchmarks/gpu_check.sh OUTPUT_DIR [gpu_check.py options, e.g. --no-serve, --stages llm]
#
# Stages, each in its own process under its own time cap: environment, accuracy, eager, llm (the
# in-flight batching engine on a 32-layer 7B LM drawn on the GPU), compiled:<encoder>, serving.
# Runs on a GPU machine with PyTorch + transformers and no registry, from the working tree (no
# install): mofserve's folders are mapped into a `mofserve` package by symlinks, as pyproject's
# package-dir does. For the serving stage, bring the wheels in .whl/ (or $MOFSERVE_WHEELS):
#   pip download nvidia-pytriton==0.7.0 tritonclient==2.73.0 --no-deps -d .whl
# Everything ends within GPU_CHECK_TIMEOUT_S (default 470 s); results (gpu_check.json,
# gpu_check.md, parts/, tritonserver.log) are written to OUTPUT_DIR as they come in.
set -uo pipefail

out=${1:?usage: benchmarks/gpu_check.sh OUTPUT_DIR [options]}
shift
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
# a relative interpreter path (PYTHON=.venv/bin/python) must survive the cd below; symlinks are kept
if [[ $python == */* ]]; then python=$(cd "$(dirname "$python")" && pwd)/$(basename "$python"); fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/mofserve-gpu-check.XXXXXX")
trap 'rm -rf "$work"' EXIT
# built checkpoints (gigabytes for the paper shapes) go to a scratch folder, never to OUTPUT_DIR
export MOFSERVE_HOME=${MOFSERVE_HOME:-$work/home}
export MOFSERVE_WHEELS=${MOFSERVE_WHEELS:-$root/.whl}
export PYTHONUNBUFFERED=1

if ! (cd "$work" && "$python" -c "import mofserve.benchmarks.gpu_check" 2>/dev/null); then
    farm=$work/src/mofserve
    mkdir -p "$farm"
    for entry in "$root"/mofserve/*; do ln -s "$entry" "$farm/"; done
    for package in core export model_repository server clients benchmarks evaluation; do
        ln -s "$root/$package" "$farm/$package"
    done
    export PYTHONPATH=$work/src${PYTHONPATH:+:$PYTHONPATH}
fi
if ! (cd "$work" && "$python" -c "import mofserve.benchmarks.gpu_check"); then
    echo "gpu_check.sh: cannot import mofserve from $root with $python" >&2
    exit 2
fi
echo "[gpu-check] $("$python" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)'), \
wheels: $(ls "$MOFSERVE_WHEELS"/*.whl 2>/dev/null | xargs -r -n1 basename | tr '\n' ' ')" >&2

cd "$work" || exit 2
timeout --kill-after=10 "${GPU_CHECK_TIMEOUT_S:-470}" "$python" -m mofserve.benchmarks.gpu_check --out "$out" "$@"
status=$?
if [ "$status" -ne 0 ] && [ -f "$out/gpu_check.md" ]; then
    echo "gpu_check.sh: ended with status $status; partial results in $out/gpu_check.md:" >&2
    cat "$out/gpu_check.md"
fi
exit "$status"
