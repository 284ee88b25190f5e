"""compress_activations on a network whose activations have known rank: exactness and bookkeeping."""

from __future__ import annotations

import gc
import weakref
from typing import get_args

import pytest
import torch
import torch.nn.functional as F
from conftest import KNOWN_MAX_RANK, KnownRankNet, is_factorized, record_errors, run_and_backward, spy_on_pack
from torch import nn

from loract_lightning import ActivationCompressor, CompressionOptions, compress_activations
from loract_lightning.linalg import METHODS
from loract_lightning.options import LINEAR_LAYERS, Method
from loract_lightning.packed import LowRankFactors, PackedTensor, TwoValuedMask

LOSSLESS_RANK = KNOWN_MAX_RANK + 12
MODES = {"default": {}, "layer": {"checkpoint": ["KnownRankBlock"]}}


def assert_gradients_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("mode", sorted(MODES))
def test_rank_above_the_activation_rank_gives_the_uncompressed_gradients(known_rank_net, method, mode):
    x = KnownRankNet.make_input()
    expected, _ = run_and_backward(known_rank_net, lambda: known_rank_net(x))
    actual, stats = run_and_backward(
        known_rank_net, lambda: known_rank_net(x), rank=LOSSLESS_RANK, method=method, min_bytes=0, **MODES[mode]
    )
    assert stats.compressed > 0, stats
    assert stats.ratio < 1.0
    assert_gradients_close(actual, expected)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_rank_at_or_above_the_last_dim_changes_nothing(known_rank_net, mode):
    x = KnownRankNet.make_input()
    expected, _ = run_and_backward(known_rank_net, lambda: known_rank_net(x))
    actual, stats = run_and_backward(known_rank_net, lambda: known_rank_net(x), rank=1.0, min_bytes=0, **MODES[mode])
    assert stats.compressed == 0
    assert torch.equal(actual, expected)


def test_a_rank_below_the_activation_rank_is_lossy(known_rank_net):
    """Guards the exactness tests above: they would pass trivially if nothing were factorized."""
    x = KnownRankNet.make_input()
    expected, _ = run_and_backward(known_rank_net, lambda: known_rank_net(x))
    actual, stats = run_and_backward(known_rank_net, lambda: known_rank_net(x), rank=2, min_bytes=0)
    assert stats.compressed > 0
    assert not torch.allclose(actual, expected, rtol=1e-3)


def test_global_rng_stream_is_untouched(known_rank_net):
    x = KnownRankNet.make_input()
    torch.manual_seed(3)
    with compress_activations(known_rank_net, rank=8, min_bytes=0):
        known_rank_net(x)
    after_compressed = torch.get_rng_state()
    torch.manual_seed(3)
    known_rank_net(x)
    assert torch.equal(after_compressed, torch.get_rng_state())


def test_saving_one_storage_twice_packs_it_once(known_rank_net):
    # saved_by=None: the squares are saved by the blocks themselves, not by a linear layer.
    compressor = ActivationCompressor(
        known_rank_net, CompressionOptions(rank=LOSSLESS_RANK, min_bytes=0, saved_by=None)
    )
    calls = spy_on_pack(compressor)
    with compressor.capture() as stats:
        loss = known_rank_net(KnownRankNet.make_input())
    loss.backward()
    # ``hidden * hidden`` saves the same tensor as both operands, in each of the two blocks.
    squares = [c["packed"] for c in calls if c["module"].startswith("blocks.") and c["module"].count(".") == 1]
    squares = [p for p in squares if isinstance(p, PackedTensor) and p.size[-1] == 256]
    assert len(squares) >= 4
    assert len({id(p.region) for p in squares}) == 2
    assert stats.shared >= 2


