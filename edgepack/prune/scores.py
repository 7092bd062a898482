"""How much each head and FFN neuron matters, measured on calibration texts without retraining.

``taylor``: a mask of ones multiplies each head's context and each neuron's activation (one mask
row per example), and the importance is the Fisher diagonal sum_examples (dL/dm)^2 - the
per-example first-order Taylor term, squared so it estimates the loss change of removing the unit
(Michel et al. 2019; Kwon et al. 2022). Label-free losses that have a gradient at the unpruned
model:
  - embeddings: reconstruct the unpruned, L2-normalised pooled embedding under Gaussian target noise,
    L = 1/2 |e(m) - (e0 + r)|^2. At m = 1 the gradient is -J^T r, so E[(dL/dm)^2] = |J_i|^2, the
    squared change of the embedding per unit of mask - exactly what cosine fidelity penalises.
    (KL or MSE to an identical copy would have zero gradient here.)
  - classifiers: cross-entropy against the model's own argmax predictions.
``activation``: forward only; the mean squared norm of each unit's contribution to the residual
stream (|a_j|^2 |W_out[:, j]|^2 for a neuron, |W_O,h c_h|^2 for a head), so heads and neurons are
ranked in the same units.

Usage: ``heads, neurons = score(net, batches, "taylor", seed=0)`` -> per layer tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from edgepack.prune.net import Net, iterate_outputs
from edgepack.prune.surgery import count_heads, ffn_width, get_path, list_layers


def _loss(net: Net, batch: dict[str, Any], generator: Any) -> Any:
    import torch

    out = net.output(batch)
    if net.kind == "embedding":
        noise = torch.randn(out.shape, generator=generator) / out.shape[-1] ** 0.5
        target = out.detach() + noise
        return 0.5 * ((out - target) ** 2).sum()
    labels = out.detach().argmax(-1)
    loss = torch.nn.functional.cross_entropy(
        out.reshape(-1, out.shape[-1]), labels.reshape(-1), reduction="none"
    )
    if net.kind == "token":
        loss = loss * batch["attention_mask"].reshape(-1)
    return loss.sum()


class _Masks:
    """Forward pre-hooks that multiply head contexts and FFN activations by per-example masks."""

    def __init__(self, net: Net, batch_size: int) -> None:
        import torch

        self.layers = list_layers(net.hf.base_model, net.family)
        fam = net.family
        self.heads = [
            torch.ones(batch_size, count_heads(la, fam), requires_grad=True) for la in self.layers
        ]
        self.neurons = [
            torch.ones(batch_size, ffn_width(la, fam), requires_grad=True) for la in self.layers
        ]
        self.handles = []
        for i, layer in enumerate(self.layers):
            self.handles.append(
                get_path(layer, fam.attn_out).register_forward_pre_hook(self._head_hook(i))
            )
            self.handles.append(
                get_path(layer, fam.ffn_out).register_forward_pre_hook(self._neuron_hook(i))
            )

    def _head_hook(self, i: int) -> Callable[..., Any]:
        def hook(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0]
            mask = self.heads[i].repeat_interleave(x.shape[-1] // self.heads[i].shape[1], dim=1)
            return (x * mask[:, None, :], *args[1:])

        return hook

    def _neuron_hook(self, i: int) -> Callable[..., Any]:
        def hook(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
            return (args[0] * self.neurons[i][:, None, :], *args[1:])

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _taylor(net: Net, batches: list[dict[str, Any]], seed: int) -> tuple[list[Any], list[Any]]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    heads: list[Any] = []
    neurons: list[Any] = []
    params = [p for p in net.hf.parameters() if p.requires_grad]
    for p in params:  # only the masks need gradients
        p.requires_grad_(False)
    try:
        for batch in batches:
            masks = _Masks(net, batch["input_ids"].shape[0])
            try:
                _loss(net, batch, generator).backward()
            finally:
                masks.remove()
            h = [(m.grad.double() ** 2).sum(0) for m in masks.heads]
            n = [(m.grad.double() ** 2).sum(0) for m in masks.neurons]
            heads = h if not heads else [a + b for a, b in zip(heads, h, strict=True)]
            neurons = n if not neurons else [a + b for a, b in zip(neurons, n, strict=True)]
    finally:
        for p in params:
            p.requires_grad_(True)
    return heads, neurons


def _activation(net: Net, batches: list[dict[str, Any]]) -> tuple[list[Any], list[Any]]:
    import torch

    fam = net.family
    layers = list_layers(net.hf.base_model, fam)
    heads = [torch.zeros(count_heads(la, fam), dtype=torch.float64) for la in layers]
    neurons = [torch.zeros(ffn_width(la, fam), dtype=torch.float64) for la in layers]
    valid: list[Any] = []

    def head_hook(i: int) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...]) -> None:
            x = args[0][valid[0]]  # (tokens, heads * d)
            n = heads[i].shape[0]
            ctx = x.reshape(x.shape[0], n, -1)
            w = module.weight.reshape(module.weight.shape[0], n, -1)  # (hidden, heads, d)
            contrib = torch.einsum("thd,ohd->tho", ctx, w)
            heads[i] += (contrib.double() ** 2).sum(-1).sum(0)

        return hook

    def neuron_hook(i: int) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...]) -> None:
            a2 = (args[0][valid[0]].double() ** 2).sum(0)
            neurons[i] += a2 * (module.weight.double() ** 2).sum(0)

        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(get_path(layer, fam.attn_out).register_forward_pre_hook(head_hook(i)))
        handles.append(get_path(layer, fam.ffn_out).register_forward_pre_hook(neuron_hook(i)))
    try:
        with torch.no_grad():
            for batch in batches:
                valid[:] = [batch["attention_mask"].bool()]
                net.output(batch)
    finally:
        for handle in handles:
            handle.remove()
    return heads, neurons


def score(
    net: Net,
    batches: list[dict[str, Any]],
    method: str,
    seed: int,
    gram_of: dict[tuple[int, str], Any] | None = None,
) -> tuple[list[Any], list[Any]]:
    """Per layer: a float64 tensor of head scores and one of neuron scores (higher = keep).

    ``gram_of``: ``prune_obs.grams`` of this model on ``batches``, if already computed.
    """
    net.hf.eval()  # no dropout: scores must be repeatable for one seed
    if method == "taylor":
        return _taylor(net, batches, seed)
    if method == "reconstruction":
        from edgepack.prune.obs import grams, reconstruction_scores

        return reconstruction_scores(net, gram_of or grams(net, batches))
    return _activation(net, batches)


def rank_layers(net: Net, batches: list[dict[str, Any]], count: int) -> list[int]:
    """Greedily pick ``count`` layers whose removal changes the output least (mean cosine)."""
    import torch

    from edgepack.prune.surgery import set_path

    fam = net.family
    all_layers = list_layers(net.hf.base_model, fam)
    reference = list(iterate_outputs(net, batches))
    dropped: list[int] = []
    try:
        for _ in range(count):
            best, best_cos = -1, -2.0
            for cand in range(len(all_layers)):
                if cand in dropped:
                    continue
                keep = [la for i, la in enumerate(all_layers) if i not in (*dropped, cand)]
                set_path(net.hf.base_model, fam.layers, torch.nn.ModuleList(keep))
                cos = [
                    torch.nn.functional.cosine_similarity(a, b, dim=-1).mean().item()
                    for a, b in zip(reference, iterate_outputs(net, batches), strict=True)
                ]
                if sum(cos) / len(cos) > best_cos:
                    best, best_cos = cand, sum(cos) / len(cos)
            dropped.append(best)
    finally:
        set_path(net.hf.base_model, fam.layers, torch.nn.ModuleList(all_layers))
    return sorted(dropped)
