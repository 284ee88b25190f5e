"""The context planner: exact live-tensor peaks, the fitted line and the longest context in a budget."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from loract_lightning import ActivationCompressor, CompressionOptions, causal_lm_loss
from loract_lightning.planner import ContextPlan, LiveTensorBytes, parse_bytes, plan_context, step_peak_bytes


@pytest.mark.parametrize(
    ("text", "expected"),
    [("24GiB", 24 * 2**30), ("512 MiB", 512 * 2**20), ("1.5GB", 1_500_000_000), ("4096", 4096), (1000, 1000)],
)
def test_memory_sizes_parse(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["", "12 parsecs", "-3GiB", "0", 0, "GiB", True])
def test_a_bad_memory_size_names_itself_and_the_units(bad):
    with pytest.raises(ValueError, match=rf"got {bad!r}"):
        parse_bytes(bad)


def test_live_tensor_bytes_counts_new_storages_once_until_freed():
    weights = torch.ones(1000)  # made before: never counted
    with LiveTensorBytes() as live:
        a = weights * 2  # 4000 bytes
        view = a.view(10, 100).t()  # a view: nothing new
        a.add_(1)  # in place: nothing new
        b = a + view.t().reshape(-1)  # 4000 more (reshape of a contiguous view is a view)
        del a, view
        c = b * 3  # a's storage is free again: the total stays at 8000
        del b, c
    assert live.peak == 8000
    assert live.total == 0


def test_step_peak_bytes_measures_what_backward_holds_on_the_cpu():
    x = torch.randn(256, 64, requires_grad=True)

    def step() -> None:
        hidden = x.tanh()  # saved by tanh's backward: 64 KiB
        hidden.pow(2).sum().backward()  # pow saves its input (the same storage); grads 64 KiB more

    peak = step_peak_bytes(step)
    assert 3 * 256 * 64 * 4 <= peak <= 5 * 256 * 64 * 4


def test_the_plan_fits_a_line_and_finds_the_longest_context():
    def step_at(tokens: int) -> None:
        fixed = torch.zeros(1000)  # 4000 bytes whatever the length
        per_token = torch.zeros(tokens, 64)  # 256 bytes a token
        del fixed, per_token

    plan = plan_context(step_at, [128, 512, 256], label="toy")
    assert plan.tokens == (128, 256, 512)
    assert plan.bytes_per_token == pytest.approx(256)
    assert plan.fixed_bytes == pytest.approx(4000)
    assert plan.longest(4000 + 256 * 1000) == 1000
    assert plan.longest(100) == 0


def test_plans_refuse_what_they_cannot_fit():
    with pytest.raises(ValueError, match=r"at least two distinct token counts >= 1, got \[64, 64\]"):
        plan_context(lambda n: None, [64, 64])
    with pytest.raises(ValueError, match="did not grow with the tokens"):
        ContextPlan("flat", (64, 128), (1000, 1000)).longest(10_000)


def test_layer_mode_plans_a_longer_context_than_checkpointing_in_the_same_memory():
    """The claim users run the planner for, on a tiny Llama: per token, LoRAct's layer mode holds
    less at the peak than activation checkpointing (AC), both with the chunked loss."""
    torch.manual_seed(0)
    model = tiny_llama(hidden=128, layers=4, intermediate=512)

    def plan(label: str, compress: bool = True, **options) -> ContextPlan:
        options = CompressionOptions(checkpoint=["LlamaDecoderLayer"], min_rank=8, min_bytes=0, **options)
        compressor = ActivationCompressor(model, options, compress=compress)  # compress=False: plain AC

        def step_at(tokens: int) -> None:
            ids = torch.randint(0, 1000, (1, tokens))
            with compressor.capture():
                loss = causal_lm_loss(model, ids, labels=ids, chunk_tokens=64)
            loss.backward()
            model.zero_grad(set_to_none=True)

        return plan_context(step_at, [256, 512], label)

    ac = plan("AC + chunked loss", compress=False)
    layer = plan("LoRAct layer mode", mlp_chunk_tokens=128)
    print(f"bytes per token: AC {ac.bytes_per_token:.0f}, layer mode {layer.bytes_per_token:.0f}")
    assert 0 < layer.bytes_per_token < 0.8 * ac.bytes_per_token
    budget = int(ac.peak_at(512))
    assert layer.longest(budget) > 512 >= ac.longest(budget) - 1