def test_parameters_and_masks_are_never_factorized(known_rank_net):
    compressor = ActivationCompressor(known_rank_net, CompressionOptions(rank=8, min_bytes=0))
    calls = spy_on_pack(compressor)
    with compressor.capture() as stats:
        known_rank_net(KnownRankNet.make_input()).backward()
    parameter_storages = {p.untyped_storage().data_ptr() for p in known_rank_net.parameters()}
    parameter_storages |= {b.untyped_storage().data_ptr() for b in known_rank_net.buffers()}
    for call in calls:
        if call["tensor"].untyped_storage().data_ptr() in parameter_storages:
            assert call["kept_raw"]
    masks = [c["packed"].region for c in calls if c["module"] == "dropout"]
    assert masks and all(isinstance(region, TwoValuedMask) for region in masks)
    assert stats.masks == len(masks) and stats.kept["parameter"] > 0


@pytest.mark.parametrize("shape", [(64, 64), (3, 7, 5)])  # (3, 7, 5): 105 flags, the last byte padded
def test_float_dropout_mask_is_rebuilt_exactly(shape):
    model = nn.Dropout(0.3).train()
    compressor = ActivationCompressor(model, CompressionOptions(min_bytes=0, min_width=0))
    calls = spy_on_pack(compressor)
    x = torch.randn(*shape, requires_grad=True)
    with compressor.capture():
        model(x).sum().backward()
    (call,) = calls
    assert isinstance(call["packed"].region, TwoValuedMask)
    assert call["packed"].region.nbytes == -(-call["tensor"].numel() // 8)  # one bit per element
    assert torch.equal(call["packed"].unpack(), call["tensor"])


def test_sdpa_with_dropout_keeps_its_masks_out_of_the_factors():
    # On the CPU, SDPA's math path drops the attention probabilities out with a float {0, 1/(1-p)}
    # mask and saves it for backward: one (batch, heads, queries, keys) tensor per call.
    torch.manual_seed(0)
    model = nn.MultiheadAttention(64, 4, dropout=0.2, batch_first=True).train()
    x = torch.randn(8, 64, 64, requires_grad=True)
    # What attention saves itself.
    compressor = ActivationCompressor(model, CompressionOptions(rank=4, min_bytes=0, saved_by=None))
    calls = spy_on_pack(compressor)
    with compressor.capture() as stats:
        out, _ = model(x, x, x, need_weights=False)
    out.sum().backward()

    def distinct_values(tensor: torch.Tensor) -> int:
        return tensor.detach().unique().numel() if tensor.is_floating_point() and tensor.numel() else -1

    masks = [call for call in calls if 0 < distinct_values(call["tensor"]) <= 2]
    assert [tuple(call["tensor"].shape) for call in masks] == [(8, 4, 64, 64)], "the dropout mask was not saved"
    (mask,) = masks
    assert mask["tensor"].unique().tolist() == pytest.approx([0.0, 1 / (1 - 0.2)])
    assert isinstance(mask["packed"], PackedTensor) and isinstance(mask["packed"].region, TwoValuedMask)
    assert torch.equal(mask["packed"].unpack(), mask["tensor"])
    # Everything else attention saves (inputs, q/k/v, probabilities) is still factorized.
    regions = [getattr(call["packed"], "region", None) for call in calls]
    factorized = {id(region) for region in regions if isinstance(region, LowRankFactors)}
    assert stats.masks == 1 and stats.compressed == len(factorized) > 0


def test_non_finite_activations_are_kept_raw_and_counted(known_rank_net):
    x = KnownRankNet.make_input()
    x[0, 0, 0] = float("inf")
    with compress_activations(known_rank_net, rank=8, min_bytes=0) as stats:
        loss = known_rank_net(x)
    loss.backward()
    assert stats.kept["non_finite"] >= 1


def test_retain_graph_and_repeated_backward_rebuild_the_same_values(known_rank_net):
    x = KnownRankNet.make_input()
    with compress_activations(known_rank_net, rank=LOSSLESS_RANK, min_bytes=0):
        loss = known_rank_net(x)
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in known_rank_net.parameters()]
    known_rank_net.zero_grad()
    loss.backward()
    for before, after in zip(first, known_rank_net.parameters(), strict=True):
        assert torch.equal(before, after.grad)


