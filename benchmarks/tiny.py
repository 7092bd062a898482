"""A tiny random sentence-transformers model for ``--quick``: the whole suite in seconds, no download.

Its vocabulary is the most frequent words of the sample texts (plus single characters), so the
sample calibration/held-out/STS files tokenize into real-looking sequences rather than [UNK] runs.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,?!'-"


def write_vocab(folder: Path, sources: list[Path], words: int = 400) -> Path:
    """vocab.txt of the special tokens, the ``words`` commonest words and every single character."""
    counts: Counter[str] = Counter()
    for path in sources:
        counts.update(re.findall(r"[a-z]+", path.read_text(encoding="utf-8").lower()))
    vocab = [*SPECIAL, *(w for w, _ in counts.most_common(words)), *CHARS]
    vocab += [f"##{c}" for c in CHARS]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "vocab.txt"
    path.write_text("\n".join(dict.fromkeys(vocab)) + "\n", encoding="utf-8")
    return path


def make_tiny_sentence_transformer(
    folder: Path, sources: list[Path], hidden: int = 64, layers: int = 2, seed: int = 0
) -> Path:
    """A random BERT encoder (mean pooling + normalisation) laid out as sentence-transformers saves it.

    Positions go to 128 so the same sequence lengths as the real run (32 and 128) can be measured.
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    vocab_file = write_vocab(folder, sources)
    transformers.BertTokenizerFast(
        vocab_file=str(vocab_file), model_max_length=128
    ).save_pretrained(folder)
    config = transformers.BertConfig(
        vocab_size=len(vocab_file.read_text(encoding="utf-8").split()),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=hidden * 4,
        max_position_embeddings=128,
    )
    transformers.AutoModel.from_config(config).save_pretrained(folder, safe_serialization=True)
    write_sentence_transformer_layout(folder, hidden, 128)
    return folder


def write_sentence_transformer_layout(folder: Path, hidden: int, max_seq_length: int) -> None:
    """The files that make a Hugging Face folder a sentence-transformers model (mean pooling +
    normalisation); shared with the tests' tiny models."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]  # fmt: skip
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": hidden, "pooling_mode_mean_tokens": True})
    )
    (folder / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_seq_length})
    )
