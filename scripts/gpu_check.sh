#!/usr/bin/env bash
# The GPU checks of issue #19 as one prepared run, for a session lent the GPU machine (`device` tool).
#
#   bash scripts/gpu_check.sh prepare      # here, once: wheels of what the GPU image lacks -> .whl/
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540)   # on the GPU machine
#
# The GPU image has torch, lightning, transformers, peft and timm but not jsonargparse (the CLI)
# and its two helpers; nothing there can be downloaded, so their wheels travel in .whl/ (ignored
# by git). The models are built from configs with random weights: step time and memory do not
# depend on the weights (the pretrained ones are over the 64 MiB a call can carry).
# Writes to $OUT: cuda_tests.log, training_step_cuda.json, peak_memory_cuda.json and check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=(jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0)

if [ "${1:-}" = "prepare" ]; then
    rm -rf .whl && mkdir .whl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl "${WHEELS[@]}"
    ls .whl
    exit
fi

OUT="${OUT:-$(mktemp -d)}"
exec > >(tee "$OUT/check.log") 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c 'import torch, lightning, transformers; print(torch.__version__, lightning.__version__, transformers.__version__)'

echo "== CUDA tests (the tests that skip without a GPU, and the engine's)"
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_engine.py tests/test_memory.py tests/test_block_deltas.py \
    2>&1 | tee "$OUT/cuda_tests.log" | tail -15

echo "== training step, default and layer mode against uncompressed and activation checkpointing"
timeout 180 python3 benchmarks/training_step.py --device cuda --models llama llama1024 vit --steps 10 \
    --out "$OUT/training_step_cuda.json"

echo "== peak memory (random-weight Llama)"
timeout 120 python3 benchmarks/peak_memory.py --device cuda --models llama --out "$OUT/peak_memory_cuda.json"