def test_double_backward_through_rebuilt_activations():
    x = KnownRankNet.make_input(batch=2, length=64).requires_grad_()
    model = KnownRankNet(dropout=0.0).train()
    with compress_activations(model, rank=LOSSLESS_RANK, min_bytes=0) as stats:
        loss = model(x)
    (grad_x,) = torch.autograd.grad(loss, x, create_graph=True)
    grad_x.square().sum().backward()
    assert stats.compressed > 0
    expected_model = KnownRankNet(dropout=0.0).train()
    expected_model.load_state_dict(model.state_dict())
    x2 = x.detach().requires_grad_()
    (expected_grad_x,) = torch.autograd.grad(expected_model(x2), x2, create_graph=True)
    torch.testing.assert_close(grad_x, expected_grad_x, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("compress", [True, False])
def test_a_branch_that_backward_never_reaches_is_freed(compress):
    # BertModel's pooler runs in every forward; a loss on the hidden states never backpropagates
    # through it, so nothing but its outputs keeps its graph alive. tanh saves its own output:
    # a hook that held that tensor (and so its grad_fn) would keep the branch alive forever.
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128, vocab_size=100
    )
    model = transformers.BertModel(config).train()
    ids = torch.randint(0, config.vocab_size, (2, 16))
    with compress_activations(model, rank=4, min_bytes=0, compress=compress) as stats:
        output = model(input_ids=ids)
    pooled = weakref.ref(output.pooler_output)
    output.last_hidden_state.sum().backward()
    del output
    gc.collect()
    assert sum(stats.kept.values()) > 0
    assert pooled() is None


def test_non_contiguous_saved_tensors_are_rebuilt_with_their_strides():
    class TransposedProduct(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(256, 64))

        def forward(self, x):
            return (x.transpose(1, 2) @ self.weight).sum()  # matmul saves the transposed view

    model = TransposedProduct().train()
    x = KnownRankNet.make_input(batch=2, length=256, width=64)
    # A matmul, not a Linear.
    compressor = ActivationCompressor(model, CompressionOptions(rank=16, min_bytes=0, saved_by=None))
    calls = spy_on_pack(compressor)
    with compressor.capture():
        loss = model(x)
    loss.backward()
    packed = [c for c in calls if isinstance(c["packed"], PackedTensor)]
    assert packed, "the transposed activation should have been compressed"
    for call in packed:
        rebuilt = call["packed"].unpack()
        assert rebuilt.stride() == call["tensor"].stride()
        torch.testing.assert_close(rebuilt, call["tensor"], rtol=1e-4, atol=1e-4)


def test_autocast_bf16_keeps_factor_dtype_and_gradients(known_rank_net):
    x = KnownRankNet.make_input()

    def loss_fn():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return known_rank_net(x).float()

    expected, _ = run_and_backward(known_rank_net, loss_fn)
    compressor = ActivationCompressor(known_rank_net, CompressionOptions(rank=LOSSLESS_RANK, min_bytes=0))
    calls = spy_on_pack(compressor)
    known_rank_net.zero_grad()
    torch.manual_seed(0)
    with compressor.capture() as stats:
        loss = loss_fn()
    loss.backward()
    actual = torch.cat([p.grad.flatten() for p in known_rank_net.parameters()])
    factors = [c["packed"].region for c in calls if isinstance(getattr(c["packed"], "region", None), LowRankFactors)]
    assert factors and all(f.left.dtype == f.dtype for f in factors)
    assert any(f.dtype == torch.bfloat16 for f in factors)
    # Autocast's bf16 weight copies are new storages: they must still be recognised as weights.
    weight_saves = [
        c for c in calls if c["tensor"].dtype == torch.bfloat16 and c["tensor"].shape in {(128, 256), (256, 128)}
    ]
    assert weight_saves and all(c["kept_raw"] for c in weight_saves)
    assert stats.compressed > 0
    cosine = F.cosine_similarity(actual, expected, dim=0)
    assert cosine > 0.999


