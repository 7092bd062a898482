"""Tiny random decoders (Llama, Qwen2, GPT-2, and the variants the fused graph writes: Llama 3 rope
scaling, Qwen3, Phi-3, Gemma 3) saved like hub checkpoints, for the decoder tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conftest import write_texts, write_tokenizer

KINDS = ("llama", "qwen2", "gpt2")
# Architectures with something the plain Llama layer lacks, each written by the fused graph.
VARIANTS = ("llama3", "qwen3", "phi3", "gemma3")
_SHAPE = {
    "vocab_size": 0,  # set from the tokenizer
    "hidden_size": 64,  # head size 16: the smallest GroupQueryAttention takes
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "tie_word_embeddings": True,
    "bos_token_id": 2,
    "eos_token_id": 3,
}


def _variant_config(kind: str, vocab: int) -> Any:
    """Each variant with its difference switched on, and small enough that a 40-token greedy run
    crosses it (sliding windows of 16 and 24 positions, longrope's original context)."""
    import transformers

    shape = {**_SHAPE, "vocab_size": vocab}
    if kind == "llama3":
        rope = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,  # wavelengths 8-32 are blended, longer scaled
        }
        return transformers.LlamaConfig(**shape, rope_scaling=rope)
    if kind == "qwen3":
        # Qwen3-0.6B's head size, wider than hidden / heads (and what a GGUF of it implies).
        return transformers.Qwen3Config(**shape, head_dim=128)
    if kind == "phi3":
        # Phi-4-mini's rotary fraction on a head of 64: 48 rotated channels, 16 passed through.
        half = 24
        rope = {
            "type": "longrope",
            "short_factor": [1.0 + 0.1 * i for i in range(half)],
            "long_factor": [2.0 + 0.2 * i for i in range(half)],
        }
        return transformers.Phi3Config(
            # Phi-4-mini's 131072 positions over an original 4096, at a size where the bundle's
            # context (2048) stays within the original, so only the short factors are ever used.
            **{
                **shape,
                "hidden_size": 128,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "max_position_embeddings": 4096,
            },
            partial_rotary_factor=0.75,
            original_max_position_embeddings=2048,
            rope_scaling=rope,
            sliding_window=24,
            pad_token_id=0,
        )
    return transformers.Gemma3TextConfig(
        **shape,
        head_dim=32,  # q is 128 wide on a hidden size of 64, as Gemma's heads are wider than it
        query_pre_attn_scalar=24,  # not the head size: GroupQueryAttention's scale must say so
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=16,
        rope_theta=10_000.0,
        rope_local_base_freq=100.0,
        pad_token_id=0,
    )


def make_tiny_decoder(
    folder: Path,
    kind: str = "llama",
    seed: int = 0,
    head: str = "lm",
    eos: int | None = 3,
    **config: Any,
) -> Path:
    """Two layers, width 64 (GPT-2: 32), grouped-query attention where the architecture has it; ~100 tokens.
    ``eos=None`` lets every greedy run go the whole way (a random model soon says [SEP]);
    ``config`` overrides the architecture's config values."""
    import torch
    import transformers

    torch.manual_seed(seed)
    write_tokenizer(folder)
    vocab = len((folder / "vocab.txt").read_text().split())
    if kind in VARIANTS:
        cfg = _variant_config(kind, vocab)
    elif kind == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128, eos_token_id=3
        )
    else:
        cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[kind]
        cfg = cls(
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
    cfg.eos_token_id = eos
    for key, value in config.items():
        setattr(cfg, key, value)
    if head == "seq":
        cfg.num_labels = 2
        cfg.pad_token_id = 0
        model = transformers.AutoModelForSequenceClassification.from_config(cfg)
    else:
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    # Random weights at the default 0.02 scale give near-uniform logits, where greedy ties make
    # fp32 kernels disagree by chance; a wider init gives decided argmaxes like a trained model.
    std = 0.3 if kind == "gpt2" else 0.2  # the same spread of logits at twice the width
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, std)
            elif kind in VARIANTS:  # norm weights (Gemma's are zeros, it adds 1) and biases
                p.add_(torch.randn_like(p) * 0.1)
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


# llama.cpp's architecture name per kind, and what it adds to norm weights: Gemma's are stored as
# 1 + w (transformers subtracts the 1 when loading).
GGUF_ARCHS = {
    "gemma3": ("gemma3", 1.0),
    "qwen3": ("qwen3", 0.0),
    "phi3": ("phi3", 0.0),
    "llama3": ("llama", 0.0),
    "qwen2": ("qwen2", 0.0),
}
# Gemma 3 as a GGUF can hold it: llama.cpp fixes the local rope base (10000), the sliding pattern
# (five local layers, then a global one) and the query scale (the key width) for the small sizes.
GEMMA3_AS_GGUF = {
    "rope_local_base_freq": 10_000.0,
    "query_pre_attn_scalar": 32,
    "layer_types": ["sliding_attention", "sliding_attention"],
}


