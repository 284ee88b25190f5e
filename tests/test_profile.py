"""Rank profiling: the numbers match an exact SVD, the chosen ranks meet their target, `loract profile` works."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from examples.configs import CONFIG_DIR, config_arguments
from loract_lightning.cli import main
from loract_lightning.linalg import relative_error, truncated_svd
from loract_lightning.policy import resolve_rank
from loract_lightning.rank_profile import CANDIDATE_FRACTIONS, TARGET_ERRORS, RankProfile
from loract_lightning.rank_profiler import RankProfiler

ROOT = Path(__file__).resolve().parents[1]


def spectrum_matrix(rows: int, cols: int, decay: float, seed: int = 0) -> torch.Tensor:
    """A matrix with singular values decay**i: a slowly (0.97) or quickly (0.7) decaying spectrum."""
    generator = torch.Generator().manual_seed(seed)
    left, _ = torch.linalg.qr(torch.randn(rows, cols, generator=generator))
    right, _ = torch.linalg.qr(torch.randn(cols, cols, generator=generator))
    return (left * decay ** torch.arange(cols, dtype=torch.float32)) @ right.T


@pytest.fixture
def profile() -> RankProfile:
    measured = RankProfile()
    measured.observe("slow", spectrum_matrix(512, 128, decay=0.97))
    measured.observe("fast", spectrum_matrix(512, 128, decay=0.7, seed=1))
    measured.observe("fast", spectrum_matrix(256, 128, decay=0.7, seed=2))
    measured.steps = 1
    return measured


def test_optimal_errors_match_an_exact_svd_of_the_same_tensors():
    matrices = [spectrum_matrix(512, 128, decay=0.9), spectrum_matrix(300, 128, decay=0.95, seed=3)]
    measured = RankProfile()
    for matrix in matrices:
        measured.observe("module", matrix)
    spectrum = measured.modules["module"]
    for index, fraction in enumerate(CANDIDATE_FRACTIONS):
        residual = sum(
            relative_error(m, *truncated_svd(m, resolve_rank(fraction, *m.shape))) ** 2 * m.square().sum()
            for m in matrices
        )
        expected = float(residual / sum(m.square().sum() for m in matrices)) ** 0.5
        assert spectrum.optimal_errors()[index] == pytest.approx(expected, rel=1e-3, abs=1e-5)
        assert spectrum.method_errors()[index] >= spectrum.optimal_errors()[index] - 1e-4
    assert spectrum.saved_bytes == sum(m.numel() * 4 for m in matrices)


def test_rank_needed_for_a_target_is_the_smallest_that_meets_it():
    matrix = spectrum_matrix(400, 100, decay=0.8)
    measured = RankProfile()
    measured.observe("module", matrix)
    singular = torch.linalg.svdvals(matrix).double()
    for target in TARGET_ERRORS:
        rank = round(measured.modules["module"].needed_fraction[target] * 100)
        error_at = lambda k: float((singular[k:] ** 2).sum().sqrt() / singular.norm())  # noqa: E731
        assert error_at(rank) <= target < error_at(rank - 1)


def test_layers_for_an_error_target_meet_it_with_the_fewest_bytes(profile):
    layers = profile.layers_for_error(0.3)
    for name, fraction in layers.items():
        errors = profile.modules[name].method_errors()
        if fraction is None:
            assert min(errors) > 0.3
            continue
        index = CANDIDATE_FRACTIONS.index(fraction)
        assert errors[index] <= 0.3
        assert all(error > 0.3 for error in errors[:index])
    assert layers["fast"] is not None and layers["fast"] < (layers["slow"] or 1.0)


@pytest.mark.parametrize("budget", [0.15, 0.3, 0.6])
def test_layers_for_a_memory_budget_fit_in_it(profile, budget):
    layers = profile.layers_for_budget(budget)
    assert profile.stored_ratio(layers) <= budget
    # A larger budget never gives a worse (size-weighted) error.
    looser = profile.layers_for_budget(min(budget * 1.5, 0.99))
    assert profile.stored_ratio(looser) >= profile.stored_ratio(layers)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p: p.layers_for_error(1.5), "max_error must be a number in (0, 1), got 1.5"),
        (lambda p: p.layers_for_budget(0), "memory_budget must be a number in (0, 1), got 0"),
        (lambda p: RankProfiler(batches=0), "batches must be an int >= 1, got 0"),
        (lambda p: RankProfile(method="svd"), "method must be one of"),
    ],
)
def test_bad_input_names_the_value(profile, call, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call(profile)


@pytest.mark.slow
def test_profile_command_writes_a_layers_block_that_loads_back(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    saved_config = ROOT / "config.yaml"  # what LightningCLI would save for a logger-less run
    saved_config.unlink(missing_ok=True)
    overlay = yaml.safe_load((CONFIG_DIR / "vision" / "loract.yaml").read_text())
    loract = overlay["trainer"]["callbacks+"][0]["init_args"]
    loract["layers"] = {"*.attn": None}  # an entry the profile must keep
    config = tmp_path / "loract_attention_raw.yaml"
    config.write_text(yaml.safe_dump(overlay))
    run = [*config_arguments("vision/baseline"), "--config", str(config)]
    main(["profile", *run, "--batches", "1", "--max_error", "0.3", f"--output_dir={tmp_path}"])
    assert not saved_config.exists(), "loract profile wrote the run's config.yaml into the working directory"
    printed = capsys.readouterr().out
    assert "layers:" in printed
    for name in ("rank_profile.json", "rank_profile.png", "loract_layers.yaml"):
        assert (tmp_path / name).stat().st_size > 0
    layers = yaml.safe_load((tmp_path / "loract_layers.yaml").read_text())["layers"]
    assert layers and all(rank is None or 0 < rank <= 0.5 for rank in layers.values())
    # The config's own None entries stay out of the profile and come first in the block.
    assert next(iter(layers.items())) == ("*.attn", None)
    assert not any(name.endswith(".attn") for name in list(layers)[1:])
    # The block pasted into the LoRAct callback's init_args runs.
    loract["layers"] = layers
    config.write_text(yaml.safe_dump(overlay))
    main(["fit", *run, "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}"])


@pytest.mark.slow
def test_profile_leaves_the_trainer_callbacks_as_they_were(tmp_path):
    from lightning.pytorch import Callback, LightningDataModule
    from lit_models import KnownRankModule, known_rank_loader

    from loract_lightning import ActivationMemoryMonitor, LoRAct
    from loract_lightning.profiling_trainer import ProfilingTrainer

    class CountHookedSteps(Callback):
        steps = 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.steps += 1

    loract, monitor, counter = LoRAct(rank=0.25, min_bytes=0, min_rank=1), ActivationMemoryMonitor(), CountHookedSteps()
    trainer = ProfilingTrainer(
        callbacks=[loract, monitor, counter], max_epochs=1, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path,
    )  # fmt: skip
    data = LightningDataModule.from_datasets(
        train_dataset=known_rank_loader(batches=4, batch_size=64).dataset, batch_size=64
    )
    layers = trainer.profile(KnownRankModule(), data, batches=2, output_dir=tmp_path)
    assert layers and all(0 < rank <= 0.5 for rank in layers.values())
    assert counter.steps == 2  # the profiler stopped the fit after its batches
    assert loract.compressor is None and monitor.report.steps == 0  # they sat the run out
    assert [c for c in trainer.callbacks if c in (loract, monitor, counter)] == [loract, monitor, counter]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--max_error", "1.5"], "max_error"),
        (["--batches", "0"], "batches"),
    ],
)
def test_profile_command_rejects_bad_input_before_the_run(arguments, message, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit):
        main(["profile", *config_arguments("vision/loract"), *arguments])
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_profile_command_reports_a_run_that_does_not_train(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    with pytest.raises(FileNotFoundError, match="missing"):
        main(["profile", *config_arguments("vision/loract"), f"--data.init_args.data_dir={tmp_path / 'missing'}"])