def errors_and_factors(model: nn.Module, x: torch.Tensor, **options) -> tuple[list[float], list[LowRankFactors]]:
    """One compressed forward + backward: every factorization's relative error and its factors."""
    compressor = ActivationCompressor(model, CompressionOptions(min_bytes=0, **options))
    errors = record_errors(compressor)
    calls = spy_on_pack(compressor)
    with compressor.capture():
        loss = model(x)
    loss.backward()
    factors = [c["packed"].region for c in calls if isinstance(getattr(c["packed"], "region", None), LowRankFactors)]
    return errors, factors


@pytest.mark.parametrize("rank", [LOSSLESS_RANK, 4])
def test_bfloat16_factors_take_half_the_memory_and_add_only_rounding_error(known_rank_net, rank):
    x = KnownRankNet.make_input()
    exact_errors, exact_factors = errors_and_factors(known_rank_net, x, rank=rank)
    errors, factors = errors_and_factors(known_rank_net, x, rank=rank, factor_dtype="bfloat16")
    assert factors and all(f.left.dtype == f.right.dtype == torch.bfloat16 for f in factors)
    assert all(f.dtype == torch.float32 and f.rebuild().dtype == torch.float32 for f in factors)
    assert sum(f.nbytes for f in factors) * 2 == sum(f.nbytes for f in exact_factors)
    assert len(errors) == len(exact_errors) > 0
    # bfloat16 keeps 8 bits of mantissa: each rebuilt value is off by ~2^-9 relative.
    for error, exact in zip(errors, exact_errors, strict=True):
        assert abs(error - exact) < 0.01, (errors, exact_errors)
    if rank == LOSSLESS_RANK:
        assert max(errors) > 1e-4  # the factors really were rounded (float32 gives ~1e-7)


def test_eval_no_grad_and_inference_mode_install_nothing(known_rank_net):
    x = KnownRankNet.make_input()
    known_rank_net.eval()
    with compress_activations(known_rank_net, rank=4, min_bytes=0) as stats:
        assert not known_rank_net.blocks[0]._forward_pre_hooks
        known_rank_net(x)
    assert stats.saved_bytes == 0 and stats.compressed == 0
    known_rank_net.train()
    for context in (torch.no_grad, torch.inference_mode):
        with context(), compress_activations(known_rank_net, rank=4, min_bytes=0) as stats:
            assert not known_rank_net.blocks[0]._forward_pre_hooks
            known_rank_net(x)
        assert stats.compressed == 0


def state_of(model: nn.Module) -> list:
    return [
        (name, type(module), dict(module._forward_pre_hooks), dict(module._forward_hooks), "forward" in vars(module))
        for name, module in model.named_modules()
    ]


@pytest.mark.parametrize("mode", sorted(MODES))
def test_model_is_left_as_it_was_even_after_an_error(known_rank_net, mode):
    before = state_of(known_rank_net)
    with compress_activations(known_rank_net, rank=8, min_bytes=0, **MODES[mode]):
        assert state_of(known_rank_net) != before
        loss = known_rank_net(KnownRankNet.make_input())
    assert state_of(known_rank_net) == before
    loss.backward()  # backward (and layer mode's recompute) after the block still works
    with pytest.raises(RuntimeError, match="boom"), compress_activations(known_rank_net, **MODES[mode]):
        raise RuntimeError("boom")
    assert state_of(known_rank_net) == before
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None


def test_layer_mode_keeps_only_the_block_inputs(known_rank_net):
    compressor = ActivationCompressor(
        known_rank_net, CompressionOptions(rank=LOSSLESS_RANK, min_bytes=0, checkpoint=["KnownRankBlock"])
    )
    calls = spy_on_pack(compressor)
    with compressor.capture() as stats:
        known_rank_net(KnownRankNet.make_input()).backward()
    compressed = [c for c in calls if isinstance(getattr(c["packed"], "region", None), LowRankFactors)]
    assert sorted(c["module"] for c in compressed) == ["blocks.0", "blocks.1"]
    assert all(c["tensor"].shape == (4, 128, 128) for c in compressed)
    # Nothing saved inside a block reaches the hook: checkpointing keeps only the inputs.
    assert not any(c["module"].startswith("blocks.0.") or c["module"].startswith("blocks.1.") for c in calls)
    assert stats.compressed == 2


