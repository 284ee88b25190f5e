"""The text example's data: rotten tomatoes' fixed, seeded split, your own CSV, and the test metrics
of the best validation epoch (BestValidationTest, on a tiny model). No tokenizer, no MiniLM."""

from __future__ import annotations

import csv
import gzip

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from examples.text_classification import BestValidationTest, RottenTomatoesDataModule, seeded_split

UNIQUE_REVIEWS = 12_752  # fresh + rotten rows (12,808), identical texts kept once


@pytest.fixture(scope="module")
def split_seed_0() -> dict[str, tuple[list[str], list[int]]]:
    return RottenTomatoesDataModule(split_seed=0).split_texts()


def test_split_sizes_add_up_to_the_unique_reviews(split_seed_0):
    sizes = {split: len(texts) for split, (texts, labels) in split_seed_0.items()}
    assert sizes == {"train": 10_202, "validation": 1_275, "test": 1_275}
    assert sum(sizes.values()) == UNIQUE_REVIEWS
    assert all(len(texts) == len(labels) for texts, labels in split_seed_0.values())


def test_labels_are_binary_and_both_present_in_every_split(split_seed_0):
    for split, (_, labels) in split_seed_0.items():
        assert set(labels) == {0, 1}, split
        assert 0.3 < sum(labels) / len(labels) < 0.7, split  # fresh is 58% of the reviews


def test_no_text_in_two_splits(split_seed_0):
    sets = {split: set(texts) for split, (texts, _) in split_seed_0.items()}
    assert all(len(sets[split]) == len(texts) for split, (texts, _) in split_seed_0.items())  # no duplicate within
    assert not sets["train"] & sets["validation"]
    assert not sets["train"] & sets["test"]
    assert not sets["validation"] & sets["test"]


def test_plot_summaries_are_left_out_and_html_unescaped(split_seed_0):
    texts = [text for part, _ in split_seed_0.values() for text in part]
    assert not any("&amp;" in text for text in texts)
    assert max(len(text) for text in texts) < 300  # the plot summaries run to thousands of characters


def test_same_seed_same_split_other_seed_other_split(split_seed_0):
    again = RottenTomatoesDataModule(split_seed=0).split_texts()
    assert again == split_seed_0
    other = RottenTomatoesDataModule(split_seed=1).split_texts()
    assert set(other["test"][0]) != set(split_seed_0["test"][0])
    assert {split: len(texts) for split, (texts, _) in other.items()} == {
        split: len(texts) for split, (texts, _) in split_seed_0.items()
    }


def test_max_samples_take_a_prefix_of_each_split(split_seed_0):
    short = RottenTomatoesDataModule(max_train_samples=100, max_eval_samples=20).split_texts()
    for split, limit in (("train", 100), ("validation", 20), ("test", 20)):
        assert short[split][0] == split_seed_0[split][0][:limit]
        assert short[split][1] == split_seed_0[split][1][:limit]
    with pytest.raises(ValueError, match="max_train_samples must be None or >= 1, got 0"):
        RottenTomatoesDataModule(max_train_samples=0)


def test_split_keeps_the_first_label_of_a_duplicated_text():
    texts = [f"review {i}" for i in range(20)] + ["review 3"]
    labels = [i % 2 for i in range(20)] + [0]
    splits = seeded_split(texts, labels, seed=0, val_fraction=0.1, test_fraction=0.1)
    pairs = {text: label for part, ids in splits.values() for text, label in zip(part, ids, strict=True)}
    assert len(pairs) == 20 and pairs["review 3"] == 1
    assert [len(part) for part, _ in splits.values()] == [16, 2, 2]  # train, validation, test
    with pytest.raises(ValueError, match="val_fraction"):
        seeded_split(texts, labels, seed=0, val_fraction=0.5, test_fraction=0.5)


