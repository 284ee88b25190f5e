"""Both modes on a transformers Llama, a transformers BERT with dropout and a timm ViT."""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F
from conftest import REPORT, is_factorized, run_and_backward, spy_on_pack

from loract_lightning import ActivationCompressor, CompressionOptions
from loract_lightning.packed import PackedTensor, StoredRegion
from loract_lightning.policy import LINEAR_LAYERS, has_class

pytestmark = pytest.mark.slow

RANK = 0.125
MIN_BYTES = 1 << 16
MIN_RANK = 1  # rank 1/8 as it is: these small models are narrower than the default floor of 64


def capture_with_spy(model, loss_fn, **options):
    compressor = ActivationCompressor(
        model, CompressionOptions(rank=RANK, min_bytes=MIN_BYTES, min_rank=MIN_RANK, **options)
    )
    calls = spy_on_pack(compressor)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    with compressor.capture() as stats:
        loss = loss_fn()
    loss.backward()
    gradients = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return stats, calls, gradients


@pytest.mark.parametrize("mode", ["default", "layer"])
def test_both_modes_train_and_report_gradient_similarity(real_model, mode):
    name, model, loss_fn, blocks = real_model
    expected, _ = run_and_backward(model, loss_fn)
    options = {"checkpoint": blocks} if mode == "layer" else {}
    stats, _, actual = capture_with_spy(model, loss_fn, **options)
    assert stats.compressed > 0
    assert torch.isfinite(actual).all()
    cosine = float(F.cosine_similarity(actual, expected, dim=0))
    REPORT.append(
        f"{name:5s} {mode:7s} rank 1/8: gradient cosine vs uncompressed {cosine:.3f}, "
        f"stored/saved {stats.ratio:.3f} ({stats.saved_bytes / 2**20:.1f} MiB saved)"
    )
    # Randomly initialised models have far-from-low-rank activations; this only catches garbage.
    assert cosine > 0.3


def test_default_mode_keeps_at_most_35_percent(real_model):
    name, model, loss_fn, _ = real_model
    stats, calls, _ = capture_with_spy(model, loss_fn, saved_by=None)  # the paper's default mode: everything
    assert stats.ratio <= 0.35, f"{name}: {stats}"
    parameter_storages = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    for call in calls:
        tensor = call["tensor"]
        if tensor.untyped_storage().data_ptr() in parameter_storages:
            assert call["kept_raw"], f"parameter saved by {call['module']} was packed"
        if is_factorized(call["packed"]):
            assert tensor.unique().numel() > 2, f"a two-valued tensor from {call['module']} was factorized"
    assert stats.kept["parameter"] > 0


@pytest.mark.parametrize(
    ("model_name", "prefix", "projections"),
    [
        ("llama", "model.layers.0.self_attn.", ["q_proj", "k_proj", "v_proj"]),
        ("bert", "bert.encoder.layer.0.attention.self.", ["query", "key", "value"]),
    ],
)
def test_q_k_v_share_one_packed_region(request, model_name, prefix, projections):
    model, loss_fn, _ = request.getfixturevalue(model_name)
    projections = [prefix + name for name in projections]
    _, calls, _ = capture_with_spy(model, loss_fn)
    regions = {
        id(call["packed"].region)
        for call in calls
        if call["module"] in projections and is_factorized(call["packed"]) and call["tensor"].ndim >= 2
    }
    seen = {call["module"] for call in calls if call["module"] in projections and is_factorized(call["packed"])}
    assert seen == set(projections)
    assert len(regions) == 1


def test_bert_dropout_masks_are_stored_exactly(bert):
    model, loss_fn, _ = bert
    stats, calls, _ = capture_with_spy(model, loss_fn)
    assert stats.masks > 0
    for call in calls:
        if isinstance(call["packed"], PackedTensor) and not is_factorized(call["packed"]):
            assert torch.equal(call["packed"].unpack(), call["tensor"])


@pytest.mark.parametrize("compress_outside", [True, False], ids=["outside", "blocks_only"])
def test_layer_mode_compresses_block_inputs_and_outside_only_linear_inputs(real_model, compress_outside):
    name, model, loss_fn, blocks = real_model
    stats, calls, _ = capture_with_spy(model, loss_fn, checkpoint=blocks, compress_outside=compress_outside)
    modules = dict(model.named_modules())
    block_names = {n for n, m in modules.items() if type(m).__name__ in blocks}
    compressed = [call["module"] for call in calls if is_factorized(call["packed"])]
    # One hidden-state input per block, and nothing from inside a block ever reaches the hook.
    assert sorted(m for m in compressed if m in block_names) == sorted(block_names)
    assert not any(call["module"].startswith(tuple(f"{b}." for b in block_names)) for call in calls)
    outside = [m for m in compressed if m not in block_names]
    if not compress_outside:
        assert outside == [] and stats.kept["outside_checkpoint"] > 0, f"{name}: {stats}"
        return
    # Outside the blocks, default mode's rule: only what linear layers save (the loss stays raw).
    assert all(has_class(modules[m], LINEAR_LAYERS) for m in outside), outside
    if name == "llama":  # the trainable LM head's input, 512 tokens x 256
        assert outside == ["lm_head"]


@pytest.mark.parametrize("name", ["llama", "bert"])  # timm's ViT shares no saved storage (fused qkv)
def test_views_of_one_region_share_one_rebuild_per_backward(name, request, monkeypatch):
    model, loss_fn, _ = request.getfixturevalue(name)
    rebuilds = collections.Counter()
    rebuild = StoredRegion.rebuild

    def counted(region):
        rebuilds[id(region)] += 1
        return rebuild(region)

    monkeypatch.setattr(StoredRegion, "rebuild", counted)
    compressor = ActivationCompressor(model, CompressionOptions(rank=RANK, min_bytes=MIN_BYTES, min_rank=MIN_RANK))
    calls = spy_on_pack(compressor)
    with compressor.capture():
        loss = loss_fn()
    views = [c["packed"] for c in calls if isinstance(c["packed"], PackedTensor)]
    regions = {id(view.region): view.region for view in views}
    assert len(views) > len(regions), f"{name}: no region is shared, nothing to test"
    loss.backward(retain_graph=True)
    assert rebuilds == dict.fromkeys(regions, 1)
    assert all(region._shared_rebuild is None for region in regions.values()), "a rebuild outlived its views"
    # A repeated backward rebuilds once per view and keeps nothing.
    loss.backward()
    assert sum(rebuilds.values()) == len(regions) + len(views)
    assert all(region._shared_rebuild is None for region in regions.values())
