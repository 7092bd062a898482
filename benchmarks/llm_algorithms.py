"""Optional benchmark rows: int4 algorithms on one fp32 graph, so only the algorithm differs.

``python -m benchmarks.llm --algorithms rtn,gptq,hqq,edgepack-rtn`` adds these rows. Each one
quantizes the same fp32 decoder graph (edgepack's fused export of the sample) at block 32 and
accuracy_level 4:

- ``rtn``, ``gptq``, ``hqq``: onnxruntime's own ``MatMulNBitsQuantizer`` with its default
  (round-to-nearest, asymmetric), GPTQ and HQQ configs. Every MatMul with a 2-D weight, the
  lm_head included, becomes MatMulNBits.
- ``edgepack-rtn``, ``edgepack-search``: edgepack's quantizer with ``method="rtn"`` (max|w| / 7)
  and with its activation-weighted scale search, the latter calibrated the way ``build`` does.

Built graphs are cached under the work folder with a ``build.json`` (seconds, what was quantized),
so a second run only measures.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.llm_build import _key, _publish

ALGORITHMS = ("rtn", "gptq", "hqq", "edgepack-rtn", "edgepack-search")
BLOCK, LEVEL = 32, 4
WINDOW = 256
MS = "com.microsoft"


def parse_algorithms(value: str | None) -> tuple[str, ...]:
    """``"rtn,gptq"`` -> ("rtn", "gptq"); unknown names are refused (ValueError)."""
    names = tuple(n.strip() for n in (value or "").split(",") if n.strip())
    unknown = [n for n in names if n not in ALGORITHMS]
    if unknown:
        raise ValueError(f"unknown algorithm(s) {unknown}; choose from {', '.join(ALGORITHMS)}")
    return names


class WindowReader:
    """onnxruntime's CalibrationDataReader protocol over token windows, each fed with an empty
    past (batch 1), as the graph's inputs declare them."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds, self.index = feeds, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.index >= len(self.feeds):
            return None
        self.index += 1
        return self.feeds[self.index - 1]

    def __iter__(self) -> WindowReader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


def window_feeds(model: Path, ids: Sequence[int], window: int = WINDOW) -> list[dict[str, Any]]:
    """One feed dict per full ``window`` of ``ids`` (a short tail is dropped)."""
    from edgepack.evaluate import session
    from edgepack.families.generate import empty_past, step_feeds

    sess = session(model)
    starts = range(0, len(ids) - window + 1, window)
    return [step_feeds(sess, ids[start : start + window], empty_past(sess), 0) for start in starts]


