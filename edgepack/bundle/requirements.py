"""A bundle's requirements.txt: the oldest onnxruntime its graph really runs on, and the Pythons
that have wheels for that onnxruntime.

The floors were measured, not guessed: tiny bundles of each kind were built with ``edgepack
build`` and their own check (``bench.py``; ``--check-only`` for decoders) was run in fresh venvs
with every older onnxruntime from pip's index, bisecting to the oldest that passes:

- encoder, .onnx: 1.18.0 passes; 1.17.x refuses the graph's (unused) ai.onnx.ml opset 5 import
  that onnxruntime's quantizer writes. encoder, .ort: 1.16.0 passes; 1.15.1 refuses ORT format 6.
  Every onnxruntime before 1.19 fails to import under numpy 2 ("_ARRAY_API not found"), which
  pip installs by default on Python 3.9+; 1.18.1 is the first to declare ``numpy<2``, so it is the
  oldest that passes with whatever numpy pip puts beside it (1.18.0 and 1.17.3 let pip pick 2.x).
- decoder, .onnx: 1.23.0 passes; 1.22.1 does not know GatherBlockQuantized's ``bits``. (Saved
  with onnx's default IR version 14 the graph needed 1.32.0: see export/decoder_graph.py.)
- decoder, .ort (converted by the build host's onnxruntime): 1.30.0 passes; 1.29.0 rejects the
  converted GroupQueryAttention node.

onnxruntime's wheels (x86_64 and aarch64 alike) end at 1.19.2 for Python 3.8 and 3.9 and at
1.23.2 for 3.10, and start at 1.20.0 for 3.13, so each kind states the Pythons it can promise.
"""

from __future__ import annotations

from edgepack.bundle.wheels import TOKENIZERS_PY38

# (bundle kind, model format) -> the oldest onnxruntime that passed the bundle's check.
ORT_FLOOR = {
    ("encoder", "onnx"): "1.18.1",
    ("encoder", "ort"): "1.18.1",
    ("decoder", "onnx"): "1.23.0",
    ("decoder", "ort"): "1.30.0",
}
# The newest onnxruntime with wheels for the Pythons it stopped supporting.
ORT_LAST_WHEEL = {"3.8": "1.19.2", "3.9": "1.19.2", "3.10": "1.23.2"}
# Pythons the resolution test covers (tests/test_requirements.py); newer ones are not promised.
PYTHONS = ("3.8", "3.9", "3.10", "3.11", "3.12", "3.13", "3.14")
_ENCODER = "older ones refuse the graph, or let pip install a numpy 2 they cannot import"
WHY = {
    ("encoder", "onnx"): _ENCODER,
    ("encoder", "ort"): _ENCODER,
    ("decoder", "onnx"): "older ones lack the contrib operators this graph uses "
    "(GatherBlockQuantized with bits, MatMulNBits, GroupQueryAttention)",
    ("decoder", "ort"): "older ones cannot read the operators the build host's converter wrote",
}


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def pythons(kind: str, fmt: str) -> list[str]:
    """The Pythons with onnxruntime wheels at or above the floor of this kind of bundle."""
    floor = _version(ORT_FLOOR[(kind, fmt)])
    return [p for p in PYTHONS if p not in ORT_LAST_WHEEL or _version(ORT_LAST_WHEEL[p]) >= floor]


def min_python(kind: str, fmt: str) -> str:
    """ "3.8" or "3.10": what the bundle's README promises."""
    return pythons(kind, fmt)[0]


def requirements_text(kind: str, fmt: str, host_tokenizers: str) -> str:
    """requirements.txt for a bundle of ``kind`` ("encoder" or "decoder") whose model file is
    ``fmt`` ("onnx" or "ort"); tokenizers is the build host's release (its ids were checked with
    it), or on Python 3.8 the last release for 3.8."""
    floor, first = ORT_FLOOR[(kind, fmt)], min_python(kind, fmt)
    lines = [
        f"# Python {first}+. onnxruntime {floor} is the oldest measured to pass this bundle's "
        f"check ({WHY[(kind, fmt)]}); onnxruntime's last wheels: "
        + ", ".join(f"{v} for Python {p}" for p, v in ORT_LAST_WHEEL.items())
        + ".",
        f"onnxruntime>={floor}",
        "numpy",
        "# edgepack_runtime.py tokenizes with it; bench.py does not need it.",
    ]
    if _version(first) < (3, 9):
        lines += [
            f'tokenizers>={host_tokenizers}; python_version >= "3.9"',
            # ==: pip would take 0.21.0's source archive (no 3.8 wheel) and need Rust to build it.
            f'tokenizers=={TOKENIZERS_PY38}; python_version < "3.9"',
        ]
    else:
        lines.append(f"tokenizers>={host_tokenizers}")
    return "\n".join(lines) + "\n"
