"""The LoRAct callback inside real Lightning fits on the CPU."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import KNOWN_MAX_RANK, KnownRankNet, tiny_llama
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lit_models import (
    KnownRankModule,
    fit,
    known_rank_loader,
    logged_rows,
    parameters_of,
    saved_tensor_hooks_installed,
    trainer,
)

from loract_lightning import CompressionOptions, LoRAct

LOSSLESS_RANK = KNOWN_MAX_RANK + 12
MODES = {"default": {}, "layer": {"checkpoint": ["KnownRankBlock"]}}


def structure_of(module: torch.nn.Module) -> list:
    return [
        (name, dict(m._forward_pre_hooks), dict(m._forward_hooks), "forward" in vars(m))
        for name, m in module.named_modules()
    ]


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize(
    "setting",
    [
        {},
        {"accumulate_grad_batches": 2},
        {"module_options": {"manual": True}},
    ],
    ids=["automatic", "accumulation", "manual"],
)
def test_lossless_fit_ends_with_the_uncompressed_parameters(tmp_path, mode, setting):
    expected = parameters_of(fit(tmp_path, **setting))
    # Every saved tensor (saved_by=None): lossless at this rank, so nothing may change.
    callback = LoRAct(rank=LOSSLESS_RANK, min_bytes=0, saved_by=None, **MODES[mode])
    module = fit(tmp_path, [callback], **setting)
    assert callback.step_stats.compressed > 0
    torch.testing.assert_close(parameters_of(module), expected, rtol=1e-4, atol=1e-6)


def test_only_training_forwards_are_compressed(tmp_path):
    callback = LoRAct(rank=8, min_bytes=0)
    module = fit(tmp_path, [callback], num_sanity_val_steps=1)
    seen = module.hooks_seen
    assert seen["train"] and all(seen["train"])
    assert seen["validation"] and not any(seen["validation"])
    t = trainer(tmp_path, [callback])
    t.test(module, known_rank_loader(batches=1))
    t.predict(module, known_rank_loader(batches=1))
    assert seen["test"] and not any(seen["test"]) and seen["predict"] and not any(seen["predict"])


def test_manual_optimization_compresses_every_forward_of_the_step(tmp_path):
    callback = LoRAct(rank=8, min_bytes=0)
    module = fit(tmp_path, [callback], module_options={"manual": True, "forwards_per_step": 2})
    assert all(module.hooks_seen["train"])
    single = LoRAct(rank=8, min_bytes=0)
    fit(tmp_path, [single], module_options={"manual": True, "forwards_per_step": 1})
    # Same total data per step in two halves: twice the factorizations of one whole-batch forward.
    assert callback.step_stats.compressed == 2 * single.step_stats.compressed


def test_model_is_restored_after_fit_and_after_a_failing_step(tmp_path):
    pl.seed_everything(0, verbose=False)
    module = KnownRankModule(fail_at_step=1)
    before = structure_of(module)
    callback = LoRAct(rank=8, min_bytes=0, checkpoint=["KnownRankBlock"])
    with pytest.raises(RuntimeError, match="failure inside training_step"):
        trainer(tmp_path, [callback]).fit(module, known_rank_loader())
    assert not saved_tensor_hooks_installed()
    assert not callback.installed
    assert structure_of(module) == before
    module.fail_at_step = None
    trainer(tmp_path, [callback]).fit(module, known_rank_loader())  # a second fit in the same process
    assert structure_of(module) == before and not saved_tensor_hooks_installed()


def test_metrics_reach_the_csv_logger(tmp_path):
    logger = CSVLogger(tmp_path, name="run")
    fit(tmp_path, [LoRAct(rank=8, min_bytes=0)], logger=logger, log_every_n_steps=1)
    rows = logged_rows(logger, "loract/ratio")
    assert len(rows) == 4
    for row in rows:
        assert 0 < float(row["loract/ratio"]) <= 1
        assert float(row["loract/stored_bytes"]) < float(row["loract/saved_bytes"])
        assert float(row["loract/compress_ms"]) > 0


def test_log_every_n_steps_is_respected(tmp_path):
    logger = CSVLogger(tmp_path, name="run")
    fit(tmp_path, [LoRAct(rank=8, min_bytes=0)], logger=logger, log_every_n_steps=2)
    rows = logged_rows(logger, "loract/ratio")
    assert len(rows) == 2


def test_fit_start_summary_counts_pattern_matches(tmp_path, caplog):
    callback = LoRAct(rank=8, min_bytes=0, layers={"net.blocks.*.up": 4, "net.blocks.1*": None})
    with caplog.at_level("INFO"):
        fit(tmp_path, [callback])
    assert "LoRAct: default mode, tensors saved by Linear, Conv1d, Conv2d, Conv3d, Conv1D, rank 8" in caplog.text
    assert "layers['net.blocks.*.up'] -> 4: matches 2 modules" in caplog.text


def test_resume_restores_config_and_warns_on_differences(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(tmp_path, [LoRAct(rank=8, min_bytes=0), checkpoint], enable_checkpointing=True, max_steps=2)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    state = next(v for k, v in saved["callbacks"].items() if k.startswith("LoRAct"))
    assert state["options"]["rank"] == 8 and state["generator_states"]

    resumed = LoRAct(rank=8, min_bytes=0)
    module = KnownRankModule()
    trainer(tmp_path, [resumed], max_steps=6, max_epochs=2).fit(
        module, known_rank_loader(), ckpt_path=tmp_path / "ckpt" / "last.ckpt"
    )
    assert resumed.step_stats.compressed > 0

    with pytest.warns(UserWarning, match=r"rank: checkpoint 8, now 0.25"):
        trainer(tmp_path, [LoRAct(rank=0.25, min_bytes=0)], max_steps=4).fit(
            KnownRankModule(), known_rank_loader(), ckpt_path=tmp_path / "ckpt" / "last.ckpt"
        )


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_fit_matches_the_uncompressed_one(tmp_path, precision):
    callback = LoRAct(rank=LOSSLESS_RANK, min_bytes=0)
    expected = parameters_of(fit(tmp_path, precision=precision))
    module = fit(tmp_path, [callback], precision=precision)
    assert callback.step_stats.compressed > 0
    torch.testing.assert_close(parameters_of(module), expected, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rank": 0}, "rank must be"),
        ({"method": "qr"}, "method must be one of"),
        ({"layers": {"x": 2.0}}, r"layers\['x'\] must be"),
        ({"checkpoint": "Block"}, "checkpoint must be a list"),
        ({"compress_outside": "yes"}, "compress_outside must be True or False, got 'yes'"),
    ],
)
def test_bad_options_fail_at_construction(options, message):
    with pytest.raises((ValueError, TypeError), match=message):
        LoRAct(**options)


def test_a_saved_by_name_that_matches_no_class_fails_at_fit_start(tmp_path):
    """A typo would otherwise compress nothing, silently."""
    with pytest.raises(ValueError, match=r"saved_by class name\(s\) \['linear'\] match no module of KnownRankModule"):
        fit(tmp_path, [LoRAct(saved_by=["linear"])])


def test_loract_takes_every_compression_option_by_name_with_the_same_defaults():
    # LoRAct's docstring points to CompressionOptions for their meaning: they must be the same set.
    names = [field.name for field in dataclasses.fields(CompressionOptions)]
    assert list(inspect.signature(LoRAct).parameters) == names
    assert LoRAct().options == CompressionOptions()
    # ... and CompressionOptions' docstring, the one full description, describes each of them.
    described = set(re.findall(r"^        (\w+): ", CompressionOptions.__doc__, flags=re.MULTILINE))
    assert described == set(names)


@pytest.mark.slow
def test_a_real_model_trains_at_rank_one_eighth(tmp_path):
    pytest.importorskip("transformers")

    class TinyLlama(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_llama(hidden=128, intermediate=512, vocab=512, max_position_embeddings=64)

        def training_step(self, batch, batch_idx):
            loss = self.model(input_ids=batch[0], labels=batch[0]).loss
            self.log("train_loss", loss, on_step=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=3e-3)

    pl.seed_everything(0, verbose=False)
    ids = torch.randint(0, 512, (8, 64))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=8)
    logger = CSVLogger(tmp_path, name="llama")
    callback = LoRAct(rank=0.125, min_bytes=1 << 16)
    trainer(tmp_path, [callback], max_epochs=15, logger=logger, log_every_n_steps=1).fit(TinyLlama(), loader)
    losses = [float(row["train_loss"]) for row in logged_rows(logger, "train_loss")]
    # The defaults compress linear layers' inputs only (ratio 0.83 on this Llama; 0.54 with saved_by=None).
    assert callback.step_stats.compressed > 0 and callback.step_stats.ratio < 0.9
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.slow
def test_ddp_two_processes(tmp_path):
    script = Path(__file__).with_name("ddp_fit.py")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, check=True, timeout=300)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for result in results:
        assert result["compressed"] > 0 and 0 < result["ratio"] < 1
        assert result["train_hooks"] and not result["hooks_left"]
    assert results[0]["parameters"] == pytest.approx(results[1]["parameters"])
    # The monitor combines the ranks' figures and only rank zero writes the report.
    assert results[0]["report_files"] == 3 and results[1]["report_files"] == 0
    assert results[0]["report_saved_bytes"] == pytest.approx(results[1]["report_saved_bytes"])
    assert len(list((tmp_path / "report").iterdir())) == 3


class PlainKnownRankModule(pl.LightningModule):
    """No Python side effects in training_step and no dropout, so torch.compile traces it whole."""

    def __init__(self) -> None:
        super().__init__()
        self.net = KnownRankNet(dropout=0.0)

    def training_step(self, batch, batch_idx):
        return self.net(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("mode", sorted(MODES))
def test_compiled_module_trains_like_the_uncompressed_compiled_one(tmp_path, mode):
    def compiled_fit(callbacks) -> torch.Tensor:
        pl.seed_everything(0, verbose=False)
        module = PlainKnownRankModule()
        trainer(tmp_path, callbacks, max_epochs=2).fit(torch.compile(module), known_rank_loader())
        return parameters_of(module)

    expected = compiled_fit([])
    # Compiled code runs no module hooks: every tensor is the root's, so saved_by must allow it.
    callback = LoRAct(rank=LOSSLESS_RANK, min_bytes=0, saved_by=None, **MODES[mode])
    actual = compiled_fit([callback])
    assert callback.step_stats.compressed > 0
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6)
