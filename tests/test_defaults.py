"""The default policy is safe for LoRA fine-tuning: only the inputs of linear layers are factorized.

What ``benchmarks/attribution.py`` found harmful on SmolLM2-135M + LoRA (the loss's
log-probabilities, nonlinear inputs, norms, attention internals, LoRA's narrow rank-r
intermediate) must stay raw with ``LoRAct(rank=...)`` and nothing else set, and the gradient
error of the defaults must stay small on a pretrained-like model built here.
"""

from __future__ import annotations

import pytest
import torch
from conftest import spy_on_pack, tiny_llama
from torch import nn

from loract_lightning import ActivationCompressor, CompressionOptions, compress_activations
from loract_lightning.packed import PackedTensor, TwoValuedMask
from loract_lightning.policy import LINEAR_LAYERS

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def lora_llama():
    """A small Llama whose token embeddings have a decaying spectrum (as pretrained ones do), with LoRA."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = tiny_llama(hidden=128, intermediate=384, heads=2, kv_heads=2, vocab=2000, use_cache=False)
    with torch.no_grad():
        left = torch.linalg.qr(torch.randn(2000, 128)).Q
        right = torch.linalg.qr(torch.randn(128, 128)).Q
        base.model.embed_tokens.weight.copy_(40 * left * 0.8 ** torch.arange(128) @ right.T)
    lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=PROJECTIONS, task_type="CAUSAL_LM")
    model = peft.get_peft_model(base, lora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)  # as after some training: B = 0 would make every gradient trivial
    ids = torch.randint(0, 2000, (4, 128))
    return model.train(), lambda: model(input_ids=ids, labels=ids).loss


def _lora_gradient(model: nn.Module, loss_fn, **options) -> tuple[torch.Tensor, object]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same LoRA dropout masks in every run
    stats = None
    if options:
        with ActivationCompressor(model, CompressionOptions(**options)).capture() as stats:
            loss = loss_fn()
    else:
        loss = loss_fn()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]), stats


def test_defaults_are_linear_inputs_with_a_width_floor():
    options = CompressionOptions()
    assert options.saved_by == LINEAR_LAYERS and options.min_width == 64 and options.rank == 0.125


def test_default_policy_factorizes_only_linear_inputs(lora_llama):
    model, loss_fn = lora_llama
    compressor = ActivationCompressor(model, CompressionOptions(rank=0.125, min_bytes=0))
    calls = spy_on_pack(compressor)
    with compressor.capture() as stats:
        loss = loss_fn()
    loss.backward()
    modules = dict(model.named_modules())
    factorized = [c for c in calls if _factorized(c)]
    assert factorized and all(isinstance(modules[c["module"]], nn.Linear) for c in factorized)
    # LoRA A's input (the dropout output) is what gets factorized; B's rank-8 input stays raw.
    assert {c["module"].rsplit(".", 2)[-2] for c in factorized} == {"lora_A"}
    narrow = [c for c in calls if c["module"].endswith("lora_B.default") and c["tensor"].shape[-1] == 8]
    assert narrow and all(c["kept_raw"] for c in narrow)
    # The loss's log-probabilities (saved by the causal LM's own forward), SiLU and norm inputs: raw.
    for suffix in ("base_model.model", "mlp.act_fn", "input_layernorm", "post_attention_layernorm", "self_attn"):
        saved = [c for c in calls if c["module"].endswith(suffix) and c["tensor"].is_floating_point()]
        assert saved and not any(_factorized(c) for c in saved), suffix
    # LoRA's dropout masks are stored exactly, one byte per element, although no linear layer saves them.
    masks = [c for c in calls if c["module"].endswith("lora_dropout.default")]
    assert masks and stats.masks == sum(isinstance(getattr(c["packed"], "region", None), TwoValuedMask) for c in masks)
    assert stats.masks > 0


def _factorized(call: dict) -> bool:
    return isinstance(call["packed"], PackedTensor) and not isinstance(call["packed"].region, TwoValuedMask)


def test_default_gradient_error_is_small_and_the_guards_matter(lora_llama):
    """Measured here: defaults 0.08; at rank 1/8 with no floors (min_rank 1, LoRA B's narrow input
    compressed too) 0.79; either floor alone keeps LoRA B's 8-wide input exact (rank 8 of 8: raw)."""
    model, loss_fn = lora_llama
    expected, _ = _lora_gradient(model, loss_fn)

    def error(**options) -> float:
        got, stats = _lora_gradient(model, loss_fn, rank=0.125, min_bytes=0, **options)
        assert stats.compressed > 0
        return float((got - expected).norm() / expected.norm())

    assert error() < 0.2
    assert error(min_width=0, min_rank=1) > 0.5  # without both floors LoRA B's gradient goes wrong
    assert error(min_width=0) < 0.2  # the rank floor alone covers it
    assert error(min_rank=1) < 0.2  # and so does the width floor alone


def test_default_mode_over_modules_checkpointed_elsewhere_says_their_inputs_stay_raw(known_rank_net):
    from conftest import KnownRankBlock
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    apply_activation_checkpointing(known_rank_net, check_fn=lambda module: isinstance(module, KnownRankBlock))
    with pytest.warns(UserWarning, match="already run under activation checkpointing.*stay raw"):
        compressor = ActivationCompressor(known_rank_net, CompressionOptions(rank=8, min_bytes=0))
    with compressor.capture() as stats:
        known_rank_net(torch.randn(4, 128, 128)).backward()
    assert stats.compressed == 0 and stats.kept["not_in_saved_by"] == 2


@pytest.mark.parametrize(
    ("rank", "width", "expected"),
    [(0.125, 384, 64), (0.125, 1536, 192), (16, 384, 16), (0.125, 64, None)],
    ids=["fraction-below-the-floor", "fraction-above-it", "int-as-given", "floor-saves-nothing"],
)
def test_a_fractional_rank_gives_at_least_min_rank_directions(rank, width, expected):
    # MiniLM's 384-wide inputs at 1/8 would get 48 directions, which cost it accuracy; an int rank
    # is the user's own choice and is kept; where 64 directions would not save memory, raw.
    model = nn.Linear(width, 8).train()
    x = torch.randn(2048, width)  # more rows than columns: a fraction of the width
    with compress_activations(model, rank=rank, min_bytes=0) as stats:
        loss = model(x).sum()
    loss.backward()
    if expected is None:
        assert stats.compressed == 0 and stats.kept["rank_too_high"] == 1
    else:
        assert stats.modules[""].ranks == {expected}