def test_layers_override_ranks_and_none_disables(known_rank_net):
    layers = {"blocks.0.*": 4, "blocks.1*": None}
    with compress_activations(known_rank_net, rank=8, min_bytes=0, layers=layers) as stats:
        known_rank_net(KnownRankNet.make_input()).backward()
    assert stats.modules["blocks.0.up"].ranks == {4}
    assert stats.modules["blocks.1.up"].compressed == 0
    assert stats.kept["disabled_by_layers"] > 0
    assert sum(m.saved_bytes for m in stats.modules.values()) == stats.saved_bytes
    assert sum(m.stored_bytes for m in stats.modules.values()) == stats.stored_bytes


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"rank": 0}, ValueError, "rank must be .* got 0"),
        ({"rank": -3}, ValueError, "got -3"),
        ({"rank": 1.5}, ValueError, r"float in \(0, 1\].* got 1.5"),
        ({"rank": "big"}, TypeError, "got 'big'"),
        ({"method": "svd"}, ValueError, "method must be one of .*'sampled_qb'.* got 'svd'"),
        ({"min_bytes": -1}, ValueError, "min_bytes must be an int >= 0, got -1"),
        ({"layers": {"nothing.*": 4}}, ValueError, r"\['nothing.\*'\] match no module.*'blocks'"),
        ({"layers": {"blocks.*": 0}}, ValueError, r"layers\['blocks.\*'\] must be"),
        ({"checkpoint": ["NoSuchBlock"]}, ValueError, r"\['NoSuchBlock'\] match no module.*KnownRankBlock"),
        ({"checkpoint": "KnownRankBlock"}, TypeError, "checkpoint must be a list"),
        ({"power_iters": -1}, ValueError, "power_iters must be None or an int >= 0, got -1"),
        ({"keep_row_norms": "yes"}, TypeError, "keep_row_norms must be None, True or False, got 'yes'"),
        ({"factor_dtype": "int8"}, ValueError, r"factor_dtype must be one of \[None, 'bfloat16', .*got 'int8'"),
        (
            {"method": "truncated_svd", "power_iters": 2},
            ValueError,
            r"power_iters=2 is not an option of method='truncated_svd'; methods that take it: "
            r"\['sampled_qb', 'randomized_svd'\]",
        ),
        ({"method": "truncated_svd", "oversample": 0}, ValueError, "oversample=0 is not an option of method="),
        (
            {"saved_by": ["linear"]},
            ValueError,
            r"saved_by class name\(s\) \['linear'\] match no module of KnownRankNet; .* such as \['Linear', ",
        ),
        ({"saved_by": ["Linear", "Dropuot"]}, ValueError, r"\['Dropuot'\] match no module.*'Dropout'"),
        ({"saved_by": ["Conv2d", "Conv1D"]}, ValueError, r"\['Conv2d', 'Conv1D'\] match no module"),
    ],
)
def test_bad_options_name_the_value_and_what_is_allowed(known_rank_net, options, error, message):
    with pytest.raises(error, match=message):
        compress_activations(known_rank_net, **options)


def test_method_options_are_those_of_the_method_and_the_method_type_names_every_method(known_rank_net):
    assert set(get_args(Method)) == set(METHODS)
    x = KnownRankNet.make_input()
    for method in ("sampled_qb", "randomized_svd"):
        _, stats = run_and_backward(
            known_rank_net, lambda: known_rank_net(x), rank=8, min_bytes=0, method=method, power_iters=1, oversample=2
        )
        assert stats.compressed > 0


