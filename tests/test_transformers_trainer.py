"""LoRActTrainerCallback inside a real Hugging Face transformers.Trainer fit (tiny Llama + peft LoRA, CPU)."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch
from conftest import tiny_llama
from lit_models import saved_tensor_hooks_installed

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from loract_lightning.transformers_callback import LoRActTrainerCallback  # noqa: E402


class RepeatedSequence(torch.utils.data.Dataset):
    """One 16-token sequence, ``length`` times: a batch's activations have at most 16 distinct
    rows, so rank 32 factors hold them exactly (a lossless run) while each is 128 x 64 or wider."""

    def __init__(self, length: int = 48) -> None:
        self.ids = torch.randint(0, 1000, (16,), generator=torch.Generator().manual_seed(0))
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids, "labels": self.ids}


def lora_llama():
    torch.manual_seed(0)
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    return peft.get_peft_model(tiny_llama(hidden=64, layers=2), config)


def hf_fit(tmp_path, callbacks: list) -> tuple[torch.nn.Module, list[tuple[bool, bool]]]:
    """3 SGD steps (micro-batches of 8, accumulated 2 at a time) with an evaluation after step 2;
    returns the model and, per decoder-layer call, (training mode, saved-tensor hooks installed)."""
    model = lora_llama()
    seen: list[tuple[bool, bool]] = []
    layer = model.get_base_model().model.layers[0]
    layer.register_forward_pre_hook(lambda module, args: seen.append((module.training, saved_tensor_hooks_installed())))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8, gradient_accumulation_steps=2,
        per_device_eval_batch_size=8, eval_strategy="steps", eval_steps=2, optim="sgd", learning_rate=0.5,
        use_cpu=True, report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=RepeatedSequence(), eval_dataset=RepeatedSequence(8), callbacks=callbacks
    )
    trainer.train()
    return model, seen


def lora_parameters(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", ["default", "layer"])
def test_the_training_forward_is_compressed_and_a_lossless_fit_is_unchanged(tmp_path, mode):
    # randomized_svd: exact at a rank above the activations' (see test_fabric for the sampled QB's limit).
    options = {"rank": 32, "min_bytes": 0, "method": "randomized_svd"}
    if mode == "layer":
        options["checkpoint"] = ["LlamaDecoderLayer"]
    callback = LoRActTrainerCallback(**options)
    model, seen = hf_fit(tmp_path / "loract", [callback])
    assert callback.step_stats.compressed > 0
    assert {name for name, memory in callback.step_stats.modules.items() if memory.ranks}
    training = [installed for is_training, installed in seen if is_training]
    evaluation = [installed for is_training, installed in seen if not is_training]
    assert training and all(training[: 3 * 2])  # each micro-batch's forward (layer mode: and recompute)
    assert evaluation and not any(evaluation)
    assert "forward" not in vars(model)  # put back at the end of training
    expected, _ = hf_fit(tmp_path / "plain", [])
    actual = lora_parameters(model)
    for name, value in lora_parameters(expected).items():
        torch.testing.assert_close(actual[name], value, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert any((value != 0).any() for name, value in actual.items() if "lora_B" in name)  # it trained


def test_bad_options_fail_at_construction():
    with pytest.raises(ValueError, match="rank must be"):
        LoRActTrainerCallback(rank=0)


def test_without_transformers_the_import_names_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # None: what the import system reads as missing
    monkeypatch.delitem(sys.modules, "loract_lightning.transformers_callback")
    with pytest.raises(ModuleNotFoundError, match="needs transformers: pip install transformers"):
        importlib.import_module("loract_lightning.transformers_callback")
