"""Tiny random decoders (Llama, Qwen2, GPT-2) saved like hub checkpoints, for the decoder tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conftest import write_texts, write_tokenizer

KINDS = ("llama", "qwen2", "gpt2")


def make_tiny_decoder(folder: Path, kind: str = "llama", seed: int = 0, head: str = "lm") -> Path:
    """Two layers, width 64 (GPT-2: 32), grouped-query attention where the architecture has it; ~100 tokens."""
    import torch
    import transformers

    torch.manual_seed(seed)
    write_tokenizer(folder)
    vocab = len((folder / "vocab.txt").read_text().split())
    if kind == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128, eos_token_id=3
        )
    else:
        cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[kind]
        config = cls(
            vocab_size=vocab,
            hidden_size=64,  # head size 16: the smallest GroupQueryAttention takes
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=True,
            bos_token_id=2,
            eos_token_id=3,
        )
    if head == "seq":
        config.num_labels = 2
        config.pad_token_id = 0
        model = transformers.AutoModelForSequenceClassification.from_config(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
    # Random weights at the default 0.02 scale give near-uniform logits, where greedy ties make
    # fp32 kernels disagree by chance; a wider init gives decided argmaxes like a trained model.
    std = 0.3 if kind == "gpt2" else 0.2  # the same spread of logits at twice the width
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, std)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def prompts_for(folder: Path, count: int = 3) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    texts = ["the cat was on a mat", "a dog and a bird", "is it red or blue?"][:count]
    return [tok(t)["input_ids"] for t in texts]


def write_gguf(path: Path, arch: str) -> Path:
    """A GGUF header naming ``arch`` (or none, for "") with one embedding tensor and no other."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((64, 16), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_decoder_config(root: Path, kind: str = "llama", seed: int = 0, **overrides: Any) -> Any:
    """A build of a tiny decoder with 40 texts as calibration and held-out set. int8 by default:
    on random weights int4 parts from fp32's greedy path at once, int8 stays on it."""
    from edgepack.config import BuildConfig

    root.mkdir(parents=True, exist_ok=True)
    texts = write_texts(root / "texts.txt", 40)
    settings = {
        "model": str(make_tiny_decoder(root / "m", kind, seed=seed)),
        "calibration": str(texts),
        "heldout": str(texts),
        "target": "arm64",
        "precision": "int8",
        "out": str(root / "dist"),
        "max_drop": 0.2,
        **overrides,
    }
    return BuildConfig(**settings)


def build_tiny_decoder(root: Path, kind: str = "llama", seed: int = 0, **overrides: Any) -> Any:
    """The one bundle ``tiny_decoder_config`` builds (its BuildResult)."""
    from edgepack.pipeline import build
    from edgepack.progress import Progress

    (result,) = build(tiny_decoder_config(root, kind, seed, **overrides), Progress(quiet=True))
    return result
