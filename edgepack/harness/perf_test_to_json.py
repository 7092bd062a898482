#!/usr/bin/env python3
"""Turn onnxruntime_perf_test's printed output into bench.py's JSON report schema.

For phones without Python, bench_android.sh runs onnxruntime's own perf_test binary; this script
(stdlib only, Python 3.8+, runs on the host) maps what perf_test prints onto the keys bench.py
writes, so `edgepack compare` reads both. Keys perf_test cannot know are null: import time, the
accuracy check (perf_test feeds generated inputs), the early-stopping p90 (no raw latencies
unless its result file is given), python/numpy versions.

The lines read are those onnxruntime/test/perftest/performance_runner.cc prints, e.g.
    Session creation time cost: 0.0412 s
    First inference time cost: 31 ms
    Total inference requests: 500
    P90 Latency: 0.0236 s
    Peak working set size: 61231104 bytes
and, with a result file, one "model,seconds,peak_bytes,cpu_percent,run" line per run.

Usage:
    python3 perf_test_to_json.py perf_test_output.txt --runs-file result.txt \\
        --manifest BUNDLE/manifest.json --model BUNDLE/model.ort --out result.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

NUMBER = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
# label in perf_test's output -> (report key, factor to milliseconds or 1)
SECONDS_TO_MS = 1000.0
PATTERNS = {
    "session_create": (r"Session creation time cost:\s*" + NUMBER + r"\s*s", SECONDS_TO_MS),
    "first_inference": (r"First inference time cost:\s*" + NUMBER + r"\s*ms", 1.0),
    "runs": (r"Total inference requests:\s*" + NUMBER, 1.0),
    "mean": (r"Average inference time cost:\s*" + NUMBER + r"\s*ms", 1.0),
    "run_time_s": (r"Total inference run time:\s*" + NUMBER + r"\s*s", 1.0),
    "per_second": (r"Number of inferences per second:\s*" + NUMBER, 1.0),
    "peak_bytes": (r"Peak working set size:\s*" + NUMBER + r"\s*bytes", 1.0),
    "threads": (r"Setting intra_op_num_threads to\s*" + NUMBER, 1.0),
    "inter_op": (r"Setting inter_op_num_threads to\s*" + NUMBER, 1.0),
    "min": (r"Min Latency:\s*" + NUMBER + r"\s*s", SECONDS_TO_MS),
    "max": (r"Max Latency:\s*" + NUMBER + r"\s*s", SECONDS_TO_MS),
    "p50": (r"P50 Latency:\s*" + NUMBER + r"\s*s", SECONDS_TO_MS),
    "p90": (r"P90 Latency:\s*" + NUMBER + r"\s*s", SECONDS_TO_MS),
    "p95": (r"P95 Latency:\s*" + NUMBER + r"\s*s", SECONDS_TO_MS),
    "p99": (r"P99 Latency:\s*" + NUMBER + r"\s*s", SECONDS_TO_MS),
    "p999": (r"P999 Latency:\s*" + NUMBER + r"\s*s", SECONDS_TO_MS),
}
RUN_LINE = re.compile(r"^[^,]*," + NUMBER + r"," + NUMBER + r"," + NUMBER + r",(\d+)\s*$")
EP_NAMES = {
    "cpu": "CPUExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "nnapi": "NnapiExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}


class ConvertError(Exception):
    """The input is not perf_test output; one line, exit code 2."""


def parse_perf_test(text: str) -> Dict[str, float]:
    """Every known figure found in perf_test's output, in the units of the report (ms)."""
    found = {}
    for key, (pattern, factor) in PATTERNS.items():
        matches = re.findall(pattern, text)
        if matches:  # the last one wins: perf_test may print statistics twice
            found[key] = float(matches[-1]) * factor
    if "runs" not in found or "mean" not in found:
        raise ConvertError(
            "no 'Total inference requests' / 'Average inference time cost' lines: "
            "is this onnxruntime_perf_test output?"
        )
    return found


