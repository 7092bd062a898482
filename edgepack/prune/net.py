"""The model being pruned, as the scoring, refit and allocation steps all see it.

``Net`` pairs the module that produces the primary output (a SentenceTransformer or a transformers
model) with the transformers model whose layers are edited, so every step measures the same output.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from edgepack.prune.surgery import Family

# Per sub-layer: its output projection, a module whose input is the residual, the LayerNorm after.
SUBLAYERS = {"attn": ("attn_out", "query", "attn_norm"), "ffn": ("ffn_out", "ffn_in", "ffn_norm")}


@dataclass
class Net:
    """The module to run (a SentenceTransformer or a transformers model) and the model to prune."""

    runner: Any  # called with a batch of tensors
    hf: Any  # the transformers PreTrainedModel inside it
    family: Family
    kind: str  # "embedding" | "sequence" | "token"

    def output(self, batch: dict[str, Any]) -> Any:
        """The primary output: normalised pooled embedding, or logits."""
        import torch

        if self.kind == "embedding":
            if self.runner is not self.hf:
                emb = self.runner(dict(batch))["sentence_embedding"]
            else:
                hidden = self.hf(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            return torch.nn.functional.normalize(emb, dim=-1)
        return self.hf(**batch).logits


def make_batches(
    tokenizer: Any, texts: tuple[str, ...], seq_len: int, batch_size: int = 16
) -> list[dict[str, Any]]:
    """Tokenized batches padded to their longest text (scores do not depend on padding)."""
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=seq_len,
            return_tensors="pt",
        )
        out.append(dict(enc))
    return out


def iterate_outputs(net: Net, batches: list[dict[str, Any]]) -> Iterator[Any]:
    import torch

    with torch.no_grad():
        for batch in batches:
            yield net.output(batch)
