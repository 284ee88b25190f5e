"""The main job's plan of the longest context: printed when fit starts, leaving no trace on the model."""

from __future__ import annotations

import logging
import re

import lightning.pytorch as pl
import pytest
import torch

from examples.language_model import CausalLM, ShakespeareDataModule
from examples.longest_context import LongestContext
from loract_lightning import LoRAct


@pytest.mark.filterwarnings("ignore:LoRAct compressed nothing")
def test_the_plan_is_printed_and_changes_no_weight_gradient_or_random_state(tmp_path, caplog):
    pytest.importorskip("transformers")
    (tmp_path / "a.txt").write_text("To be, or not to be, that is the question. " * 200)
    pl.seed_everything(0, verbose=False)
    model = CausalLM(hidden_size=64, num_layers=2, num_heads=4, loss_chunk_tokens=32)
    data = ShakespeareDataModule(data_dir=str(tmp_path), seq_len=64, batch_size=2, max_val_windows=2)
    planner = LongestContext(lengths=[128, 256])
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1,
        callbacks=[LoRAct(min_bytes=0)],
    )  # fmt: skip
    trainer.fit(model, data)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    some = next(p for p in model.parameters())
    some.grad = torch.ones_like(some)
    rng = torch.get_rng_state()
    with caplog.at_level(logging.INFO):
        planner.on_fit_start(trainer, model)
    text = caplog.text[caplog.text.index("Longest context") :]
    assert "(this run's step, tensors only, at 2 x 64 tokens), planned from steps of [128, 256] tokens" in text
    found = dict(re.findall(r"(AC \+ chunked loss|LoRAct layer mode)\s+(\d+) tokens", text))
    assert set(found) == {"AC + chunked loss", "LoRAct layer mode"}
    assert all(int(tokens) > 0 for tokens in found.values())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, weights[name])
    assert torch.equal(some.grad, torch.ones_like(some)) and torch.equal(torch.get_rng_state(), rng)
    assert model.training
    with caplog.at_level(logging.INFO):
        LongestContext(lengths=[128, 256], budget="4MiB").on_fit_start(trainer, model)
    assert "Longest context in 4.0 MiB (the budget given)" in caplog.text


def test_bad_lengths_and_budgets_are_refused():
    with pytest.raises(ValueError, match=r"at least two distinct token counts >= 1, got \[512\]"):
        LongestContext(lengths=[512])
    with pytest.raises(ValueError, match=r"got '24 GiBs'"):
        LongestContext(budget="24 GiBs")
