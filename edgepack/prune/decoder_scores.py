"""What a generative decoder's layers and FFN channels are worth, measured on calibration text.

Everything here runs the PyTorch model on one token stream cut into equal windows, without a KV
cache, in fp32: the scores feed a plan that is applied once, so they need to be comparable, not
fast. ``prune/decoder.py`` decides with them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def windows(ids: list[int], seq_len: int) -> torch.Tensor:
    """The stream as (windows, seq_len) rows; a tail shorter than a window is dropped, unless it
    is all there is."""
    if len(ids) < 2:
        raise ValueError("need at least two calibration tokens")
    count = max(1, len(ids) // seq_len)
    length = min(seq_len, len(ids))
    return torch.tensor(ids[: count * length], dtype=torch.long).view(count, length)


def layers_of(model: Any) -> Any:
    """The decoder layers' ModuleList (``model.model.layers`` for the served families)."""
    return model.model.layers


@torch.no_grad()
def mean_loss(model: Any, rows: torch.Tensor, batch: int = 4) -> float:
    """Next-token cross entropy averaged over every predicted token (exp of it: perplexity)."""
    total = sum(_summed_loss(model, rows[i : i + batch]) for i in range(0, len(rows), batch))
    return total / rows[:, 1:].numel()


@contextmanager
def _replayed(layers: list[Any], outputs: list[torch.Tensor], skip: int) -> Iterator[None]:
    """Layers before ``skip`` hand back their recorded outputs without computing, ``skip``
    passes its input through: the model as if layer ``skip`` were removed, at the cost of the
    layers after it only."""

    def recorded(out: torch.Tensor) -> Any:
        return lambda *_args, **_kwargs: out

    def through(hidden_states: torch.Tensor, *_args: Any, **_kwargs: Any) -> torch.Tensor:
        return hidden_states

    for j in range(skip):
        layers[j].forward = recorded(outputs[j])
    layers[skip].forward = through
    try:
        yield
    finally:
        for j in range(skip + 1):
            del layers[j].forward  # the instance attribute; the class's forward shows again


@torch.no_grad()
def skip_losses(model: Any, rows: torch.Tensor, batch: int = 4) -> list[float]:
    """Calibration loss increase when each layer alone is skipped. Each layer's output on the
    unpruned model is recorded once, so skipping layer i recomputes only the layers after it."""
    layers = list(layers_of(model))
    increases = [0.0] * len(layers)
    count = 0
    outputs: list[torch.Tensor] = []
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        outputs.clear()
        handles = [
            layer.register_forward_hook(lambda _m, _a, out: outputs.append(out)) for layer in layers
        ]
        try:
            base = _summed_loss(model, chunk)
        finally:
            for handle in handles:
                handle.remove()
        for i in range(len(layers)):
            with _replayed(layers, list(outputs), i):
                increases[i] += _summed_loss(model, chunk) - base
        count += chunk[:, 1:].numel()
    return [v / count for v in increases]


def _summed_loss(model: Any, chunk: torch.Tensor) -> float:
    logits = model(input_ids=chunk, use_cache=False).logits[:, :-1].float()
    return float(
        torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum"
        )
    )


@torch.no_grad()
def cosine_changes(model: Any, rows: torch.Tensor, batch: int = 4) -> list[float]:
    """1 - cos(h_in, h_out) of each layer's residual stream, averaged over tokens: how much the
    layer changes what flows past it (one forward pass)."""
    layers = list(layers_of(model))
    sums = [0.0] * len(layers)

    def hook(i: int) -> Any:
        def record(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            h_in = (args[0] if args else kwargs["hidden_states"]).float()
            h_out = (out[0] if isinstance(out, tuple) else out).float()
            cos = torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)
            sums[i] += float((1.0 - cos).sum())

        return record

    handles = [
        layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)
    ]
    count = _run_hooked(model, rows, batch, handles)
    return [s / count for s in sums]


def _run_hooked(model: Any, rows: torch.Tensor, batch: int, handles: list[Any]) -> int:
    """Feed every calibration window through ``model`` with the recording hooks in place, then
    remove them; returns the tokens fed."""
    count = 0
    try:
        for start in range(0, len(rows), batch):
            chunk = rows[start : start + batch]
            model(input_ids=chunk, use_cache=False)
            count += chunk.numel()
    finally:
        for handle in handles:
            handle.remove()
    return count


@torch.no_grad()
def channel_scores(model: Any, rows: torch.Tensor, batch: int = 4) -> list[torch.Tensor]:
    """Per layer, per FFN channel: mean |act(gate) * up| over calibration tokens times the norm
    of the down projection's column, i.e. how much each channel writes into the residual stream."""
    layers = list(layers_of(model))
    sums = [torch.zeros(layer.mlp.down_proj.in_features, dtype=torch.float64) for layer in layers]

    def hook(i: int) -> Any:
        def record(_m: Any, args: tuple[Any, ...]) -> None:
            sums[i] += args[0].detach().abs().double().reshape(-1, args[0].shape[-1]).sum(0)

        return record

    handles = [
        layer.mlp.down_proj.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)
    ]
    count = _run_hooked(model, rows, batch, handles)
    return [
        (s / count).float() * layer.mlp.down_proj.weight.float().norm(dim=0)
        for s, layer in zip(sums, layers, strict=True)
    ]


def layer_scores(model: Any, rows: torch.Tensor, measure: str) -> list[float]:
    """Importance of each layer under ``measure`` (higher: keep)."""
    if measure == "skip_loss":
        return skip_losses(model, rows)
    if measure == "cosine":
        return cosine_changes(model, rows)
    raise ValueError(f"unknown layer measure {measure!r}")