def test_your_own_csv_or_compressed_tsv(tmp_path):
    rows = [{"text": f"text number {i}", "label": ["bad", "good", "meh"][i % 3], "extra": "x"} for i in range(30)]
    plain, packed = tmp_path / "mine.csv", tmp_path / "mine.tsv.gz"
    with plain.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label", "extra"])
        writer.writeheader()
        writer.writerows(rows)
    with gzip.open(packed, "wt", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label", "extra"], delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    for path in (plain, packed):
        data = RottenTomatoesDataModule(data_name_or_path=str(path))
        splits = data.split_texts()
        assert data.label_names == ("bad", "good", "meh") and data.num_classes == 3
        assert sorted(text for part, _ in splits.values() for text in part) == sorted(row["text"] for row in rows)
        assert [len(part) for part, _ in splits.values()] == [24, 3, 3]


def test_numeric_labels_sort_as_numbers(tmp_path):
    path = tmp_path / "numbers.csv"
    path.write_text("text,label\n" + "".join(f"t{i},{i % 11}\n" for i in range(44)))
    data = RottenTomatoesDataModule(data_name_or_path=str(path))
    data.split_texts()
    assert data.label_names == tuple(str(i) for i in range(11))


def test_missing_file_or_column_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.csv"):
        RottenTomatoesDataModule(data_name_or_path=str(tmp_path / "nowhere.csv")).split_texts()
    path = tmp_path / "wrong.csv"
    path.write_text("review,label\nfine,1\n")
    with pytest.raises(ValueError, match=r"no column \['text'\]"):
        RottenTomatoesDataModule(data_name_or_path=str(path)).split_texts()


# -- BestValidationTest ----------------------------------------------------------------------------


class ScriptedScores(pl.LightningModule):
    """One weight; each validation logs the next scripted score; ``evaluate`` reports the weight."""

    def __init__(self, scores: list[float]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.scores = scores
        self.weights_at_validation: list[float] = []

    def training_step(self, batch, batch_idx):
        return -self.weight.sum()  # SGD lr 1: the weight grows by 1 every step

    def validation_step(self, batch, batch_idx):
        self.log("val_accuracy", self.scores[self.current_epoch])

    def on_validation_epoch_end(self) -> None:
        self.weights_at_validation.append(float(self.weight))

    def evaluate(self, batches) -> dict[str, float]:
        return {"accuracy": float(self.weight.detach()), "batches": float(len(batches))}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


class FourBatches(pl.LightningDataModule):
    def _loader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.zeros(4, 1)), batch_size=1)

    train_dataloader = val_dataloader = test_dataloader = _loader


def fit(scores: list[float], tmp_path, **trainer_options) -> tuple[pl.Trainer, ScriptedScores, BestValidationTest]:
    model, callback = ScriptedScores(scores), BestValidationTest()
    trainer = pl.Trainer(
        max_epochs=len(scores), limit_train_batches=1, num_sanity_val_steps=0, accelerator="cpu", callbacks=[callback],
        logger=pl.loggers.CSVLogger(tmp_path), enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, log_every_n_steps=1, **trainer_options,
    )  # fmt: skip
    trainer.fit(model, FourBatches())
    return trainer, model, callback


def test_test_metrics_come_from_the_best_validation_epoch(tmp_path):
    trainer, model, callback = fit([0.5, 0.9, 0.7, 0.9], tmp_path)
    assert model.weights_at_validation == [1.0, 2.0, 3.0, 4.0]
    assert callback.best_epoch == 1 and callback.best_score == pytest.approx(0.9)  # the first of the ties
    assert float(model.weight.detach()) == 2.0  # the best epoch's weights, not the last (4.0)
    metrics = trainer.callback_metrics
    assert float(metrics["test_accuracy"]) == 2.0 and float(metrics["test_batches"]) == 4.0
    assert float(metrics["best_epoch"]) == 1.0
    logged = list(csv.DictReader((tmp_path / "lightning_logs" / "version_0" / "metrics.csv").open()))
    assert [row["test_accuracy"] for row in logged if row.get("test_accuracy")] == ["2.0"]


def test_limit_test_batches_applies_and_no_validation_means_no_test(tmp_path):
    trainer, _, _ = fit([0.1, 0.2], tmp_path, limit_test_batches=2)
    assert float(trainer.callback_metrics["test_batches"]) == 2.0
    trainer, _, _ = fit([0.1], tmp_path, limit_val_batches=0)  # validation off on purpose: no warning
    assert "test_accuracy" not in trainer.callback_metrics
    with pytest.warns(UserWarning, match="no validation ran"):
        trainer, _, _ = fit([0.1, 0.2], tmp_path, check_val_every_n_epoch=3)
    assert "test_accuracy" not in trainer.callback_metrics


def test_a_monitor_validation_does_not_log_is_an_error(tmp_path):
    model = ScriptedScores([0.1])
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=1, num_sanity_val_steps=0, accelerator="cpu", logger=False,
        callbacks=[BestValidationTest(monitor="val_f1")], enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False,
    )  # fmt: skip
    with pytest.raises(KeyError, match=r"monitor='val_f1'.*logged: \['val_accuracy'\]"):
        trainer.fit(model, FourBatches())
