"""Encoders: embedders, classifiers and taggers (BERT and its relatives).

Everything the stages would otherwise assume about "a model" lives here: which architectures and
tasks are served, which transformers class loads a task, which graph output is the one fidelity is
measured on, and how the padding mask of a batch of feeds is found. A second family (generative
decoders) gets a module of its own beside this one instead of ``if decoder:`` across the stages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgepack.families import dims

NAME = "encoder"
GENERATIVE = False
# Architectures the export, quantization and pruning stages are written and tested for.
MODEL_TYPES = ("bert", "distilbert", "roberta", "xlm-roberta", "camembert", "electra", "mpnet")
TASKS = ("feature-extraction", "text-classification", "token-classification")
# Tasks whose output is one score per class: fidelity also reports top-1 agreement for them.
CLASSIFIER_TASKS = ("text-classification", "token-classification")
# transformers' auto class per task; prune and distil rebuild models through the same class.
AUTO_CLASSES = {
    "feature-extraction": "AutoModel",
    "text-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
}
# The graph output a device uses, and the one fidelity is measured on.
PRIMARY_OUTPUT = {
    "feature-extraction": "last_hidden_state",
    "text-classification": "logits",
    "token-classification": "logits",
}
SENTENCE_EMBEDDING = "sentence_embedding"


def detect_task(config: dict[str, Any]) -> str:
    """The task a model folder's ``config.json`` was saved for (a bare encoder embeds)."""
    archs = " ".join(config.get("architectures") or [])
    if "ForSequenceClassification" in archs:
        return "text-classification"
    if "ForTokenClassification" in archs:
        return "token-classification"
    return "feature-extraction"


def primary_output(task: str, library: str) -> str:
    """sentence-transformers models export pooling and normalisation: the device gets the embedding."""
    if library == "sentence_transformers":
        return SENTENCE_EMBEDDING
    return PRIMARY_OUTPUT[task]


def auto_class(task: str) -> Any:
    """The transformers class that loads a folder saved for ``task``."""
    import transformers

    return getattr(transformers, AUTO_CLASSES[task])


def masks(feeds: list[dict[str, Any]]) -> list[Any] | None:
    """Per-batch padding masks, so token outputs are compared on real tokens only."""
    if not feeds or "attention_mask" not in feeds[0]:
        return None
    return [f["attention_mask"] for f in feeds]


# The task whose fidelity figures fit each kind of primary output (see ``output_kind``).
KIND_TASK = {
    "sentence": "feature-extraction",
    "tokens": "feature-extraction",
    "logits": "text-classification",
    "token-logits": "token-classification",
}


def output_kind(task: str, library: str) -> str:
    """What the primary output holds: a pooled sentence embedding, token states, one row of class
    logits per text, or class logits per token. Distillation and pruning choose losses by it."""
    if task == "text-classification":
        return "logits"
    if task == "token-classification":
        return "token-logits"
    return "sentence" if library == "sentence_transformers" else "tokens"


# The sizes an encoder's config declares, under the names its model types use (DistilBERT says
# dim, n_layers, n_heads, hidden_dim), and whether null is allowed.
DIMENSIONS = {
    "vocab": (("vocab_size",), False),
    "hidden": (("hidden_size", "dim"), False),
    "layers": (("num_hidden_layers", "n_layers"), False),
    "heads": (("num_attention_heads", "n_heads"), False),
    "ffn": (("intermediate_size", "hidden_dim"), False),
    "positions": (("max_position_embeddings",), False),
    "segments": (("type_vocab_size",), False),
    "embedding": (("embedding_size",), True),  # ELECTRA's embeddings are narrower than its layers
}
NUMBERS = ("layer_norm_eps",)


def check_config(config: dict[str, Any], where: Path, weight_bytes: int) -> None:
    """Types, head split and size of an encoder config, before transformers builds anything."""
    sizes = dims.read(config, str(config.get("model_type")), where, DIMENSIONS)
    dims.positive_numbers(config, NUMBERS, where)
    dims.divisible(sizes, "hidden", "heads", "hidden_size and num_attention_heads", where)
    hidden, ffn = sizes["hidden"] or 0, sizes["ffn"] or 0
    rows = (sizes["vocab"] or 0) + (sizes["positions"] or 0) + (sizes["segments"] or 0)
    # Embedding tables, then per layer the four attention projections and the two FFN matrices.
    params = rows * (sizes["embedding"] or hidden) + (sizes["layers"] or 0) * (
        4 * hidden * hidden + 2 * hidden * ffn
    )
    dims.check_size(params, weight_bytes, where)
