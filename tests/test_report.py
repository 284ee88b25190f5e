"""The report's pieces: readable in a log file, charts that go to the loggers, the profile's heatmap."""

from __future__ import annotations

import io
from unittest.mock import MagicMock

import matplotlib
import pytest
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger
from rich.console import Console

from loract_lightning.rank_profile import CANDIDATE_FRACTIONS
from loract_lightning.report import (
    MemoryReport,
    common_prefix,
    log_figures,
    rank_profile_chart,
    report_console,
)
from loract_lightning.stats import CompressionStats

matplotlib.use("Agg")


@pytest.mark.parametrize(
    ("names", "prefix"),
    [
        (["model.base_model.model.layers.0.mlp", "model.base_model.model.layers.1.mlp"], "model.base_model.model."),
        (["net.blocks.0.lin", "net.blocks.1.lin"], "net."),  # a numbered child keeps its container
        (["model.encoder.layer", "model.head"], "model."),
        (["encoder", "head"], ""),
        (["model.head"], ""),  # one name: nothing to share
        (["model.a", "(root)"], ""),
    ],
)
def test_common_prefix_leaves_names_that_say_where_they_are(names, prefix):
    assert common_prefix(names) == prefix


def long_named_report(compressed: bool) -> MemoryReport:
    report = MemoryReport(compressed=compressed)
    stats = CompressionStats()
    for layer in range(3):
        name = f"model.base_model.model.model.layers.{layer}.self_attn.q_proj.lora_dropout.default"
        stats.add_saved(name, 4 << 20)
        stats.add_stored(name, (1 << 20) if compressed else (4 << 20))
    report.add_step(stats, step=1, peak_bytes=1 << 30)
    return report


def test_the_table_is_not_cut_in_a_log_file(monkeypatch, capsys):
    monkeypatch.delenv("COLUMNS", raising=False)
    long_named_report(compressed=True).print_table(top_k=5)
    out = capsys.readouterr().out  # captured: not a terminal
    assert "layers.2.self_attn.q_proj.lora_dropout.default" in out  # whole, not "model.base_…"
    assert "…" not in out
    assert "module names under 'model.base_model.model.model.'" in " ".join(out.split())
    assert report_console().width == 200


def test_columns_still_sets_the_width(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    assert report_console().width == Console(file=io.StringIO()).width == 100


def test_alone_the_table_and_chart_show_saved_bytes_only(tmp_path, capsys):
    report = long_named_report(compressed=False)
    report.print_table(top_k=5)
    out = " ".join(capsys.readouterr().out.split())
    assert "uncompressed (no LoRAct callback)" in out and "share of total" in out
    assert "stored" not in out and "ratio" not in out
    _, figures = report.write(tmp_path, top_k=5)
    (bars, steps) = figures["activation_memory"].axes
    assert bars.get_legend() is None  # one kind of bar: saved
    assert [t.get_text() for t in steps.get_legend().get_texts()] == ["activations saved"]


def test_the_cpu_chart_does_not_present_resident_memory_as_activations(tmp_path):
    report = long_named_report(compressed=True)
    report.peak_label = "process peak resident memory, not activations"
    _, figures = report.write(tmp_path, top_k=5)
    figure = figures["activation_memory"]
    assert len(figure.axes) == 2  # no twin axis for the process's resident memory
    texts = [t.get_text() for ax in figure.axes for t in [ax.title, ax.yaxis.label]]
    assert not any("resident" in text for text in texts), texts
    report.chart_peaks = True  # CUDA: the step's peak allocated is drawn, and named for what it is
    report.peak_label = "CUDA peak allocated, all tensors"
    _, figures = report.write(tmp_path, top_k=5)
    assert any(
        "CUDA peak allocated, all tensors" in ax.yaxis.label.get_text() for ax in figures["activation_memory"].axes
    )


def test_figures_go_to_the_loggers_that_take_images(tmp_path):
    report = long_named_report(compressed=True)
    files, figures = report.write(tmp_path, top_k=5)
    pngs = {path.stem: path for path in files if path.suffix == ".png"}
    tensorboard, wandb, mlflow = (MagicMock(spec=cls) for cls in (TensorBoardLogger, WandbLogger, MLFlowLogger))
    mlflow.run_id = "run"
    csv = CSVLogger(tmp_path)
    sent = log_figures([tensorboard, wandb, mlflow, csv], figures, pngs, step=7)
    assert sent == ["mlflow", "tensorboard", "wandb"]  # not the CSV logger, which has the PNG in its folder
    tensorboard.experiment.add_figure.assert_called_once_with(
        "loract/activation_memory", figures["activation_memory"], global_step=7, close=False
    )
    wandb.log_image.assert_called_once_with(
        key="loract/activation_memory", images=[str(pngs["activation_memory"])], step=7
    )
    mlflow.experiment.log_artifact.assert_called_once_with(
        "run", str(pngs["activation_memory"]), artifact_path="loract"
    )


def profile_rows() -> list[dict]:
    rows = []
    for index, module in enumerate(["model.layers.0.mlp", "model.layers.1.mlp", "model.head"]):
        errors = [0.6 - 0.1 * k - 0.05 * index for k in range(len(CANDIDATE_FRACTIONS))]
        rows.append({"module": module, "method_error": errors, "optimal_error": [e - 0.03 for e in errors]})
    return rows


def test_rank_profile_is_a_heatmap_with_the_target_and_the_proposal_marked():
    rows = profile_rows()
    layers = {"model.layers.0.mlp": 0.25, "model.layers.1.mlp": 0.125, "model.head": None}
    figure = rank_profile_chart(rows, "sampled_qb", layers, max_error=0.3)
    axes, colorbar = figure.axes
    (image,) = axes.images
    assert image.get_array().shape == (len(rows), len(CANDIDATE_FRACTIONS))  # modules x ranks
    assert [t.get_text() for t in axes.get_xticklabels()] == ["1/32", "1/16", "1/8", "1/4", "1/2"]
    assert image.norm.vcenter == 0.3  # coloured against max_error
    assert any(line.get_ydata()[0] == 0.3 for line in colorbar.lines)  # and marked on the colour bar
    boxes = [(round(p.get_x() + 0.5), round(p.get_y() + 0.5)) for p in axes.patches]
    assert sorted(boxes) == [(2, 1), (3, 0)]  # (rank column, module row) of each proposed rank
    assert any(t.get_text().strip() == "raw" for t in axes.texts)  # the module kept raw says so
    assert "max_error 0.3" in axes.get_title()
