"""How strongly calibration text drives each input channel of each weight matrix of a decoder.

The weight-only scale search weighs a block's rounding error per input channel by the mean square
of the activations that multiply it: a channel that carries large activations turns the same
weight error into a larger output error. The activations are read from the fp32 graph itself, by
exposing every MatMul's activation input as an extra output, so traced and fused graphs are
measured alike and the names match the quantizer's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.families.generate import empty_past, step_feeds, windows

WINDOW = 256
MAX_WINDOWS = 16  # 4,096 tokens: the statistics are stable well before (SmolLM2: < 1 % change)


def _probe(path: Path) -> tuple[Any, list[str]]:
    """A session on ``path`` that also returns the activation input of every weight MatMul."""
    import onnx

    from edgepack.evaluate import session

    # The weights stay where they are: a model past 2 GB cannot be serialized with them, and
    # the edited graph alone reads them from the model's folder.
    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    names = sorted(
        {n.input[0] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits}
    )
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in known)
    return session(model.SerializeToString(), threads=2, weights_folder=path.parent), names


def activation_power(path: Path, ids: Sequence[int], window: int = WINDOW) -> dict[str, np.ndarray]:
    """Mean x² per channel of each weight MatMul's input over ``ids``, in windows no longer than
    the model's context."""
    sess, names = _probe(path)
    if not names:  # (onnxruntime reads an empty list as "every output")
        return {}
    sums: dict[str, np.ndarray] = {}
    count = 0
    for chunk in windows(ids, window)[: MAX_WINDOWS * WINDOW // window]:
        values = sess.run(names, step_feeds(sess, chunk, empty_past(sess), 0))
        for name, value in zip(names, values, strict=True):
            flat = value.reshape(-1, value.shape[-1]).astype(np.float64)
            sums[name] = sums.get(name, 0.0) + np.square(flat).sum(axis=0)
        count += len(chunk)
    return {name: (total / max(count, 1)).astype(np.float32) for name, total in sums.items()}
