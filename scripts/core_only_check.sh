#!/usr/bin/env bash
# Core-only install check, in a fresh venv in a temp dir (removed on exit): `pip install` the
# checkout without extras; there ActivationMemoryMonitor must refuse at construction, naming
# the `report` extra, and LoRAct must fit. Then add the extra: a fit with both callbacks must
# complete and write the report (scripts/core_only_fit.py). TORCH=... picks the torch pin.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH="${TORCH:-torch==2.14.1}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
start=$SECONDS

# Build from a copy of the checkout (tracked and untracked files, not ignored ones): a
# non-editable install as from PyPI, and no build/ left in the checkout.
mkdir "$work/src"
(cd "$repo" && git ls-files -z -co --exclude-standard | tar --null -T - --ignore-failed-read -cf -) \
    | tar -xf - -C "$work/src"
"$PYTHON" -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip install -q "$TORCH" "$work/src"
echo "core_only_check: core install took $((SECONDS - start)) s"

cd "$work"  # not the checkout, so the installed package is the one imported
"$py" "$repo/scripts/core_only_fit.py" core
"$py" -m pip install -q "$work/src[report]"
"$py" "$repo/scripts/core_only_fit.py" report
echo "core_only_check: passed in $((SECONDS - start)) s"