def _llama_cpp_extras(writer: Any, cfg: Any, head_dim: int) -> None:
    """What llama.cpp's converter writes beyond the common hyperparameters: llama3 rope scaling
    as per-frequency divisors, Phi-3's rotary width and longrope tables."""
    import math

    import numpy as np

    rope = getattr(cfg, "rope_scaling", None) or {}
    kind = rope.get("rope_type") or rope.get("type")
    if kind == "llama3":
        freqs = cfg.rope_theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        low, high = rope["low_freq_factor"], rope["high_freq_factor"]
        original, factor = rope["original_max_position_embeddings"], rope["factor"]
        smooth = np.clip((original * freqs / (2 * math.pi) - low) / (high - low), 0.0, 1.0)
        divisors = 1.0 / ((1 - smooth) / factor + smooth)
        writer.add_tensor("rope_freqs.weight", divisors.astype(np.float32))
    if cfg.model_type == "phi3":
        writer.add_rope_dimension_count(int(head_dim * cfg.partial_rotary_factor))
    if kind == "longrope":
        scale = cfg.max_position_embeddings / cfg.original_max_position_embeddings
        writer.add_rope_scaling_attn_factors(
            math.sqrt(1 + math.log(scale) / math.log(cfg.original_max_position_embeddings))
        )
        writer.add_rope_scaling_orig_ctx_len(cfg.original_max_position_embeddings)
        for which in ("long", "short"):
            table = np.asarray(rope[f"{which}_factor"], dtype=np.float32)
            writer.add_tensor(f"rope_factors_{which}.weight", table)


def _rotary_halves_interleaved(weight: Any, heads: int) -> Any:
    """llama.cpp's converter reorders Llama's q/k rows per head (rotary halves -> pairs), and
    transformers reorders them back when it loads a "llama" GGUF."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


_FILE_TYPES = {"F32": 0, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7}


def write_model_gguf(folder: Path, kind: str, path: Path, quant: str = "F32") -> Path:
    """The tiny decoder in ``folder`` as llama.cpp writes it: hyperparameters, the word list as a
    SentencePiece-style tokenizer, and every tensor under its GGUF name (2-D ones as ``quant``:
    Q4_0, Q4_1 or Q8_0; gguf can read K-quants but not write them)."""
    import gguf
    import numpy as np
    import torch
    import transformers

    arch, norm_offset = GGUF_ARCHS[kind]
    cfg = transformers.AutoConfig.from_pretrained(str(folder))
    net = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_file_type(_FILE_TYPES[quant])
    if getattr(cfg, "sliding_window", None):
        writer.add_sliding_window(cfg.sliding_window)
    _llama_cpp_extras(writer, cfg, head_dim)
    words = (folder / "vocab.txt").read_text().split()
    writer.add_tokenizer_model("llama")
    writer.add_token_list(words)
    writer.add_token_types([1] * len(words))
    writer.add_token_scores([0.0] * len(words))
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(3)
    writer.add_pad_token_id(0)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    kind_of = gguf.GGMLQuantizationType[quant]
    for key, value in net.state_dict().items():
        if key == "lm_head.weight":
            continue  # tied to the embedding
        base, suffix = key.rsplit(".", 1)
        array = value.float().numpy()
        if base.endswith("norm"):
            array = array + np.float32(norm_offset)
        if arch == "llama" and base.endswith(("q_proj", "k_proj")):
            heads = cfg.num_attention_heads if "q_proj" in base else cfg.num_key_value_heads
            array = _rotary_halves_interleaved(array, heads)
        if array.ndim == 2 and kind_of != gguf.GGMLQuantizationType.F32:
            data = gguf.quants.quantize(array, kind_of)
            writer.add_tensor(f"{names.get_name(base)}.{suffix}", data, raw_dtype=kind_of)
        else:
            writer.add_tensor(f"{names.get_name(base)}.{suffix}", array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def build_fails_with(args: list[str], out: Path, *words: str) -> str:
    """``edgepack build`` exits 2 with exactly one ``Error:`` line holding every word, writing
    nothing; returns that line."""
    from click.testing import CliRunner

    from edgepack.cli import cli

    result = CliRunner().invoke(cli, ["build", *args, "--out", str(out), "--quiet"])
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.output.strip().splitlines()
    assert lines and lines[-1].startswith("Error: "), result.output
    assert sum(line.startswith("Error") for line in lines) == 1, result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[-1], (word, lines[-1])
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())
    return lines[-1]


# A chat template in the tiny tokenizer's own words; [SEP], a special token, ends each turn.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}[SEP]{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def build_chat_decoder(root: Path) -> Path:
    """The folder of a tiny decoder bundle with a chat template and no EOS, so a continuation runs
    as long as asked; a chat reply also ends at [SEP], the template's end of turn."""
    import json

    from edgepack.pipeline import build
    from edgepack.progress import Progress

    model = make_tiny_decoder(root / "chatty", eos=None, seed=5)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = TINY_CHAT_TEMPLATE
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (result,) = build(tiny_decoder_config(root / "build", model=str(model)), Progress(quiet=True))
    return result.folder
