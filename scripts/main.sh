#!/usr/bin/env bash
# The main job: set up, then LoRA-fine-tune SmolLM2-135M-Instruct (offline) on Shakespeare with LoRAct.
# Extra arguments go to `loract fit`, e.g.  bash scripts/main.sh --trainer.max_steps=10
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/loract fit --config configs/smollm2/baseline.yaml --config configs/smollm2/loract.yaml "$@"
