"""A GGUF file (llama.cpp's format) -> a cached Hugging Face folder the rest of the build reads.

transformers dequantizes GGUF tensors into a float model; the folder is written once per file
(keyed by its SHA-256) because loading takes ~35 s for a 135 M-parameter model. The file is
checked first - magic, a readable header, the architecture - so a bad file fails in a second with
one line instead of deep inside transformers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgepack.artifacts import HFModel, sha256_file
from edgepack.cache import cached, lookup
from edgepack.errors import UserError
from edgepack.families import decoder
from edgepack.load import gguf_blocks, gguf_config

MAGIC = b"GGUF"
# save_pretrained copies the whole GGUF into the folder under this name (94 MB for the sample);
# the fast tokenizer.json beside it is what the build and the device use.
GGUF_COPY = "tokenizer.model"
# The conversion's code version, in its cache key beside the GGUF's SHA-256 and transformers'
# version: bump when the folder written here changes.
FORMAT_VERSION = 3  # 2: config values transformers drops restored; gguf.json; 3: gguf_blocks
# What the file was, beside the folder's config (the decoder manifest's source.gguf).
RECORD = "gguf.json"
# GGUF metadata (under the architecture's prefix) -> the config.json size transformers fills.
SIZES = {
    "block_count": "num_hidden_layers",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "context_length": "max_position_embeddings",
    "vocab_size": "vocab_size",
}
# GGUF quantization packs down to ~1.6 bits a weight (IQ1): up to 5 parameters a byte of file.
PARAMS_PER_BYTE = 8
# GGUF architecture names that are not the transformers model type they load as (transformers
# loads a "gemma3" GGUF as the text-only Gemma3ForCausalLM).
MODEL_TYPE_OF = {"gemma3": "gemma3_text"}


def read_architecture(path: Path) -> tuple[str, Any]:
    """The ``general.architecture`` of a GGUF file and its reader; UserError when the file is not
    a whole GGUF. The sizes its metadata declares are checked too, since transformers allocates
    them."""
    with open(path, "rb") as handle:
        if handle.read(4) != MAGIC:
            raise UserError(f"{path} is not a GGUF file (it does not start with 'GGUF').")
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        if "general.architecture" not in reader.fields:
            raise UserError(f"{path} names no general.architecture, so it is not a model GGUF.")
        field = reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode("utf-8")
        config = _declared(reader, arch)
    except ImportError:
        raise UserError("reading .gguf files needs the gguf package (pip install gguf).") from None
    except (ValueError, KeyError, IndexError, OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is truncated or corrupt: {_summary(exc)}") from None
    config["model_type"] = MODEL_TYPE_OF.get(arch, arch)
    if config["model_type"] in decoder.MODEL_TYPES:
        decoder.check_config(config, path, path.stat().st_size, PARAMS_PER_BYTE)
    return arch, reader


def _declared(reader: Any, arch: str) -> dict[str, Any]:
    """The config.json transformers would make from the metadata, as far as sizes go (a
    per-layer list, as some architectures declare, is left to transformers)."""
    config: dict[str, Any] = {"model_type": arch}
    for key, name in SIZES.items():
        field = reader.fields.get(f"{arch}.{key}")
        if field is not None and len(field.data) == 1:
            config[name] = field.parts[field.data[0]].tolist()[0]
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if "vocab_size" not in config and tokens is not None:
        config["vocab_size"] = len(tokens.data)
    return config


def _summary(exc: BaseException) -> str:
    """An exception as one short line; torch's "Error(s) in loading state_dict for X:" says what
    failed only on its next line, so a first line ending in a colon takes the second along."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
    return text if len(text) <= 240 else text[:237] + "..."


def _supported() -> tuple[str, ...]:
    """GGUF architectures transformers reads whose model type the decoder family serves."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return tuple(
        a for a in GGUF_SUPPORTED_ARCHITECTURES if MODEL_TYPE_OF.get(a, a) in decoder.MODEL_TYPES
    )


def gguf_folder(path: Path) -> Path:
    """The Hugging Face folder made from ``path`` (cached by content). A file converted before
    skips the checks: the same bytes passed them (parsing the sample's metadata, 49k tokenizer
    entries, takes 6-18 s)."""
    import transformers

    digest = sha256_file(path)
    settings = {"v": FORMAT_VERSION, "transformers": transformers.__version__}
    if (hit := lookup("gguf", settings, digest, HFModel)) is not None:
        return hit.path
    arch, reader = read_architecture(path)
    supported = _supported()
    if arch not in supported:
        raise UserError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(supported)}."
        )
    record, _ = cached(
        "gguf", settings, digest, HFModel, lambda out: _convert(path, (arch, reader), digest, out)
    )
    return record.path


def _convert(path: Path, read: tuple[str, Any], digest: str, out: Path) -> HFModel:
    """The Hugging Face folder, with what transformers drops from the config restored, the
    file's Q4_0/Q4_1/Q8_0 blocks kept (gguf_blocks.py) and a ``gguf.json`` saying what the file
    was (its quantization, what was restored)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch, reader = read
    overrides = gguf_config.restored(reader, arch)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32, **overrides
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise UserError(f"transformers could not load {path}: {_summary(exc)}") from None
    folder = out / "model"
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    (folder / GGUF_COPY).unlink(missing_ok=True)
    kept = gguf_blocks.save_blocks(reader, model, arch, folder)
    record = {
        "file": path.name,
        "sha256": digest,
        "architecture": arch,
        **gguf_config.source_quantization(reader),
        "restored": overrides,
        "blocks_kept": kept,  # parameters per type the weight-only stage can carry as they are
    }
    (folder / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return HFModel(
        path=folder,
        task="text-generation",
        source=str(path),
        library="transformers",
        weights_sha256=digest,
        model_type=MODEL_TYPE_OF.get(arch, arch),
        max_length=decoder.context_length(model.config.to_dict()),
    )
