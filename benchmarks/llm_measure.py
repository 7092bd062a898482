"""What the decoder benchmark measures, on plain onnxruntime sessions of any KV-cache graph.

Every graph here takes ``input_ids``, ``attention_mask``, ``past_key_values.N.key/value`` and
maybe ``position_ids`` (optimum's and edgepack's have it, onnxruntime-genai's does not);
edgepack.families.generate's ``step`` feeds whichever it declares, so optimum's fp32 export,
edgepack's bundles and onnxruntime-genai's model builder output run through the same code.

Timing is interleaved: each round runs every variant once (prompt, then greedy decode) in turn,
so a noisy neighbour or a clock change hits all variants alike; the figures are medians over
rounds. Peak RSS needs a process per variant (``ru_maxrss`` only grows), so it is measured apart:
``python -m benchmarks.llm_measure MODEL.onnx`` prints it as JSON.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.families.decoder_fidelity import WINDOW
from edgepack.families.generate import empty_past, step, token_scores, windows


@dataclass(frozen=True)
class LlmVariant:
    key: str  # "fp32", "genai" or an edgepack bundle's label
    label: str
    path: Path | None  # the .onnx file; None when it could not be built (note says why)
    note: str = ""


@dataclass
class LlmRow:
    variant: LlmVariant
    size_mb: float | None = None
    perplexity: list[float] = field(default_factory=list)  # one per text
    ttft_ms: float | None = None
    tokens_per_s: float | None = None
    peak_rss_mb: float | None = None


@dataclass(frozen=True)
class _Arg:
    name: str
    type: str
    shape: list[Any]


class Session:
    """An onnxruntime session whose declared inputs name a concrete head size.

    genai's graph declares the past's last axis symbolic ('kv_cache_dim'); an empty past made from
    that has head size 0, which its GroupQueryAttention rejects. The size comes from the
    genai_config.json beside such a graph. Every variant goes through this wrapper (inputs and
    outputs listed once), so the per-step Python overhead is the same for all rows.
    """

    def __init__(self, path: Path, threads: int = 1):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        self._sess = ort.InferenceSession(str(path), options, providers=providers)
        head = _head_size(path)
        self._inputs = [
            _Arg(i.name, i.type, _concrete(i.name, i.shape, head)) for i in self._sess.get_inputs()
        ]
        self._outputs = self._sess.get_outputs()

    def get_inputs(self) -> list[_Arg]:
        return self._inputs

    def get_outputs(self) -> list[Any]:
        return self._outputs

    def run(self, outputs: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._sess.run(outputs, feeds)


def _head_size(path: Path) -> int | None:
    config = path.parent / "genai_config.json"
    if not config.is_file():
        return None
    return int(json.loads(config.read_text())["model"]["decoder"]["head_size"])


def _concrete(name: str, shape: list[Any], head: int | None) -> list[Any]:
    if name.startswith("past_key_values.") and len(shape) == 4 and not isinstance(shape[3], int):
        if head is None:
            raise ValueError(f"{name}: symbolic head size {shape[3]!r} and no genai_config.json")
        return [*shape[:3], head]
    return list(shape)


def session(path: Path, threads: int = 1) -> Session:
    return Session(path, threads)


def size_mb(path: Path) -> float:
    """The graph plus every external-data file it names (MB = 1e6 bytes)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    files = {
        entry.value
        for tensor in model.graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return (path.stat().st_size + sum((path.parent / f).stat().st_size for f in files)) / 1e6


def perplexity(sess: Any, ids: list[int], window: int = WINDOW) -> float:
    """exp(mean next-token NLL) over non-overlapping windows, each scored with an empty cache."""
    total, count = 0.0, 0
    for chunk in windows(ids, window):
        nll, _ = token_scores(sess, chunk)
        total += float(nll.sum())
        count += len(nll)
    return math.exp(total / count) if count else float("nan")


def generate_timed(sess: Any, prompt: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
    """(seconds to the first token incl. its argmax, seconds for ``new_tokens`` greedy steps after
    it, the tokens); never stops early, so every variant does the same work."""
    start = time.perf_counter()
    logits, past = step(sess, prompt, empty_past(sess), 0)
    token = int(np.argmax(logits[-1]))
    first = time.perf_counter()
    tokens, position = [token], len(prompt)
    for _ in range(new_tokens):
        logits, past = step(sess, [token], past, position)
        token, position = int(np.argmax(logits[-1])), position + 1
        tokens.append(token)
    return first - start, time.perf_counter() - first, tokens


def interleaved_timing(
    sessions: dict[str, Any], prompt: list[int], new_tokens: int, rounds: int, warmup: int = 1
) -> dict[str, tuple[float, float]]:
    """{key: (median TTFT ms, median decode tokens/s)} over ``rounds`` round-robin rounds."""
    for sess in sessions.values():
        for _ in range(warmup):
            generate_timed(sess, prompt, new_tokens)
    ttft: dict[str, list[float]] = {k: [] for k in sessions}
    rate: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for key, sess in sessions.items():
            first, decode, _ = generate_timed(sess, prompt, new_tokens)
            ttft[key].append(first * 1e3)
            rate[key].append(new_tokens / decode)
    return {k: (float(np.median(ttft[k])), float(np.median(rate[k]))) for k in sessions}


def peak_rss_mb(path: Path, prompt: list[int], new_tokens: int, threads: int = 1) -> float | None:
    """Whole-process peak RSS of a fresh Python that loads ``path``, scores one full window and
    generates: interpreter + onnxruntime + weights + arena, as an app would see it."""
    command = [sys.executable, "-m", "benchmarks.llm_measure", str(path)]
    command += ["--threads", str(threads), "--new-tokens", str(new_tokens)]
    command += ["--prompt", ",".join(map(str, prompt))]
    root = str(Path(__file__).resolve().parent.parent)  # benchmarks/ and this checkout's edgepack
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        print(f"[bench-llm] peak RSS of {path} failed: {done.stderr[-500:]}", file=sys.stderr)
        return None
    return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mb"])


def measure(
    variants: list[LlmVariant],
    texts: list[list[int]],
    prompt: list[int],
    new_tokens: int,
    rounds: int,
    threads: int = 1,
    rss: bool = True,
) -> list[LlmRow]:
    """Size, perplexity per text, interleaved TTFT and tokens/s, and peak RSS of every variant."""
    built = [v for v in variants if v.path is not None]
    sessions = {v.key: session(v.path, threads) for v in built}  # type: ignore[arg-type]
    rows = {v.key: LlmRow(v) for v in variants}
    for v in built:
        print(f"[bench-llm] size + perplexity: {v.label}", file=sys.stderr)
        rows[v.key].size_mb = size_mb(v.path)  # type: ignore[arg-type]
        rows[v.key].perplexity = [perplexity(sessions[v.key], ids) for ids in texts]
    print(f"[bench-llm] timing: {rounds} interleaved rounds", file=sys.stderr)
    for key, (ttft, rate) in interleaved_timing(sessions, prompt, new_tokens, rounds).items():
        rows[key].ttft_ms, rows[key].tokens_per_s = ttft, rate
    del sessions
    if rss:
        for v in built:
            print(f"[bench-llm] peak RSS: {v.label}", file=sys.stderr)
            rows[v.key].peak_rss_mb = peak_rss_mb(v.path, prompt, new_tokens, threads)  # type: ignore[arg-type]
    return [rows[v.key] for v in variants]


def _rss_main(argv: list[str]) -> None:
    """``python -m benchmarks.llm_measure MODEL [--threads N] [--new-tokens N] --prompt 1,2,3``."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt", required=True)
    args = parser.parse_args(argv)
    prompt = [int(t) for t in args.prompt.split(",")]
    sess = session(args.model, args.threads)
    token_scores(sess, (prompt * (WINDOW // len(prompt) + 1))[:WINDOW])
    generate_timed(sess, prompt, args.new_tokens)
    print(json.dumps({"peak_rss_mb": round(_peak_rss_mb(), 1)}))


def _peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a
    child of a big parent (a test run with torch loaded) would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


if __name__ == "__main__":  # pragma: no cover
    _rss_main(sys.argv[1:])