@pytest.mark.parametrize(
    "saved_by",
    [
        LINEAR_LAYERS,  # the default names classes most models lack: not checked
        ["Linear", "Conv1D"],  # a list for several architectures (GPT-2's Conv1D): one of them matches
        ["Module"],  # matched along the class hierarchy
        ["KnownRankBlock", "Dropout"],
        None,
    ],
)
def test_saved_by_names_that_match_a_class_are_accepted(known_rank_net, saved_by):
    compress_activations(known_rank_net, saved_by=saved_by)
    compress_activations(nn.Sequential(nn.ReLU()), saved_by=LINEAR_LAYERS)  # no linear layer at all


def test_a_model_that_is_not_a_module_is_rejected():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got function"):
        compress_activations(lambda x: x)


def test_layer_mode_reuses_existing_checkpoint_wrappers(known_rank_net):
    """Lightning's FSDP activation_checkpointing_policy wraps blocks in CheckpointWrapper: not wrapped twice."""
    from conftest import KnownRankBlock
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    apply_activation_checkpointing(known_rank_net, check_fn=lambda module: isinstance(module, KnownRankBlock))
    x = KnownRankNet.make_input()
    expected, _ = run_and_backward(known_rank_net, lambda: known_rank_net(x))
    with pytest.warns(UserWarning, match="already run under activation checkpointing"):
        compressor = ActivationCompressor(
            known_rank_net, CompressionOptions(rank=LOSSLESS_RANK, min_bytes=0, checkpoint=["KnownRankBlock"])
        )
    calls = spy_on_pack(compressor)
    known_rank_net.zero_grad()
    torch.manual_seed(0)
    with compressor.capture() as stats:
        assert "forward" not in vars(known_rank_net.blocks[0])  # not wrapped a second time
        loss = known_rank_net(x)
    loss.backward()
    compressed = sorted(c["module"] for c in calls if is_factorized(c["packed"]))
    assert compressed == ["blocks.0", "blocks.1"] and stats.compressed == 2
    actual = torch.cat([p.grad.flatten() for p in known_rank_net.parameters()])
    assert_gradients_close(actual, expected)


def test_sparse_saved_tensors_are_kept_raw():
    class SparseProduct(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(64, 32))

        def forward(self, sparse):
            return torch.sparse.mm(sparse, self.weight).sum()  # saves the sparse operand

    model = SparseProduct().train()
    sparse = (torch.rand(256, 64) < 0.1).float().to_sparse()
    with compress_activations(model, rank=4, min_bytes=0) as stats:
        loss = model(sparse)
    loss.backward()
    assert stats.kept["unsupported_tensor"] >= 1
    torch.testing.assert_close(model.weight.grad, sparse.to_dense().sum(0, keepdim=True).T.expand(64, 32))


