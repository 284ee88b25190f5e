"""ActivationMemoryMonitor: agrees with the engine, alone and beside LoRAct; writes its report."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
from conftest import KnownRankNet
from lightning.pytorch.loggers import CSVLogger
from lit_models import KnownRankModule, fit, logged_rows

from loract_lightning import ActivationCompressor, ActivationMemoryMonitor, LoRAct


def per_step_total(monitor: ActivationMemoryMonitor, column: str) -> float:
    return sum(row[column] for row in monitor.report.rows())


def test_alone_it_reports_the_uncompressed_bytes_the_engine_counts(tmp_path):
    monitor = ActivationMemoryMonitor()
    logger = CSVLogger(tmp_path, name="alone")
    fit(tmp_path, [monitor], logger=logger, log_every_n_steps=1)

    pl.seed_everything(0, verbose=False)
    module = KnownRankModule()
    with ActivationCompressor(module, compress=False).capture() as stats:
        module.net(KnownRankNet.make_input())
    assert stats.saved_bytes > 0 and stats.stored_bytes == stats.saved_bytes
    assert per_step_total(monitor, "saved_bytes") == pytest.approx(stats.saved_bytes)
    assert per_step_total(monitor, "stored_bytes") == pytest.approx(stats.saved_bytes)
    rows = logged_rows(logger, "memory/activations_saved_bytes")
    assert len(rows) == 4
    for row in rows:
        assert float(row["memory/activations_saved_bytes"]) == stats.saved_bytes
        assert float(row["memory/activations_stored_bytes"]) == stats.saved_bytes
        assert float(row["memory/peak_bytes"]) > 0


def test_beside_loract_it_reads_loract_numbers_and_errors(tmp_path):
    loract = LoRAct(rank=8, min_bytes=0)
    monitor = ActivationMemoryMonitor(error_every_n_steps=2)
    logger = CSVLogger(tmp_path, name="beside")
    fit(tmp_path, [loract, monitor], logger=logger, log_every_n_steps=1)
    assert per_step_total(monitor, "saved_bytes") == pytest.approx(loract.step_stats.saved_bytes)
    assert per_step_total(monitor, "stored_bytes") == pytest.approx(loract.step_stats.stored_bytes)
    assert per_step_total(monitor, "stored_bytes") < per_step_total(monitor, "saved_bytes")
    error_rows = logged_rows(logger, "memory/reconstruction_error_mean")
    assert len(error_rows) == 2  # steps 0 and 2 of 4
    for row in error_rows:
        assert 0 < float(row["memory/reconstruction_error_mean"]) <= float(row["memory/reconstruction_error_max"]) < 1
    compressed = [row for row in monitor.report.rows() if row["ranks"]]
    assert compressed and all(row["error_mean"] is not None for row in compressed)


def test_report_table_and_files_go_to_the_logger_dir(tmp_path, capsys):
    logger = CSVLogger(tmp_path, name="files")
    monitor = ActivationMemoryMonitor(top_k=3)
    fit(tmp_path, [LoRAct(rank=8, min_bytes=0), monitor], logger=logger)
    out = " ".join(capsys.readouterr().out.split())  # rich wraps the title to the table's width
    assert "Activation memory per training step, with LoRAct (top 3 of" in out and "blocks.0" in out
    assert sorted(p.name for p in monitor.report_files) == [
        "activation_memory.csv", "activation_memory.json", "activation_memory.png",
    ]  # fmt: skip
    assert all(p.parent == Path(logger.log_dir) and p.stat().st_size > 0 for p in monitor.report_files)
    data = json.loads((Path(logger.log_dir) / "activation_memory.json").read_text())
    assert data["steps"] == 4 and data["modules"][0]["saved_bytes"] >= data["modules"][-1]["saved_bytes"]
    assert (Path(logger.log_dir) / "activation_memory.png").read_bytes()[:4] == b"\x89PNG"


def test_without_a_logger_it_prints_and_writes_to_the_given_dir(tmp_path, capsys):
    monitor = ActivationMemoryMonitor(output_dir=str(tmp_path / "report"))
    fit(tmp_path, [monitor], logger=False)
    out = " ".join(capsys.readouterr().out.split())  # rich wraps the title to the table's width
    assert "Activation memory per training step, uncompressed (no LoRAct callback)" in out
    assert "stored" not in out and "ratio" not in out  # alone, nothing is stored differently: saved only
    assert {p.name for p in (tmp_path / "report").iterdir()} == {
        "activation_memory.csv", "activation_memory.json", "activation_memory.png",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("options", "message"),
    [({"top_k": 0}, "top_k must be an int >= 1, got 0"), ({"error_every_n_steps": -1}, "error_every_n_steps must be")],
)
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        ActivationMemoryMonitor(**options)