def parse_runs_file(text: str) -> List[float]:
    """Per-run latencies in ms from perf_test's result file (written when a path is given)."""
    runs = []
    for line in text.splitlines():
        match = RUN_LINE.match(line.strip())
        if match:
            runs.append((int(match.group(4)), float(match.group(1)) * SECONDS_TO_MS))
    return [ms for _, ms in sorted(runs)]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(str(path), "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _round(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 4)


def to_report(
    figures: Dict[str, float],
    latencies: Optional[List[float]],
    manifest: Optional[Dict[str, Any]],
    model: Optional[Path],
    ep: str,
    device_model: Optional[str],
    machine: Optional[str],
) -> Dict[str, Any]:
    """Build a report with bench.py's keys; anything perf_test did not measure is null."""
    harness = (manifest or {}).get("harness", {})
    batch = int(harness.get("batch", 1))
    runs = int(figures["runs"])
    std = None
    if latencies and len(latencies) > 1:
        std = statistics.stdev(latencies)
    per_second = figures.get("per_second")
    if per_second is None and figures.get("run_time_s"):
        per_second = runs / figures["run_time_s"]
    reference = (manifest or {}).get("reference", {})
    return {
        "schema_version": 1,
        "source": "onnxruntime_perf_test",
        "bundle": None,
        "started_utc": None,
        "settings": {"batch": batch, "seq_len": harness.get("seq_len"), "ep": ep},
        "runs": runs,
        "latency_ms": {
            "mean": _round(figures["mean"]),
            "std": _round(std),
            "min": _round(figures.get("min")),
            "p50": _round(figures.get("p50")),
            "p90": _round(figures.get("p90")),
            "p95": _round(figures.get("p95")),
            "p99": _round(figures.get("p99")),
            "max": _round(figures.get("max")),
        },
        "latencies_ms": [round(v, 4) for v in latencies] if latencies else None,
        "p90_early_stopping_ms": None,
        "p90_early_stopping_discarded": None,
        "p90_early_stopping_min_runs": 64,
        "throughput_per_s": _round(per_second * batch) if per_second is not None else None,
        "cold_start_ms": {
            "import": None,
            "session_create": _round(figures.get("session_create")),
            "first_inference": _round(figures.get("first_inference")),
        },
        "cold_runs": 0,
        "peak_rss_mb": round(figures["peak_bytes"] / 2**20, 1) if "peak_bytes" in figures else None,
        "runtime": {
            "onnxruntime": None,
            "providers": [EP_NAMES.get(ep, ep)],
            "threads": int(figures["threads"]) if "threads" in figures else None,
            "inter_op": int(figures["inter_op"]) if "inter_op" in figures else None,
            "python": None,
            "numpy": None,
        },
        "env": {
            "machine": machine,
            "os": "android" if device_model else None,
            "cpu_model": None,
            "cores": None,
            "affinity": None,
            "governor": None,
            "cpu_mhz": None,
            "temperature_c": None,
            "device_model": device_model,
        },
        "model": {
            "file": model.name if model else None,
            "sha256": sha256_file(model) if model else None,
            "bytes": model.stat().st_size if model else None,
        },
        "check": {
            "passed": None,
            "max_abs_diff": None,
            "min_cosine": None,
            "threshold": reference.get("min_cosine"),
            "skipped": True,
        },
        "compare": None,
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path, help="perf_test's captured stdout")
    parser.add_argument("--runs-file", type=Path, help="perf_test's result file (per-run times)")
    parser.add_argument("--manifest", type=Path, help="the bundle's manifest.json")
    parser.add_argument("--model", type=Path, help="the model file that was run")
    parser.add_argument("--ep", default="cpu", help="perf_test's -e value (default cpu)")
    parser.add_argument("--device-model", default=None)
    parser.add_argument("--machine", default=None, help="CPU ABI, e.g. arm64-v8a")
    parser.add_argument("--out", type=Path, help="write the JSON here (default: stdout)")
    args = parser.parse_args(argv)
    try:
        try:
            text = args.output.read_text(encoding="utf-8", errors="replace")
            runs_text = args.runs_file.read_text(encoding="utf-8") if args.runs_file else ""
            manifest = json.loads(args.manifest.read_text("utf-8")) if args.manifest else None
        except OSError as exc:
            raise ConvertError("cannot read {}: {}".format(exc.filename, exc.strerror)) from None
        figures = parse_perf_test(text)
        latencies = parse_runs_file(runs_text) or None
        report = to_report(
            figures, latencies, manifest, args.model, args.ep, args.device_model, args.machine
        )
    except (ConvertError, ValueError) as exc:
        print("error: {}".format(exc), file=sys.stderr)
        return 2
    payload = json.dumps(report, indent=2, sort_keys=True) + "\n"
    if args.out:
        args.out.write_text(payload, encoding="utf-8")
    else:
        sys.stdout.write(payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
