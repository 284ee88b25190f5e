"""The README's four forms (callback, strategy, Fabric + litgpt, Hugging Face Trainer): each snippet
of its "Where it runs" section runs as written, on tiny stand-ins for the user's objects."""

from __future__ import annotations

import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import KnownRankBlock, tiny_llama
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

README = Path(__file__).parents[1] / "README.md"
FORMS = ["callback", "strategy", "fabric_litgpt", "hf_trainer"]


def snippets() -> dict[str, str]:
    section = README.read_text().split("\n## Where it runs:")[1].split("\n## ")[0]
    code = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(code) == len(FORMS), "the section's snippets changed: update FORMS and the stand-ins"
    return dict(zip(FORMS, code, strict=True))


class Block(KnownRankBlock):
    """A block class named as the snippets name it."""


class LitModel(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(Block(128), Block(128))

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def lightning_namespace() -> dict:
    pl.seed_everything(0, verbose=False)
    # 16 x 128 x 128 floats: each block input is 1 MiB, LoRAct's default min_bytes.
    inputs = torch.randn(32, 128, 128)
    return {"lit_model": LitModel(), "train_loader": DataLoader(TensorDataset(inputs), batch_size=16), "Block": Block}


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the snippets' default loggers, checkpoints and output_dir write here


def test_callback_snippet():
    namespace = lightning_namespace()
    exec(snippets()["callback"], namespace)
    assert 0 < float(namespace["trainer"].logged_metrics["loract/ratio"]) < 1


def test_strategy_snippet():
    namespace = lightning_namespace()
    exec(snippets()["strategy"], namespace)
    strategy = namespace["trainer"].strategy
    assert strategy.loract.step_stats.compressed > 0
    assert namespace["fsdp"].loract.options.checkpoint == ("Block",)


def test_fabric_litgpt_snippet():
    pytest.importorskip("litgpt.model", reason="litgpt is a test-only extra: pip install --no-deps litgpt")
    namespace = {"batches": [torch.randint(0, 50_000, (2, 129), generator=torch.Generator().manual_seed(0))]}
    with pytest.warns(UserWarning, match="compressed nothing"):  # 256 tokens: block inputs under min_bytes
        exec(snippets()["fabric_litgpt"], namespace)
    assert namespace["stats"].saved_bytes > 0 and namespace["compressor"].checkpointed_modules


def test_hf_trainer_snippet():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = tiny_llama(hidden=64, layers=2)
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(0, 1000, (16, 32))
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    namespace = {"peft_model": model, "train_dataset": dataset}
    with pytest.warns(UserWarning, match="compressed nothing"):  # tiny: block inputs under min_bytes
        exec(snippets()["hf_trainer"], namespace)
    stats = namespace["callback"].step_stats
    assert stats.saved_bytes > 0 and namespace["callback"].compressor.checkpointed_modules
