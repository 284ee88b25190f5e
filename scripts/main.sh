#!/usr/bin/env bash
# The main job: set up, then fine-tune MiniLM + LoRA on the drug reviews with LoRAct (default mode).
# Extra arguments go to `loract fit`, e.g.  bash scripts/main.sh --trainer.max_epochs=2
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/loract fit --config configs/text_loract.yaml "$@"