class _MemoSession:
    """An InferenceSession that runs a calibration sample once for every output and answers later
    requests for the same sample from memory.

    onnxruntime's GPTQ (neural_compressor.weight_only.gptq_quantize) asks for one MatMul input at
    a time and reruns the whole graph for each: 121 inputs x 25 windows x ~1 s on SmolLM2, an hour
    on two cores. The activations are the same every time (the fp32 graph is not updated between
    MatMuls), so serving them from one pass changes nothing but the time (~3 GB of activations).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        import onnxruntime as ort

        self._sess = ort.InferenceSession(*args, **kwargs)
        self._names = [o.name for o in self._sess.get_outputs()]
        self._memo: dict[int, tuple[dict[str, Any], dict[str, np.ndarray]]] = {}

    def get_inputs(self) -> Any:
        return self._sess.get_inputs()

    def get_outputs(self) -> Any:
        return self._sess.get_outputs()

    def run(self, names: list[str], feeds: dict[str, Any]) -> list[np.ndarray]:
        held = self._memo.get(id(feeds))
        if held is None or held[0] is not feeds:
            held = feeds, dict(zip(self._names, self._sess.run(self._names, feeds), strict=True))
            self._memo[id(feeds)] = held
        return [held[1][n] for n in names]


@contextmanager
def _memoized_gptq_sessions() -> Any:
    """Inside: onnxruntime's GPTQ module gets ``_MemoSession`` and a by-name initializer removal
    (both change its time, not its result)."""
    import types

    import onnxruntime as ort
    from onnxruntime.quantization.neural_compressor import weight_only

    proxy = types.SimpleNamespace(
        **{k: getattr(ort, k) for k in dir(ort) if not k.startswith("__")}
    )
    proxy.InferenceSession = _MemoSession
    saved, weight_only.ort = weight_only.ort, proxy
    remove = weight_only.ONNXModel.remove_initializer
    weight_only.ONNXModel.remove_initializer = _remove_by_name
    try:
        yield
    finally:
        weight_only.ort = saved
        weight_only.ONNXModel.remove_initializer = remove


def _remove_by_name(self: Any, tensor: Any) -> None:
    """neural_compressor's ONNXModel.remove_initializer finds the tensor by message equality,
    which compares weight bytes with every initializer: ~20 s per MatMul on SmolLM2. Names are
    unique in a graph, so finding it by name removes the same tensor."""
    inits = self._model.graph.initializer
    for index, held in enumerate(inits):
        if held.name == tensor.name:
            del inits[index]
            return


def _ort_config(algorithm: str, feeds: list[dict[str, Any]]) -> Any:
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    if algorithm == "rtn":
        return mnq.DefaultWeightOnlyQuantConfig(
            block_size=BLOCK,
            is_symmetric=False,
            accuracy_level=LEVEL,
            op_types_to_quantize=("MatMul", "Gather"),
            quant_axes=(("MatMul", 0), ("Gather", 1)),
        )
    if algorithm == "gptq":
        # block_size here is GPTQ's column batch (its default 128); the int4 blocks are BLOCK.
        return mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=WindowReader(feeds))
    return mnq.HQQWeightOnlyQuantConfig(block_size=BLOCK, bits=4)


def ort_quantize(src: Path, dst: Path, algorithm: str, feeds: list[dict[str, Any]]) -> dict:
    """onnxruntime's MatMulNBitsQuantizer with ``algorithm``'s config; every MatMulNBits then gets
    accuracy_level 4 (onnxruntime's HQQ writes none, i.e. fp32 activations, which would time the
    kernel rather than the algorithm)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=4,
        block_size=BLOCK,
        is_symmetric=False,
        accuracy_level=LEVEL,
        algo_config=_ort_config(algorithm, feeds),
    )
    with _memoized_gptq_sessions():
        quantizer.process()
    out = quantizer.model.model
    for node in out.graph.node:
        if node.op_type == "MatMulNBits":
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend([*kept, onnx.helper.make_attribute("accuracy_level", LEVEL)])
    onnx.save(out, str(dst))
    ops = [n.op_type for n in out.graph.node]
    return {
        "matmul_nbits": ops.count("MatMulNBits"),
        "gather_block_quantized": ops.count("GatherBlockQuantized"),
        "matmul_left_float": ops.count("MatMul"),
        "embedding": "int4 GatherBlockQuantized" if "GatherBlockQuantized" in ops else "fp32",
    }


def edgepack_quantize(
    src: Path, dst: Path, method: str, calibration: Sequence[int], window: int = WINDOW
) -> dict:
    """edgepack's weight-only quantizer as ``build`` runs it (importance from ``calibration``
    for the search; round-to-nearest needs none)."""
    from edgepack.quantize import WeightOnlySettings, activation_power, quantize_weights

    settings = WeightOnlySettings(bits=4, block_size=BLOCK, accuracy_level=LEVEL, method=method)
    importance = activation_power(src, calibration, window) if method == "search" else None
    return quantize_weights(src, dst, settings, importance)


def build_algorithm(
    algorithm: str, src: Path, calibration: Sequence[int], workdir: Path, window: int = WINDOW
) -> tuple[Path, dict[str, Any]]:
    """The cached graph of ``algorithm`` applied to ``src`` and its build record; calibration
    is read in ``window``-token pieces (no longer than the model's context)."""
    import onnxruntime

    stat = src.stat()  # (hashing 650 MB on every run would cost more than the lookup saves)
    digest = _key(src.resolve(), stat.st_size, stat.st_mtime_ns)
    calib = _key(*calibration) if algorithm in ("gptq", "edgepack-search") else ""
    key = _key(digest, algorithm, BLOCK, LEVEL, onnxruntime.__version__, calib, window)
    final = workdir / f"algo-{algorithm}-{key}"

    def make(out: Path) -> None:
        print(f"[bench-llm] {algorithm} int4 of {src}", file=sys.stderr)
        start = time.perf_counter()
        if algorithm.startswith("edgepack-"):
            method = algorithm.removeprefix("edgepack-")
            record = edgepack_quantize(src, out / "model.onnx", method, calibration, window)
            tokens = len(calibration) if method == "search" else 0
        else:
            feeds = window_feeds(src, calibration, window) if algorithm == "gptq" else []
            record = ort_quantize(src, out / "model.onnx", algorithm, feeds)
            tokens = len(feeds) * window
        record = {**record, "seconds": time.perf_counter() - start, "calibration_tokens": tokens}
        (out / "build.json").write_text(json.dumps(record, indent=1))

    folder = _publish(final, make)
    return folder / "model.onnx", json.loads((folder / "build.json").read_text())


