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

# The installed command, from an empty folder, on a user's own module file (as the README says).
mkdir "$work/user" && cd "$work/user"
cat > my_module.py <<'PY'
import torch
from lightning.pytorch import LightningModule
from torch.utils.data import DataLoader, TensorDataset


class MyModel(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        x = torch.randn(512, 128)
        return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=256)
PY
loract="$work/venv/bin/loract"
version="$("$loract" --version)"
[ "$version" = "loract-lightning $("$py" -c 'import loract_lightning; print(loract_lightning.__version__)')" ] \
    || { echo "FAIL: loract --version printed '$version'"; exit 1; }
"$loract" fit --trainer.callbacks.help LoRAct | grep -q "factor rank:" \
    || { echo "FAIL: --trainer.callbacks.help LoRAct does not describe rank"; exit 1; }
"$loract" fit --model my_module.MyModel --trainer.callbacks+=LoRAct --trainer.callbacks.rank=0.25 \
    --trainer.callbacks.min_bytes=0 --trainer.max_steps=2 --trainer.enable_progress_bar=false \
    --trainer.logger=false --trainer.enable_checkpointing=false
echo "ok: $version; loract fit on ./my_module.py with --trainer.callbacks+=LoRAct from an empty folder"
cd "$work"
"$py" -m pip install -q "$work/src[report]"
"$py" "$repo/scripts/core_only_fit.py" report
echo "core_only_check: passed in $((SECONDS - start)) s"
