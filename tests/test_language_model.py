"""The causal-LM example's data module and the run summary the main job ends with."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import pytest
import torch
from lit_models import KnownRankModule, known_rank_loader

from examples.language_model import CharTokenizer, ShakespeareDataModule, read_corpus
from examples.summary import RunSummary
from loract_lightning import LoRAct


@pytest.fixture
def text_folder(tmp_path):
    (tmp_path / "a.txt").write_text("To be, or not to be, that is the question. " * 40)
    (tmp_path / "b.txt").write_text("All the world's a stage, and all the men and women merely players. " * 30)
    return tmp_path


def test_windows_split_the_corpus_without_overlap(text_folder):
    data = ShakespeareDataModule(data_dir=str(text_folder), seq_len=32, batch_size=4, max_val_windows=5)
    data.setup("fit")
    text = read_corpus(str(text_folder), 1_000_000)
    boundary = int(0.9 * len(text))
    tokenizer = CharTokenizer(text[:boundary])
    train = data.splits["train"].tensors[0]
    val = data.splits["val"].tensors[0]
    # Train windows are the first 90% of the text, in order; validation windows come after it.
    assert torch.equal(train.flatten(), tokenizer.encode(text[:boundary])[: train.numel()])
    assert torch.equal(val.flatten(), tokenizer.encode(text[boundary:])[: val.numel()])
    assert train.shape == ((boundary // 32), 32) and val.shape == (5, 32)
    assert data.vocab_size == tokenizer.vocab_size


def test_missing_text_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no .txt files"):
        read_corpus(str(tmp_path), 100)


class LogsValidationLoss(KnownRankModule):
    def on_train_start(self) -> None:
        self.log("val_loss_before", 2.0)

    def on_train_end(self) -> None:
        self.trainer.callback_metrics["val_loss"] = torch.tensor(1.5)


def test_run_summary_reports_loss_memory_and_time(caplog):
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[LoRAct(rank=8, min_bytes=0), RunSummary()],
    )  # fmt: skip
    with caplog.at_level(logging.INFO):
        trainer.fit(LogsValidationLoss(), known_rank_loader(batches=2))
    summary = caplog.text[caplog.text.index("Run summary") :]
    assert "validation perplexity  7.39 -> 4.48  (loss 2.0000 -> 1.5000, -25.0%)" in summary
    assert "MiB saved ->" in summary and "stored / saved" in summary
    assert "default mode: saved = uncompressed)" in summary
    assert "peak memory" in summary and "min (training loop)" in summary
