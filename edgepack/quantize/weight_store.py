"""A graph's fp32 weights read one matrix at a time, with the channel scales still to apply.

Weight-only quantization used to ``onnx.load`` the whole graph and hold every weight as numpy
beside its protobuf copy: on a 1.24 B-parameter Llama (4.9 GB fp32) the stage reached 17.6 GB
resident. Here the graph is loaded without its external data; each weight is read from
``model.onnx_data`` (or the protobuf) when it is quantized and freed after, and the AWQ channel
scales are kept as factors applied on read, so no scaled copy of the model exists. The stage
then holds one fp32 matrix (plus the search's temporaries) and the int4 result.

Factors are applied in the order they were recorded, each rounded to fp32 as an in-place update
would round it, so the weights read are bit-identical to scaling a loaded copy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

# (axis, factor, divide): the array is multiplied (or divided) by ``factor`` along ``axis``.
Factor = tuple[int, np.ndarray, bool]


def _location(tensor: Any) -> dict[str, str] | None:
    from onnx import TensorProto

    if tensor.data_location != TensorProto.EXTERNAL:
        return None
    return {entry.key: entry.value for entry in tensor.external_data}


def read_tensor(tensor: Any, folder: Path) -> np.ndarray:
    """The array of one initializer, reading only its own bytes when they are external."""
    from onnx import helper, numpy_helper

    where = _location(tensor)
    if where is None:
        return numpy_helper.to_array(tensor)
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    count = int(np.prod(tensor.dims, dtype=np.int64))
    offset = int(where.get("offset", 0))
    array = np.fromfile(folder / where["location"], dtype=dtype, count=count, offset=offset)
    return array.reshape(tuple(tensor.dims))


def make_internal(tensor: Any, folder: Path) -> None:
    """Move an external initializer's bytes into the protobuf (for the small ones a rewritten
    graph keeps, such as norm weights: the new graph has no external file of its own)."""
    if _location(tensor) is None:
        return
    array = read_tensor(tensor, folder)
    del tensor.external_data[:]
    tensor.ClearField("data_location")  # (unset, as in a graph saved whole: the same bytes)
    tensor.raw_data = np.ascontiguousarray(array).tobytes()


class Weights:
    """Name -> fp32 array, read on access: the initializers of ``graph`` (stored in the graph or
    in files of ``folder``), plus views (another weight transposed) and pending channel scales."""

    def __init__(self, graph: Any, folder: Path) -> None:
        self.tensors = {t.name: t for t in graph.initializer}
        self.folder = folder
        self.factors: dict[str, list[Factor]] = {}
        self.transposes: dict[str, str] = {}  # name -> the weight it reads transposed

    def __contains__(self, name: object) -> bool:
        return name in self.tensors or name in self.transposes

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.transposes:
            return self.shape(self.transposes[name])[::-1]
        return tuple(int(d) for d in self.tensors[name].dims)

    def is_float_matrix(self, name: str) -> bool:
        from onnx import TensorProto

        if name in self.transposes:
            return self.is_float_matrix(self.transposes[name])
        tensor = self.tensors.get(name)
        return (
            tensor is not None and len(tensor.dims) == 2 and tensor.data_type == TensorProto.FLOAT
        )

    def transposed(self, name: str, source: str) -> None:
        """``name`` reads as ``source`` transposed (a tied lm_head), without a stored copy."""
        self.transposes[name] = source

    def scale(self, name: str, factor: np.ndarray, axis: int = 0, divide: bool = False) -> None:
        """Multiply (or divide) ``name`` by ``factor`` along ``axis`` when it is next read."""
        self.factors.setdefault(name, []).append((axis, factor, divide))

    def scaled(self) -> list[str]:
        return list(self.factors)

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self.transposes:
            array = np.ascontiguousarray(self[self.transposes[name]].T)
        else:
            array = read_tensor(self.tensors[name], self.folder)
        for axis, factor, divide in self.factors.get(name, []):
            shape = [1] * array.ndim
            shape[axis] = -1
            along = factor.reshape(shape)
            array = (array / along if divide else array * along).astype(np.float32)
        return array
