"""Where the prunable structures live in each encoder family, and the edits that remove them.

Pruning is one recipe over a handful of module paths: heads are cut with the models' own
``prune_heads`` (which also shrinks Q/K/V rows, the attention output's columns and the head count),
FFN neurons with ``prune_linear_layer`` on the intermediate rows and the output columns, and layers
by rebuilding the layer list. ``rebuild`` replays a ``pruning.json`` record onto a freshly built
model so uneven FFN widths, which ``config.json`` cannot describe, load back exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgepack.errors import UserError


@dataclass(frozen=True)
class Family:
    """Dotted module paths (from the base model / from one layer) and config keys of one family."""

    layers: str  # base model -> ModuleList of layers
    attention: str  # layer -> module with prune_heads()
    heads_owner: str  # layer -> module holding the per-layer head count
    heads_attr: str
    query: str  # its input is the layer's input (the attention residual)
    attn_out: str  # attention output projection; its input is the per-head context
    attn_norm: str  # its input is attention output + residual
    ffn_in: str
    ffn_out: str
    ffn_norm: str
    n_layers_key: str
    n_heads_key: str
    ffn_key: str


_BERT = Family(
    layers="encoder.layer",
    attention="attention",
    heads_owner="attention.self",
    heads_attr="num_attention_heads",
    query="attention.self.query",
    attn_out="attention.output.dense",
    attn_norm="attention.output.LayerNorm",
    ffn_in="intermediate.dense",
    ffn_out="output.dense",
    ffn_norm="output.LayerNorm",
    n_layers_key="num_hidden_layers",
    n_heads_key="num_attention_heads",
    ffn_key="intermediate_size",
)
_DISTILBERT = Family(
    layers="transformer.layer",
    attention="attention",
    heads_owner="attention",
    heads_attr="n_heads",
    query="attention.q_lin",
    attn_out="attention.out_lin",
    attn_norm="sa_layer_norm",
    ffn_in="ffn.lin1",
    ffn_out="ffn.lin2",
    ffn_norm="output_layer_norm",
    n_layers_key="n_layers",
    n_heads_key="n_heads",
    ffn_key="hidden_dim",
)
# MPNet is left out on purpose: its relative position bias is computed once for all 12 heads and
# added to every layer's scores, so a layer with fewer heads no longer broadcasts.
FAMILIES: dict[str, Family] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "camembert": _BERT,
    "electra": _BERT,
    "distilbert": _DISTILBERT,
}


def get_family(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise UserError(
            f"structured pruning does not support model type {model_type!r}. "
            f"Supported model types are: {', '.join(sorted(FAMILIES))}."
        )
    return FAMILIES[model_type]


def get_path(root: Any, path: str) -> Any:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def set_path(root: Any, path: str, value: Any) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_path(root, parent) if parent else root, name, value)


def list_layers(base: Any, family: Family) -> list[Any]:
    return list(get_path(base, family.layers))


def count_heads(layer: Any, family: Family) -> int:
    return int(getattr(get_path(layer, family.heads_owner), family.heads_attr))


def head_size(layer: Any, family: Family) -> int:
    return int(get_path(layer, family.heads_owner).attention_head_size)


def ffn_width(layer: Any, family: Family) -> int:
    return int(get_path(layer, family.ffn_in).out_features)


def drop_layers(model: Any, family: Family, keep: list[int]) -> None:
    """Keep only the layers ``keep`` (original indices, ascending) and renumber what depends on it."""
    import torch

    base = model.base_model
    layers = list_layers(base, family)
    kept = torch.nn.ModuleList([layers[i] for i in keep])
    for new_index, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    set_path(base, family.layers, kept)
    setattr(model.config, family.n_layers_key, len(keep))
    old = {int(k): v for k, v in (model.config.pruned_heads or {}).items()}
    model.config.pruned_heads = {n: old[i] for n, i in enumerate(keep) if old.get(i)}


def prune_heads(model: Any, remove: dict[int, list[int]]) -> None:
    """Remove heads (current layer index -> current head indices) with the model's own method."""
    remove = {layer: sorted(heads) for layer, heads in remove.items() if heads}
    if remove:
        model.prune_heads(remove)


def prune_ffn(model: Any, family: Family, keep: dict[int, list[int]]) -> None:
    """Keep only the listed intermediate neurons: rows of the FFN input, columns of its output."""
    import torch
    from transformers.pytorch_utils import prune_linear_layer

    for index, layer in enumerate(list_layers(model.base_model, family)):
        if index not in keep or len(keep[index]) == ffn_width(layer, family):
            continue
        idx = torch.tensor(sorted(keep[index]), dtype=torch.long)
        set_path(layer, family.ffn_in, prune_linear_layer(get_path(layer, family.ffn_in), idx, 0))
        set_path(layer, family.ffn_out, prune_linear_layer(get_path(layer, family.ffn_out), idx, 1))


def describe(model: Any, family: Family) -> list[dict[str, int]]:
    """Per layer: heads and FFN width as the modules hold them now."""
    return [
        {"heads": count_heads(layer, family), "ffn": ffn_width(layer, family)}
        for layer in list_layers(model.base_model, family)
    ]


def rebuild(folder: str, record: dict[str, Any]) -> Any:
    """Build the exact pruned module shapes from config.json + pruning.json, then load weights.

    ``from_config`` re-applies ``config.pruned_heads`` itself (uneven heads are fine); FFN widths
    come from the record. The weights then load strictly, so any shape mismatch is loud.
    """
    import torch
    import transformers
    from safetensors.torch import load_file

    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    cls = getattr(transformers, record["auto_class"])
    model = cls.from_config(config, attn_implementation="eager")
    family = get_family(config.model_type)
    widths = {i: layer["ffn"] for i, layer in enumerate(record["layers"])}
    prune_ffn(model, family, {i: list(range(w)) for i, w in widths.items()})
    state = load_file(f"{folder}/model.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Non-persistent buffers (position ids) and tied weights may be absent from the file.
    missing = [k for k in missing if not k.endswith(("position_ids", "token_type_ids"))]
    if missing or unexpected:
        raise UserError(
            f"{folder}/model.safetensors does not match pruning.json: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}."
        )
    got = describe(model, family)
    want = [{"heads": layer["heads"], "ffn": layer["ffn"]} for layer in record["layers"]]
    if got != want:
        raise UserError(f"{folder}: rebuilt shapes {got} differ from pruning.json {want}.")
    with torch.no_grad():
        model.eval()
    return model