def fused_fp32() -> Path:
    """edgepack's fp32 export of the sample (its cache; the fused graph for SmolLM2)."""
    from benchmarks.llm_build import SAMPLE_PACKAGE
    from edgepack.export import export_decoder_cached
    from edgepack.load import load_model

    return export_decoder_cached(load_model(f"package:{SAMPLE_PACKAGE}"))[0].path


def calibration_ids(tokenizer: Any, path: Path) -> list[int]:
    """The calibration file as ``build`` reads it: lines joined by newlines, no special tokens."""
    from edgepack.calibration import read_texts

    text = "\n".join(read_texts(path).texts)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _note(algorithm: str, record: dict[str, Any]) -> str:
    what = {
        "rtn": "onnxruntime DefaultWeightOnlyQuantConfig (RTN, asymmetric)",
        "gptq": "onnxruntime GPTQWeightOnlyQuantConfig (asymmetric, percdamp 0.01)",
        "hqq": "onnxruntime HQQWeightOnlyQuantConfig",
        "edgepack-rtn": "edgepack WeightOnlySettings(method='rtn')",
        "edgepack-search": "edgepack WeightOnlySettings(method='search')",
    }[algorithm]
    embedding = record.get("embedding")
    if algorithm.startswith("edgepack-"):
        embedding = (
            "int4, shares the lm_head's bytes" if record.get("shared_with_lm_head") else embedding
        )
    calib = record.get("calibration_tokens") or 0
    parts = [what, f"built in {record['seconds']:.0f} s", f"embedding {embedding or 'fp32'}"]
    if calib:
        parts.append(f"{calib} calibration tokens")
    return "; ".join(parts)


def algorithm_variants(
    names: Sequence[str], workdir: Path, tokenizer: Any, calibration: Path, cap: int
) -> list[Any]:
    """One LlmVariant per algorithm over edgepack's fused fp32 export; a failed build becomes a
    row that says why. ``cap`` is how many calibration tokens edgepack's search reads (build's
    CALIBRATION_TOKENS); GPTQ reads every full window of the file."""
    from benchmarks.llm_measure import LlmVariant

    if not names:
        return []
    src, ids = fused_fp32(), calibration_ids(tokenizer, calibration)
    variants = []
    for name in names:
        label = f"{name} int4" if name.startswith("edgepack-") else f"ort {name} int4"
        try:
            path, record = build_algorithm(
                name, src, ids[:cap] if name == "edgepack-search" else ids, workdir
            )
        except Exception as exc:  # one algorithm failing must not lose the run
            variants.append(LlmVariant(f"algo:{name}", label, None, f"not built: {exc}"))
            continue
        variants.append(LlmVariant(f"algo:{name}", label, path, _note(name, record)))
    return variants


def algorithm_note(names: Sequence[str]) -> str | None:
    """What the algorithm rows share and where they differ, for the results file."""
    if not names:
        return None
    import onnxruntime

    return (
        f"Algorithm rows (`--algorithms {','.join(names)}`): each quantizes edgepack's fp32 export "
        "of the sample (the fused graph the edgepack bundle comes from) to int4 blocks of "
        f"{BLOCK} at accuracy_level {LEVEL}, every MatMul including the lm_head. `ort` rows are "
        f"onnxruntime {onnxruntime.__version__}'s MatMulNBitsQuantizer (asymmetric: uint4 with "
        "zero points); its RTN also turns the embedding Gather into GatherBlockQuantized, HQQ "
        "refuses Gather (float zero points) and GPTQ only handles MatMul, so those two keep the "
        "fp32 embedding (113 MB). edgepack rows are symmetric (max|w| / 7 for rtn; searched "
        "scales weighted by calibration activations for search) and gather the embedding from "
        "the lm_head's int4 bytes. GPTQ reads samples/calibration.txt in full 256-token windows "
        "(the whole file); edgepack's search its first 4,096 tokens, as `build` does. GPTQ's "
        "per-MatMul activations come from one pass per window instead of one per MatMul "
        "(same values, an hour less)."
    )
