"""Whether a decoder graph's KV cache can be written in place, recorded in the graph itself.

GroupQueryAttention writes a pass's new keys and values straight into the cache when its past
and present tensors are one buffer (onnxruntime compares the pointers). Otherwise it zeroes a new
present tensor and copies the whole past into it, in every layer, at every step: work that grows
with the context and, on SmolLM2 at two threads, a sixth of a decode step. A runtime can only
share the buffer if each past input reaches GroupQueryAttention untouched and the matching output
is the graph's present, so the graph says so in its metadata (which the .ort converter keeps),
and the harness, the app runtime and anyone else can read it from the session alone.

The mark is derived from the graph each time a decoder graph is saved, never assumed: a pass that
puts anything between the cache and the attention (a traced export's Concat, a future cast)
clears it.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from edgepack.families.decoder import PAST_PREFIX, PRESENT_PREFIX

KEY = "edgepack.kv_cache"
IN_PLACE = "in-place"
# GroupQueryAttention's past_key/past_value inputs and present_key/present_value outputs.
PAST_SLOTS = {3: 1, 4: 2}


def cache_in_place(graph: Any) -> bool:
    """True when every past input feeds one GroupQueryAttention alone, at its past slot, and that
    node writes the matching present output, of the same element type."""
    pasts = [i for i in graph.input if i.name.startswith(PAST_PREFIX)]
    outputs = {o.name: o for o in graph.output}
    uses: dict[str, list[tuple[Any, int]]] = defaultdict(list)
    for node in graph.node:
        for slot, name in enumerate(node.input):
            uses[name].append((node, slot))
    for past in pasts:
        if len(uses[past.name]) != 1:
            return False
        node, slot = uses[past.name][0]
        if node.op_type != "GroupQueryAttention" or slot not in PAST_SLOTS:
            return False
        out = PAST_SLOTS[slot]
        present = PRESENT_PREFIX + past.name[len(PAST_PREFIX) :]
        if len(node.output) <= out or node.output[out] != present or present not in outputs:
            return False
        kind = outputs[present].type.tensor_type.elem_type
        if kind != past.type.tensor_type.elem_type:
            return False
    return bool(pasts)


def mark_cache_layout(model: Any) -> bool:
    """Set or clear the in-place mark in ``model``'s metadata from its graph; returns the mark."""
    kept = [p for p in model.metadata_props if p.key != KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    in_place = cache_in_place(model.graph)
    if in_place:
        entry = model.metadata_props.add()
        entry.key, entry.value = KEY, IN_PLACE
    return in_place
