"""Image classification: a timm vision transformer on handwritten digits.

Defaults ship offline: scikit-learn's 8x8 digits (1797 images, 10 classes), upsampled to
``img_size`` and split 80/20 (stratified, fixed seed). ``model_name`` takes any timm model
name; ``pretrained=True`` loads its weights from the hub (needs network). ``data_dir`` takes an
``ImageFolder``-style folder (``train/`` and ``test/`` with one subfolder per class) instead.

    loract fit --config configs/vision/baseline.yaml --config configs/vision/loract.yaml
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset


class DigitsDataModule(pl.LightningDataModule):
    """Digits as 3-channel ``img_size`` images, normalised to zero mean and unit variance.

    Args:
        data_dir: an ImageFolder-style folder with ``train/`` and ``test/``; None: sklearn digits.
        img_size: side of the (square) images fed to the model.
        batch_size: images per batch.
        test_fraction: share of the digits held out for validation/test (sklearn digits only).
    """

    def __init__(
        self, data_dir: str | None = None, img_size: int = 16, batch_size: int = 128, test_fraction: float = 0.2
    ) -> None:
        super().__init__()
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
        self.save_hyperparameters()
        self.splits: dict[str, TensorDataset] = {}

    def setup(self, stage: str) -> None:
        if self.hparams.data_dir is not None:
            self.splits = {split: self._image_folder(split) for split in ("train", "test")}
            return
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.tensor(digits.target)
        train_idx, test_idx = train_test_split(
            range(len(labels)), test_size=self.hparams.test_fraction, stratify=digits.target, random_state=0
        )
        images = self._resize(images)
        self.splits = {
            "train": TensorDataset(images[train_idx], labels[train_idx]),
            "test": TensorDataset(images[test_idx], labels[test_idx]),
        }

    def _resize(self, images: torch.Tensor) -> torch.Tensor:
        size = self.hparams.img_size
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        images = (images - images.mean()) / images.std()
        return images.expand(-1, 3, -1, -1).contiguous()

    def _image_folder(self, split: str) -> TensorDataset:
        from torchvision.datasets import ImageFolder
        from torchvision.transforms.functional import pil_to_tensor

        root = Path(self.hparams.data_dir) / split
        if not root.is_dir():
            raise FileNotFoundError(f"data_dir={self.hparams.data_dir!r} has no {split}/ folder (ImageFolder layout)")
        folder = ImageFolder(root)
        images = torch.stack([pil_to_tensor(image.convert("L")).float() / 255.0 for image, _ in folder])
        return TensorDataset(self._resize(images), torch.tensor(folder.targets))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["train"], batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["test"], batch_size=256)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


class ImageClassifier(pl.LightningModule):
    """A timm model trained with AdamW and label smoothing; accuracy on the held-out split.

    Args:
        model_name: any ``timm.create_model`` name.
        pretrained: load the hub weights (needs network; off by default).
        img_size: input side, passed to timm (ViTs adapt their position embeddings to it).
        patch_size: ViT patch size (None: the model's own).
        num_classes: output classes.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
    """

    def __init__(
        self,
        model_name: str = "vit_tiny_patch16_224",
        pretrained: bool = False,
        img_size: int = 16,
        patch_size: int | None = 4,
        num_classes: int = 10,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        import timm
        from torchmetrics.classification import MulticlassAccuracy

        extra = {"img_size": img_size} | ({"patch_size": patch_size} if patch_size else {})
        self.model = timm.create_model(model_name, pretrained=pretrained, num_classes=num_classes, **extra)
        self.accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels, label_smoothing=0.1)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch, stage: str) -> None:
        images, labels = batch
        logits = self(images)
        self.accuracy(logits, labels)
        self.log(f"{stage}_loss", F.cross_entropy(logits, labels), prog_bar=True)
        self.log(f"{stage}_accuracy", self.accuracy, prog_bar=True)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, self.hparams.lr, self.trainer.estimated_stepping_batches
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