def test_row_norms_are_kept_by_default_in_layer_mode_only(known_rank_net):
    assert ActivationCompressor(known_rank_net, CompressionOptions(checkpoint=["KnownRankBlock"])).keep_row_norms
    assert not ActivationCompressor(known_rank_net).keep_row_norms
    assert ActivationCompressor(known_rank_net, CompressionOptions(keep_row_norms=True)).keep_row_norms
    compressor = ActivationCompressor(
        known_rank_net, CompressionOptions(rank=4, min_bytes=0, checkpoint=["KnownRankBlock"])
    )
    calls = spy_on_pack(compressor)
    with compressor.capture():
        known_rank_net(KnownRankNet.make_input()).backward()
    for call in calls:
        if isinstance(call["packed"], PackedTensor) and isinstance(call["packed"].region, LowRankFactors):
            rebuilt = call["packed"].unpack().reshape(-1, 128)
            original = call["tensor"].reshape(-1, 128)
            torch.testing.assert_close(rebuilt.norm(dim=1), original.norm(dim=1), rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("side_stream", [True, False])
def test_cuda_rank_above_the_activation_rank_gives_the_uncompressed_gradients(side_stream):
    model = KnownRankNet(width=512).cuda().train()
    x = KnownRankNet.make_input(batch=8, length=512, width=512).cuda()
    expected, _ = run_and_backward(model, lambda: model(x))
    options = {"rank": 2 * KNOWN_MAX_RANK, "min_bytes": 0, "side_stream": side_stream}
    actual, stats = run_and_backward(model, lambda: model(x), **options)
    assert stats.compressed > 0
    assert_gradients_close(actual, expected)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_side_stream_keeps_the_original_until_its_factors_are_ready():
    # A large activation freed right after pack, its memory immediately overwritten on the main
    # stream: without the stream bookkeeping the side stream would read the overwritten values.
    weight = torch.randn(4096, 4096, device="cuda", requires_grad=True)
    compressor = ActivationCompressor(nn.Linear(1, 1).train(), CompressionOptions(rank=64, min_bytes=0))
    rank_64 = torch.randn(8192, 64, device="cuda") @ torch.randn(64, 4096, device="cuda")
    with compressor.capture():
        activation = rank_64.clone()
        output = (activation @ weight).sum()
        del activation
        torch.full((8192, 4096), float("nan"), device="cuda")  # likely reuses the activation's block
    output.backward()
    assert torch.isfinite(weight.grad).all()
    expected = rank_64.sum(0, keepdim=True).T.expand(-1, 4096)
    torch.testing.assert_close(weight.grad, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max()))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_side_stream_leaks_no_memory():
    model = KnownRankNet(width=512).cuda().train()
    x = KnownRankNet.make_input(batch=8, length=512, width=512).cuda()

    def allocated() -> int:
        # Blocks freed while the side stream still had work queued on them are handed back once
        # their events complete: empty_cache processes those events.
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return torch.cuda.memory_allocated()

    run_and_backward(model, lambda: model(x), rank=16, min_bytes=0)  # warm-up: streams, workspaces
    before = allocated()
    for _ in range(3):
        run_and_backward(model, lambda: model(x), rank=16, min_bytes=0)
    after = allocated()
    assert after == before, f"{after - before} bytes more allocated after 3 steps"


def test_auto_rank_meets_max_error_on_every_tensor_and_reports_its_ranks(known_rank_net):
    model, x = known_rank_net, KnownRankNet.make_input()
    # min_rank=1: the search alone picks each rank (the default floor of 64 exceeds these ranks).
    options = CompressionOptions(rank="auto", max_error=0.05, min_bytes=0, min_rank=1)
    compressor = ActivationCompressor(model, options)
    errors = record_errors(compressor)
    with compressor.capture() as stats:
        loss = model(x)
    loss.backward()
    ranks = {rank for module in stats.modules.values() for rank in module.ranks}
    assert stats.compressed > 0 and len(errors) == stats.compressed
    assert max(errors) <= 0.05 * 1.001
    assert len(ranks) > 1 and max(ranks) <= KNOWN_MAX_RANK
    assert stats.mean_rank == pytest.approx(stats.rank_sum / stats.compressed)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rank": "auto", "max_error": 1.5}, r"max_error must be a number in \(0, 1\), got 1.5"),
        ({"rank": "auto", "min_rank": 0}, "min_rank must be an int >= 1, got 0"),
        ({"rank": "auto", "min_rank": 8, "max_rank": 4}, r"min_rank \(8\) must not exceed max_rank \(4\)"),
        ({"rank": "auto", "method": "randomized_svd"}, "rank='auto' needs method='sampled_qb'"),
        ({"layers": {"blocks.*": "auto"}, "method": "truncated_svd"}, "rank='auto' needs method='sampled_qb'"),
        ({"rank": "automatic"}, r"rank must be an int >= 1, a float in \(0, 1\], 'auto'"),
    ],
)
def test_bad_auto_rank_options_name_the_value(known_rank_net, options, message):
    with pytest.raises((ValueError, TypeError), match=message):
        ActivationCompressor(known_rank_net, CompressionOptions(**options))
