"""The strategy form (loract_lightning.strategies) in real Lightning fits on the CPU, and where the
``loract/*`` metrics go for both forms; DDP and FSDP run in 2 processes (strategy_fit.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import KNOWN_MAX_RANK
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lit_models import KnownRankModule, fit, known_rank_loader, logged_rows, parameters_of, trainer

from loract_lightning import ActivationMemoryMonitor, LoRAct
from loract_lightning.strategies import (
    LoRActDDPStrategy,
    LoRActFSDPStrategy,
    LoRActModelParallelStrategy,
    LoRActStrategy,
)

LOSSLESS_RANK = KNOWN_MAX_RANK + 12
MODES = {"default": {}, "layer": {"checkpoint": ["KnownRankBlock"]}}
METRICS = ["loract/saved_bytes", "loract/stored_bytes", "loract/ratio", "loract/compress_ms", "loract/mean_rank"]


@pytest.mark.parametrize("mode", sorted(MODES))
def test_the_strategy_alone_compresses_training_only_and_a_lossless_fit_is_unchanged(tmp_path, mode):
    expected = parameters_of(fit(tmp_path))
    strategy = LoRActStrategy(rank=LOSSLESS_RANK, min_bytes=0, saved_by=None, **MODES[mode])
    module = fit(tmp_path, strategy=strategy, num_sanity_val_steps=1)
    assert strategy.loract in module.trainer.callbacks
    assert strategy.loract.step_stats.compressed > 0
    seen = module.hooks_seen
    assert seen["train"] and all(seen["train"])
    assert seen["validation"] and not any(seen["validation"])
    torch.testing.assert_close(parameters_of(module), expected, rtol=1e-4, atol=1e-6)


def test_registered_names_build_the_strategies_with_loract_defaults(tmp_path):
    pl.seed_everything(0, verbose=False)
    t = trainer(tmp_path, strategy="loract")
    assert type(t.strategy) is LoRActStrategy and t.strategy.root_device == torch.device("cpu")
    assert t.strategy.loract.options == LoRAct().options
    module = KnownRankModule()
    # Batches of 16: the block inputs reach the default min_bytes (1 MiB).
    t.fit(module, known_rank_loader(batches=2, batch_size=16))
    assert t.strategy.loract.step_stats.compressed > 0
    kinds = {"loract_ddp": LoRActDDPStrategy, "loract_fsdp": LoRActFSDPStrategy}
    kinds["loract_model_parallel"] = LoRActModelParallelStrategy
    for name, kind in kinds.items():
        assert type(pl.Trainer(accelerator="cpu", strategy=name, logger=False).strategy) is kind


def test_the_strategy_takes_loract_options_and_refuses_what_loract_refuses(tmp_path):
    strategy = LoRActDDPStrategy(rank=0.25, checkpoint=["Block"], find_unused_parameters=True)
    assert strategy.loract.options == LoRAct(rank=0.25, checkpoint=["Block"]).options
    assert strategy._ddp_kwargs == {"find_unused_parameters": True}
    with pytest.raises(ValueError, match="rank must be"):
        LoRActStrategy(rank=0)
    # DDP passes unknown keywords on to torch's DistributedDataParallel, which would refuse them late.
    message = r"rnak=0.25 is neither a LoRAct option nor an argument of DDPStrategy; did you mean 'rank'\?"
    with pytest.raises(ValueError, match=message):
        LoRActDDPStrategy(rnak=0.25)
    with pytest.raises(ValueError, match=r"trains on one device, but the Trainer asks for 2 .*strategy='loract_ddp'"):
        trainer(tmp_path, strategy="loract", devices=2)


def test_a_loract_callback_beside_the_strategy_is_refused(tmp_path):
    with pytest.raises(ValueError, match="LoRActStrategy compresses the training forward itself.*LoRAct callback"):
        fit(tmp_path, [LoRAct()], strategy=LoRActStrategy())


FORMS = {
    "callback": lambda **options: ([LoRAct(**options)], "auto"),
    "strategy": lambda **options: ([], LoRActStrategy(**options)),
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_metrics_reach_logged_metrics_and_a_checkpoint_monitor(tmp_path, form):
    callbacks, strategy = FORMS[form](rank=8, min_bytes=0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="loract/ratio", mode="min", every_n_train_steps=1)
    logger = CSVLogger(tmp_path, name="run")
    module = fit(
        tmp_path, [*callbacks, checkpoint], strategy=strategy, logger=logger, log_every_n_steps=2,
        enable_checkpointing=True,
    )  # fmt: skip
    logged = module.trainer.logged_metrics
    assert set(METRICS) <= set(logged)
    assert 0 < float(logged["loract/ratio"]) < 1 and float(logged["loract/mean_rank"]) == 8
    # The monitor saw the step's value every step, not only on the steps that were logged.
    assert checkpoint.best_model_score is not None and 0 < float(checkpoint.best_model_score) < 1
    assert len(list((tmp_path / "ckpt").iterdir())) == 1
    saved = torch.load(checkpoint.best_model_path, weights_only=False)
    state = next(value for key, value in saved["callbacks"].items() if key.startswith("LoRAct"))
    assert state["options"]["rank"] == 8


def test_a_resume_restores_the_strategy_callback_state_from_either_form(tmp_path):
    """Both forms keep the same state under the same key, so a run may switch forms on resume."""
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(tmp_path, [LoRAct(rank=8, min_bytes=0), checkpoint], enable_checkpointing=True, max_steps=2)
    strategy = LoRActStrategy(rank=0.25, min_bytes=0)
    with pytest.warns(UserWarning, match=r"rank: checkpoint 8, now 0.25"):
        trainer(tmp_path, strategy=strategy, max_steps=6, max_epochs=2).fit(
            KnownRankModule(), known_rank_loader(), ckpt_path=tmp_path / "ckpt" / "last.ckpt"
        )
    assert strategy.loract.step_stats.compressed > 0


@pytest.mark.parametrize("form", sorted(FORMS))
def test_beside_loract_the_monitor_logs_no_second_copy_of_its_bytes(tmp_path, form):
    callbacks, strategy = FORMS[form](rank=8, min_bytes=0)
    monitor = ActivationMemoryMonitor(output_dir=str(tmp_path / "report"))
    logger = CSVLogger(tmp_path, name="run")
    module = fit(tmp_path, [*callbacks, monitor], strategy=strategy, logger=logger, log_every_n_steps=1)
    assert "loract/saved_bytes" in module.trainer.logged_metrics
    # The monitor's metrics go to the loggers only (its errors are not measured every step).
    assert len(logged_rows(logger, "loract/saved_bytes")) == len(logged_rows(logger, "memory/peak_bytes")) == 4
    assert not logged_rows(logger, "memory/activations_saved_bytes")
    assert not logged_rows(logger, "memory/activations_stored_bytes")


SCRIPT = Path(__file__).with_name("strategy_fit.py")


@pytest.fixture(scope="module")
def distributed_runs(tmp_path_factory) -> tuple[dict, dict]:
    """Every run of strategy_fit.RUNS in one 2-process launch (both ranks started at once, as in test_fsdp)."""
    out_dir = tmp_path_factory.mktemp("strategies")
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(SCRIPT.parent), os.environ.get("PYTHONPATH")])),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": "2",
        "NODE_RANK": "0",
    }
    ranks = [
        subprocess.Popen([sys.executable, str(SCRIPT), str(out_dir)], env={**env, "LOCAL_RANK": str(rank)})
        for rank in (0, 1)
    ]
    try:
        codes = [process.wait(timeout=400) for process in ranks]
    finally:
        for process in ranks:
            process.kill()
    assert codes == [0, 0]
    return tuple(torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in (0, 1))


@pytest.mark.slow
@pytest.mark.parametrize(
    "run",
    ["ddp_loract", "ddp_loract_layer", "fsdp_loract_layer", "fsdp_policy_loract_layer", "fsdp2_loract_layer",
     "fsdp2_wrapped_loract_layer"],
)  # fmt: skip
def test_distributed_strategy_fits_like_its_plain_twin(distributed_runs, run):
    from strategy_fit import RUNS

    twin = RUNS[run].twin
    for result in distributed_runs:
        assert "error" not in result[run], result[run].get("error")
        assert "error" not in result[twin], result[twin].get("error")
        assert result[run]["compressed"] > 0 and not result[run]["hooks_left"]
        assert result[run]["train_hooks"] and all(result[run]["train_hooks"])
        assert result[run]["validation_hooks"] and not any(result[run]["validation_hooks"])
        assert set(METRICS) <= set(result[run]["logged_metrics"])
        for name, value in result[twin]["parameters"].items():
            torch.testing.assert_close(result[run]["parameters"][name], value, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_layer_mode_under_fsdp_checkpointing_recomputes_each_block_once(distributed_runs):
    """Block forwards per rank, 2 blocks x 2 steps: 4 without checkpointing, 8 with one recompute
    per block (12 would be a recompute inside a recompute). FSDP1's activation_checkpointing_policy
    and FSDP2 blocks in a checkpoint_wrapper, each alone and with LoRAct's layer mode."""
    for result in distributed_runs:
        assert not [run for run, outcome in result.items() if "error" in outcome]
        calls = {run: outcome["block_forwards"] for run, outcome in result.items()}
        assert calls["fsdp_plain"] == calls["fsdp2_plain"] == 4
        assert calls["fsdp_policy_plain"] == calls["fsdp2_wrapped_plain"] == 8
        assert calls["fsdp_loract_layer"] == calls["fsdp2_loract_layer"] == 8
        assert calls["fsdp_policy_loract_layer"] == calls["fsdp2_wrapped_loract_layer"] == 8
        for run in ("fsdp_policy_loract_layer", "fsdp2_wrapped_loract_layer"):
            assert any("already run under" in w for w in result[run]["warnings"]), run
