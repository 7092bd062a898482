#!/usr/bin/env python3
"""Latency harness for an edgepack bundle; runs on the device with only numpy and onnxruntime.

This file is copied verbatim into every bundle, so it never imports edgepack, reads everything from
the bundle folder it sits in, and runs on Python 3.8+. Its conventions follow onnxruntime_perf_test,
TFLite's benchmark_model, OpenVINO's benchmark_app and MLPerf's SingleStream scenario: warm up,
time one query at a time, report percentiles and an early-stopping p90.

Usage (on the device, from anywhere):

    python3 bench.py                          # defaults from manifest.json
    python3 bench.py --runs 500 --threads 2 --cpus 4-7 --json result.json
    python3 bench.py --cold-runs 5            # also time import/session/first run in new processes
    python3 bench.py --compare baseline.json --threshold 0.05
    python3 bench.py --public-key signer.pub --require-signature   # check bundle.sig too

Before anything runs, verify_bundle() refuses (exit 2, one line naming the file) a bundle that is
not exactly as it was built:

- no symbolic link anywhere in the folder, and nothing but regular files and folders (a FIFO or
  a device is refused before anything is opened, so no check can block on one);
- SHA256SUMS (`sha256sum -c` format: `<sha256>  name`, or `<sha256> *name` as `sha256sum -b`
  writes) names no absolute path, no `..`, no backslash and no control or line-break character
  (a carriage return, \x85 or \u2028 included); every file it lists is present with that sha256;
- every regular file in the folder is listed in SHA256SUMS, except SHA256SUMS itself and the
  optional signature bundle.sig (so a report written into the bundle is refused too: write
  reports elsewhere);
- manifest.json is schema version 1, nested no deeper than 64 levels; its model.file,
  reference.inputs and reference.outputs are relative paths without `..`, listed in SHA256SUMS;
- manifest.json, bench.py, bundle_check.py and run.sh are present (and edgepack_decode.py in a
  decoder bundle), and tokenizer/ holds at least one file;
- model.file ends in .onnx or .ort as target.format.model says (when the manifest says);
- the model file's sha256 and size equal manifest.json's model.sha256 and model.bytes (an
  integer);
- tokenizer/tokenizer.json, loaded with the tokenizers package and set up as
  edgepack_runtime.py sets it up, gives the build host's ids for every reference text
  (reference/texts.json). Without tokenizers installed, or in a bundle built before reference
  texts were recorded, one warning line says the tokenizer was NOT checked and the run goes on:
  bench.py itself never tokenizes, and the app runtime cannot start without tokenizers anyway.
  `edgepack verify` on the host always checks it.

- with --public-key PUB: bundle.sig, an OpenSSF model-signing signature made with the matching
  elliptic-curve private key over every file of the folder except bundle.sig itself, verifies.
  model-signing is imported only then; when it is not installed (pip install model-signing
  pyopenssl) one warning line says the signature was NOT checked and the run goes on, unless
  --require-signature is given, which makes that exit 2 too.

--no-verify skips all of these (so it cannot go with --public-key), but a manifest path outside
the bundle is refused even then.

Exit codes: 0 ok; 1 the accuracy check failed or the p50 regressed against --compare; 2 a problem
the user can fix (tampered bundle, unknown provider, bad flag), printed as one line.

JSON report (--json PATH); times in milliseconds, rounded to 4 decimals:

    key                           type          meaning
    schema_version                int           1
    bundle                        str           bundle folder name
    started_utc                   str           ISO 8601 start time
    settings                      object        warmup, runs, duration_s, batch, seq_len, ep, cpus
    runs                          int           timed runs done (after warmup)
    latency_ms                    object        mean, std (sample), min, p50, p90, p95, p99, max
    latencies_ms                  list[float]   every timed run, in order
    p90_early_stopping_ms         float|null    MLPerf early-stopping p90 (null: too few runs)
    p90_early_stopping_discarded  int|null      slowest runs that estimate discards
    p90_early_stopping_min_runs   int           runs needed for an estimate (64)
    throughput_per_s              float         batch * runs / wall seconds of the timed loop
    cold_start_ms                 object        import, session_create, first_inference
    cold_runs                     int           fresh processes behind cold_start_ms (0: this one)
    peak_rss_mb                   float|null    peak resident set size of this process
    runtime                       object        onnxruntime, providers, threads, inter_op, python,
                                                numpy
    env                           object        machine, os, cpu_model, cores, affinity, governor,
                                                cpu_mhz, temperature_c, device_model, cpu_features
                                                (the int8 kernels' ISA extensions; null: unknown)
    model                         object        file, sha256, bytes
    check                         object        passed, max_abs_diff, min_cosine, threshold,
                                                skipped (passed is null when skipped)
    compare                       object|null   baseline, statistic ("p50"), current_ms,
                                                baseline_ms, ratio, threshold, regressed
    verify_notes                  list[str]     what the bundle check could not check
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

SCHEMA_VERSION = 1
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
PROVIDERS = {  # --ep value -> onnxruntime provider name
    "cpu": "CPUExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "nnapi": "NnapiExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}
INT_DTYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}


# The integrity check is shared with the other device-side harnesses (bundle_check.py ships in
# every bundle beside this file). Under `python -I` the script's folder is not on sys.path.
sys.dont_write_bytecode = True  # a __pycache__ in the bundle would fail its own check
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    from bench_env import (
        collect_env,
        parse_cpu_list,
        peak_rss_mb,
        pin_cpus,
        positive_number,
        summarize,
        usable_cpus,
    )
    from bundle_check import (
        HarnessError,
        bundle_file,
        load_json,
        load_manifest,
        manifest_value,
        sha256_file,
        verify_bundle,
    )
except ImportError as exc:  # a partial copy of the bundle: one line, like every other check
    sys.stderr.write(
        "error: {} is missing from the bundle; re-copy the bundle\n".format(
            (getattr(exc, "name", None) or "a harness module") + ".py"
        )
    )
    sys.exit(2)


def load_npz(path: Path) -> Dict[str, np.ndarray]:
    with np.load(str(path), allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def binomial_log_pmf(k: int, n: int, q: float) -> float:
    return (
        math.lgamma(n + 1)
        - math.lgamma(k + 1)
        - math.lgamma(n - k + 1)
        + k * math.log(q)
        + (n - k) * math.log1p(-q)
    )


def early_stopping_min_runs(percentile: float = 0.9, confidence: float = 0.99) -> int:
    """Fewest runs for which MLPerf's early-stopping estimate exists (64 for p90 at 99%)."""
    n = 1
    while True:
        n += 1
        q = 1.0 - percentile
        cdf = math.exp(binomial_log_pmf(0, n, q)) + math.exp(binomial_log_pmf(1, n, q))
        if cdf < 1.0 - confidence:
            return n


def early_stopping_estimate(
    latencies: Sequence[float], percentile: float = 0.9, confidence: float = 0.99
) -> Tuple[Optional[float], Optional[int]]:
    """MLPerf LoadGen's SingleStream early-stopping percentile estimate: (estimate, discarded).

    The rule (MLPerf Inference policies, "Early stopping"; LoadGen results.cc EarlyStopping and
    early_stopping.cc): with n queries of which t exceed a latency bound, the claim "the true
    `percentile` latency is <= the bound" holds at `confidence` when a model whose overlatency rate
    is exactly 1 - percentile would show t or fewer overlatency queries with probability below
    1 - confidence: P(Binomial(n, 1 - percentile) <= t) < 1 - confidence. LoadGen finds the
    largest such t (t >= 1) and reports sorted_latencies[n - t], i.e. it discards the t - 1
    slowest queries. LoadGen searches h = n - t with a binary search per t; since the binomial CDF
    only grows with t, walking t upward once gives the same t. None when even t = 1 fails (too
    few runs).
    """
    n = len(latencies)
    q = 1.0 - percentile
    threshold = 1.0 - confidence
    cdf, t = 0.0, 0
    while t < n:
        next_cdf = cdf + math.exp(binomial_log_pmf(t, n, q))
        if next_cdf >= threshold:
            break
        cdf, t = next_cdf, t + 1
    # After the loop, P(X <= t - 1) < threshold <= P(X <= t): the largest passing count is t - 1.
    passing = t - 1
    if passing < 1:
        return None, None
    ordered = sorted(latencies)
    return round(float(ordered[n - passing]), 4), passing - 1


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine; two zero rows count as identical, one zero row as unrelated."""
    dot = np.sum(a * b, axis=-1)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    both_zero = (np.linalg.norm(a, axis=-1) == 0) & (np.linalg.norm(b, axis=-1) == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 0.0)
    return np.where(both_zero, 1.0, cos)


def compare_outputs(
    got: np.ndarray, want: np.ndarray, mask: Optional[np.ndarray], threshold: float
) -> Dict[str, Any]:
    """Compare model output to the fp32 reference: per row, or per real token for 3-D outputs."""
    result = {"passed": False, "max_abs_diff": None, "min_cosine": None, "threshold": threshold}
    if got.shape != want.shape:
        result["error"] = "output shape {} != reference {}".format(got.shape, want.shape)
        return result
    got64, want64 = got.astype(np.float64), want.astype(np.float64)
    if got64.ndim == 3:
        keep = (
            mask.astype(bool) if mask is not None else np.ones(got64.shape[:2], dtype=bool)
        )  # [n, seq]: compare only real tokens
        got64, want64 = got64[keep], want64[keep]
    else:
        got64 = got64.reshape(got64.shape[0], -1)
        want64 = want64.reshape(want64.shape[0], -1)
    if got64.size == 0:
        result["error"] = "no rows to compare"
        return result
    cos = cosine_rows(got64, want64)
    min_cos = float(np.min(cos)) if np.all(np.isfinite(cos)) else float("nan")
    max_abs = float(np.max(np.abs(got64 - want64)))
    finite = math.isfinite(min_cos) and math.isfinite(max_abs)
    result.update(
        passed=bool(finite and min_cos >= threshold),
        max_abs_diff=round(max_abs, 6) if finite else None,
        min_cosine=round(min_cos, 6) if finite else None,
    )
    return result


# --- onnxruntime --------------------------------------------------------------------------------


def import_onnxruntime() -> Tuple[Any, float]:
    """Import onnxruntime late, so its import time is measured; return (module, ms)."""
    start = time.perf_counter()
    try:
        import onnxruntime
    except ImportError as exc:
        hint = "run: python3 -m pip install -r requirements.txt"
        raise HarnessError("cannot import onnxruntime ({}); {}".format(exc, hint)) from None
    return onnxruntime, (time.perf_counter() - start) * 1000.0


def create_session(
    ort: Any, model_path: Path, ep: str, threads: int, inter_op: int
) -> Tuple[Any, float]:
    """Build the session for one execution provider; return (session, ms)."""
    provider = PROVIDERS[ep]
    available = ort.get_available_providers()
    if provider not in available:
        raise HarnessError(
            "--ep {}: {} is not in this onnxruntime build (available: {}); install a build "
            "with it or choose another --ep".format(ep, provider, ", ".join(available))
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = inter_op
    # inter-op threads only run independent nodes in parallel in ORT_PARALLEL mode.
    if inter_op > 1:
        options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    providers = [provider]  # type: List[Any]
    if ep == "xnnpack":
        # XNNPACK has its own thread pool; onnxruntime's docs advise one ORT intra-op thread
        # without spinning so the two pools do not fight over cores.
        options.intra_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = [(provider, {"intra_op_num_threads": str(threads)})]
    if ep != "cpu":
        providers.append("CPUExecutionProvider")  # ops the accelerator lacks fall back to CPU
    start = time.perf_counter()
    session = ort.InferenceSession(str(model_path), sess_options=options, providers=providers)
    return session, (time.perf_counter() - start) * 1000.0


def input_dtype(session_input: Any) -> Any:
    if session_input.type not in INT_DTYPES:
        raise HarnessError(
            "model input {} has type {}; the harness feeds int64/int32 token inputs".format(
                session_input.name, session_input.type
            )
        )
    return INT_DTYPES[session_input.type]


def latency_feeds(
    session: Any, reference: Dict[str, np.ndarray], batch: int, seq_len: int
) -> Dict[str, np.ndarray]:
    """Deterministic [batch, seq_len] inputs: the first reference row's real tokens, tiled."""
    ids = reference.get("input_ids")
    mask = reference.get("attention_mask")
    feeds = {}
    for item in session.get_inputs():
        dtype = input_dtype(item)
        name = item.name
        if name == "attention_mask":
            row = np.ones(seq_len, dtype=dtype)
        elif name == "token_type_ids":
            row = np.zeros(seq_len, dtype=dtype)
        elif name == "position_ids":
            row = np.arange(seq_len, dtype=dtype)
        elif name in reference:
            source = reference[name][0]
            if name == "input_ids" and ids is not None and mask is not None:
                real = ids[0][mask[0].astype(bool)]
                source = real if real.size else ids[0]
            row = np.resize(source, seq_len).astype(dtype)  # np.resize tiles, then trims
        else:
            raise HarnessError("reference/inputs.npz has no array for model input " + name)
        feeds[name] = np.ascontiguousarray(np.tile(row, (batch, 1)))
    return feeds


def reference_feeds(session: Any, reference: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    feeds = {}
    for item in session.get_inputs():
        if item.name not in reference:
            raise HarnessError("reference/inputs.npz has no array for model input " + item.name)
        feeds[item.name] = reference[item.name].astype(input_dtype(item))
    return feeds


def run_check(session: Any, bundle: Path, manifest: Dict[str, Any]) -> Dict[str, Any]:
    """Run the bundled reference inputs and compare to the bundled fp32 outputs."""
    ref = manifest_value(manifest, "reference")
    primary = manifest_value(manifest, "io.primary_output")
    threshold = float(ref.get("min_cosine", 0.98))
    inputs = load_npz(bundle_file(bundle, manifest, "reference.inputs"))
    expected = load_npz(bundle_file(bundle, manifest, "reference.outputs"))
    if primary not in expected:
        raise HarnessError("{} has no array named {}".format(ref["outputs"], primary))
    feeds = reference_feeds(session, inputs)
    rows = len(next(iter(feeds.values())))
    # A fixed-shape model (NNAPI/CoreML bundles) takes only its own batch size: feed in chunks.
    batch_dim = session.get_inputs()[0].shape[0]
    step = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else rows
    chunks = [
        session.run([primary], {k: v[i : i + step] for k, v in feeds.items()})[0]
        for i in range(0, rows, step)
    ]
    got = np.concatenate(chunks)
    result = compare_outputs(got, expected[primary], inputs.get("attention_mask"), threshold)
    result["skipped"] = False
    return result


# --- cold start --------------------------------------------------------------------------------


def cold_child(args: argparse.Namespace, bundle: Path, manifest: Dict[str, Any]) -> int:
    """Measure one cold start in this fresh process and print it as one JSON line."""
    ort, import_ms = import_onnxruntime()
    model = bundle_file(bundle, manifest, "model.file")
    session, create_ms = create_session(ort, model, args.ep, args.threads, args.inter_op)
    feeds = latency_feeds(
        session, load_npz(bundle_file(bundle, manifest, "reference.inputs")), args.batch,
        args.seq_len,
    )  # fmt: skip
    start = time.perf_counter()
    session.run(None, feeds)
    first_ms = (time.perf_counter() - start) * 1000.0
    print(
        json.dumps({"import": import_ms, "session_create": create_ms, "first_inference": first_ms})
    )
    return EXIT_OK


def cold_runs(args: argparse.Namespace, bundle: Path, count: int) -> Dict[str, float]:
    """Medians of import/session-create/first-inference over `count` fresh interpreters.

    The OS file cache stays warm; for a truly cold disk drop caches first (see README).
    """
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--bundle", str(bundle), "--cold-child", "--no-verify",
        "--ep", args.ep, "--threads", str(args.threads), "--inter-op", str(args.inter_op),
        "--batch", str(args.batch), "--seq-len", str(args.seq_len),
    ]  # fmt: skip
    if args.cpus:
        argv += ["--cpus", args.cpus]
    samples = []  # type: List[Dict[str, float]]
    for _ in range(count):
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
        if proc.returncode != 0:
            tail = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-1:]
            raise HarnessError("cold-start child failed: " + (tail[0] if tail else "no output"))
        samples.append(json.loads(proc.stdout.decode("utf-8").strip().splitlines()[-1]))
    return {
        key: round(float(np.median([s[key] for s in samples])), 4)
        for key in ("import", "session_create", "first_inference")
    }


# --- comparison and output ----------------------------------------------------------------------


def compare_to_baseline(
    current_p50: float, baseline_path: Path, threshold: float
) -> Dict[str, Any]:
    """Judge the p50 latency against a baseline report: regressed when slower than 1+threshold.

    The baseline p50 must be a finite positive number as JSON gives it: Python's json reads NaN
    and Infinity, and float("nan") or float(true) would make every ratio pass as "ok".
    """
    baseline = load_json(baseline_path, "--compare {}".format(baseline_path), user_file=True)
    latency = baseline.get("latency_ms") if isinstance(baseline, dict) else None
    if not isinstance(latency, dict) or "p50" not in latency:
        raise HarnessError(
            "--compare {}: not a bench.py JSON report with latency_ms.p50".format(baseline_path)
        )
    base_p50 = latency["p50"]
    if not positive_number(base_p50):
        raise HarnessError(
            "--compare {}: latency_ms.p50 must be a finite number > 0 (ms), got {!r}".format(
                baseline_path, base_p50
            )
        )
    ratio = current_p50 / base_p50
    return {
        "baseline": str(baseline_path),
        "statistic": "p50",
        "current_ms": round(current_p50, 4),
        "baseline_ms": round(base_p50, 4),
        "ratio": round(ratio, 4),
        "threshold": threshold,
        "regressed": ratio > 1.0 + threshold,
    }


def format_table(report: Dict[str, Any]) -> str:
    lat = report["latency_ms"]
    cold = report["cold_start_ms"]
    check = report["check"]
    es = report["p90_early_stopping_ms"]
    cold_label = (
        "median of {} new processes: ".format(report["cold_runs"]) if report["cold_runs"] else ""
    )
    rows = [
        ("model", "{} ({} bytes)".format(report["model"]["file"], report["model"]["bytes"])),
        ("providers", ", ".join(report["runtime"]["providers"])),
        ("threads", "{} intra-op, {} inter-op".format(
            report["runtime"]["threads"], report["runtime"]["inter_op"])),
        ("runs", str(report["runs"])),
        ("latency ms", "p50 {p50:.3f}  p90 {p90:.3f}  p99 {p99:.3f}  mean {mean:.3f}"
         "  std {std:.3f}".format(**lat)),
        ("p90 early-stop", "{:.3f} ms ({} discarded)".format(
            es, report["p90_early_stopping_discarded"]) if es is not None else
         "n/a (needs {} runs)".format(report["p90_early_stopping_min_runs"])),
        ("throughput", "{:.1f} /s".format(report["throughput_per_s"])),
        ("cold start ms", cold_label + "import {import:.1f}  session {session_create:.1f}  "
         "first run {first_inference:.1f}".format(**cold)),
        ("peak RSS", "{} MB".format(report["peak_rss_mb"])),
        ("check", "skipped" if check.get("skipped") else "{} (min cosine {}, need >= {})".format(
            "PASS" if check["passed"] else "FAIL", check["min_cosine"], check["threshold"])),
    ]  # fmt: skip
    width = max(len(name) for name, _ in rows)
    return "\n".join("{}  {}".format(name.ljust(width), value) for name, value in rows)


def finite_float(text: str) -> float:
    """argparse type: 'nan' or 'inf' would switch the limits they set off without a word."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError("{!r} is not a finite number".format(text))
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench.py", description="Time an edgepack bundle's model on this device."
    )
    add = parser.add_argument
    add("--bundle", type=Path, default=Path(__file__).resolve().parent, help="bundle folder")
    add("--warmup", type=int, default=10, help="untimed runs first (default 10)")
    add("--runs", type=int, default=1000, help="timed runs at most (default 1000)")
    add("--duration", type=finite_float, default=60.0, help="seconds at most (default 60)")
    add("--threads", type=int, default=None, help="intra-op threads (default: manifest, clamped)")
    add("--inter-op", type=int, default=1, help="inter-op threads (default 1)")
    add("--ep", choices=sorted(PROVIDERS), default=None, help="default: manifest (cpu)")
    add("--seq-len", type=int, default=None, help="sequence length (default: manifest)")
    add("--batch", type=int, default=None, help="batch size (default: manifest)")
    add("--cpus", default=None, help="pin to CPUs, e.g. 4-7 or 0,2-3 (Linux)")
    add("--cold-runs", type=int, default=0, help="fresh processes to time cold start in")
    add("--json", type=Path, default=None, help="write the JSON report here")
    add("--compare", type=Path, default=None, help="baseline JSON report to compare p50 with")
    add("--threshold", type=finite_float, default=0.05, help="allowed p50 slowdown fraction (0.05)")
    add("--no-verify", action="store_true", help="skip the bundle checks (SHA256SUMS, manifest)")
    add(
        "--public-key",
        type=Path,
        default=None,
        metavar="PUB",
        help="also check bundle.sig with this public key (needs model-signing)",
    )
    add("--require-signature", action="store_true",
        help="with --public-key: fail, not warn, when model-signing is not installed")  # fmt: skip
    add("--skip-check", action="store_true", help="skip the accuracy check")
    add("--quiet", action="store_true", help="print no table")
    add("--progress", action="store_true", help="one progress line per inference on stderr")
    add("--cold-child", action="store_true", help=argparse.SUPPRESS)
    return parser


def resolve_user_path(path: Optional[Path]) -> Optional[Path]:
    """Relative paths are the caller's: run.sh cds into the bundle but exports the caller's cwd."""
    if path is None or path.is_absolute():
        return path
    return Path(os.environ.get("EDGEPACK_CALLER_CWD") or os.getcwd()) / path


# Bounds of the numeric flags: beyond them a run only hangs, thrashes or runs out of memory.
# warmup is not cut short by --duration, and every batch row is fed at once.
FLAG_BOUNDS = {
    "warmup": (0, 100000),
    "runs": (1, 10000000),
    "cold_runs": (0, 1000),
    "inter_op": (1, 1024),
    "threads": (1, 1024),
    "batch": (1, 4096),
    "seq_len": (1, 1 << 20),
}
MAX_DURATION_S = 7 * 24 * 3600.0


def model_max_seq_len(harness: Dict[str, Any], io: Any) -> Optional[int]:
    """The longest sequence the bundle's model takes: harness.max_seq_len (the model's position
    limit, recorded at build), or the fixed sequence dimension of its inputs; None: unknown."""
    limits = [harness.get("max_seq_len")]
    for item in (io or {}).get("inputs", []) if isinstance(io, dict) else []:
        shape = item.get("shape") if isinstance(item, dict) else None
        if isinstance(shape, list) and len(shape) > 1:
            limits.append(shape[1])
    found = [v for v in limits if isinstance(v, int) and not isinstance(v, bool) and v > 0]
    return min(found) if found else None


def settle_args(args: argparse.Namespace, manifest: Dict[str, Any]) -> None:
    """Fill defaults from the manifest and refuse, in one line, any flag out of range."""
    harness = manifest_value(manifest, "harness")
    if args.ep is None:
        args.ep = str(harness.get("execution_provider", "cpu"))
        if args.ep not in PROVIDERS:
            raise HarnessError("manifest harness.execution_provider {!r} is not one of {}".format(
                args.ep, ", ".join(sorted(PROVIDERS))))  # fmt: skip
    if args.cpus:
        args.cpu_list = parse_cpu_list(args.cpus)
    for name, (low, high) in FLAG_BOUNDS.items():
        value = getattr(args, name)
        if value is not None and not low <= value <= high:
            raise HarnessError("--{} {} is out of range: use {} to {}".format(
                name.replace("_", "-"), value, low, high))  # fmt: skip
    if not 0 < args.duration <= MAX_DURATION_S or args.threshold < 0:
        raise HarnessError("--duration must be > 0 and at most {:.0f} s, --threshold >= 0".format(
            MAX_DURATION_S))  # fmt: skip
    longest = model_max_seq_len(harness, manifest.get("io"))
    if args.seq_len is not None and longest is not None and args.seq_len > longest:
        raise HarnessError("--seq-len {} is longer than this model takes ({} tokens)".format(
            args.seq_len, longest))  # fmt: skip
    args.batch = args.batch or int(harness["batch"])
    args.seq_len = args.seq_len or int(harness["seq_len"])
    usable = usable_cpus()
    limit = len(usable) if usable else (os.cpu_count() or 1)
    args.threads = args.threads or max(1, min(int(harness["threads"]), limit))
    args.json = resolve_user_path(args.json)
    args.compare = resolve_user_path(args.compare)


def first_run(session: Any, feeds: Dict[str, np.ndarray], args: argparse.Namespace) -> None:
    """The first inference; a shape the model cannot take (a --seq-len past its positions, a
    fixed-shape model fed another shape) is one line, not onnxruntime's traceback."""
    try:
        session.run(None, feeds)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidArgument types
        text = " ".join(str(exc).split())
        raise HarnessError(
            "the model cannot run [{}, {}] inputs ({}); choose --batch/--seq-len it takes".format(
                args.batch, args.seq_len, text[:200]
            )
        ) from None


def progress_line(args: argparse.Namespace, done: int) -> None:
    """``progress DONE/TOTAL inferences`` on stderr with --progress, for a caller that reads it
    live (edgepack's emulated verify under qemu); TOTAL counts the first run, the check, the
    warmup and at most --runs timed runs. stdout keeps the table or nothing."""
    if args.progress:
        total = 2 + args.warmup + args.runs
        sys.stderr.write("progress {}/{} inferences\n".format(min(done, total), total))
        sys.stderr.flush()


def measure(
    session: Any, feeds: Dict[str, np.ndarray], args: argparse.Namespace
) -> Tuple[List[float], float]:
    """Warm up, then time single queries until --runs or --duration ends; (latencies, wall s)."""
    for n in range(args.warmup):
        session.run(None, feeds)
        progress_line(args, 3 + n)
    latencies = []  # type: List[float]
    clock = time.perf_counter
    start = clock()
    deadline = start + args.duration
    while len(latencies) < args.runs:
        t0 = clock()
        session.run(None, feeds)
        t1 = clock()
        latencies.append((t1 - t0) * 1000.0)
        progress_line(args, 2 + args.warmup + len(latencies))
        if t1 >= deadline:
            break
    if len(latencies) < args.runs:  # --duration ended the runs early
        progress_line(args, 2 + args.warmup + args.runs)
    return latencies, clock() - start


def run(argv: Optional[Sequence[str]] = None) -> int:
    if sys.version_info < (3, 8):
        raise HarnessError("bench.py needs Python 3.8 or newer")
    args = build_parser().parse_args(argv)
    if args.require_signature and args.public_key is None:
        raise HarnessError("--require-signature needs --public-key PUB, the signer's public key")
    if args.no_verify and args.public_key is not None:
        raise HarnessError("--no-verify skips every check; it cannot go with --public-key")
    bundle = args.bundle.resolve()
    notes = []  # type: List[str]
    if args.no_verify:
        manifest = load_manifest(bundle)
        notes.append("--no-verify: the bundle and its tokenizer were not checked")
    else:
        public_key = resolve_user_path(args.public_key)
        manifest = verify_bundle(bundle, public_key, args.require_signature, notes)
        if not args.cold_child:
            for note in notes:  # not silent: the run goes on, but says what was not checked
                print("warning: " + note, file=sys.stderr)
    settle_args(args, manifest)
    if args.compare is not None:  # a baseline that cannot be judged fails now, not after the run
        compare_to_baseline(1.0, args.compare, args.threshold)
    if args.cpus:
        pin_cpus(args.cpu_list)  # before onnxruntime starts its thread pools
        args.threads = min(args.threads, len(args.cpu_list))
    if args.cold_child:
        return cold_child(args, bundle, manifest)

    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    ort, import_ms = import_onnxruntime()
    model_path = bundle_file(bundle, manifest, "model.file")
    if not model_path.is_file():
        raise HarnessError("model file {} is missing from the bundle".format(model_path.name))
    session, create_ms = create_session(ort, model_path, args.ep, args.threads, args.inter_op)
    reference = load_npz(bundle_file(bundle, manifest, "reference.inputs"))
    feeds = latency_feeds(session, reference, args.batch, args.seq_len)
    t0 = time.perf_counter()
    first_run(session, feeds, args)
    first_ms = (time.perf_counter() - t0) * 1000.0
    progress_line(args, 1)
    cold = {"import": import_ms, "session_create": create_ms, "first_inference": first_ms}
    cold = {key: round(value, 4) for key, value in cold.items()}

    if args.skip_check:
        threshold = manifest.get("reference", {}).get("min_cosine")
        check = {"passed": None, "max_abs_diff": None, "min_cosine": None,
                 "threshold": threshold, "skipped": True}  # fmt: skip
    else:
        check = run_check(session, bundle, manifest)
    progress_line(args, 2)

    latencies, wall_s = measure(session, feeds, args)
    es_value, es_discarded = early_stopping_estimate(latencies)
    if args.cold_runs:
        cold = cold_runs(args, bundle, args.cold_runs)
    stats = summarize(latencies)
    report = {
        "schema_version": SCHEMA_VERSION,
        "kind": "encoder",  # bench_llm.py's reports say "decoder"; edgepack compare reads both
        "bundle": bundle.name,
        "started_utc": started,
        "settings": {
            "warmup": args.warmup, "runs": args.runs, "duration_s": args.duration,
            "batch": args.batch, "seq_len": args.seq_len, "ep": args.ep, "cpus": args.cpus,
        },
        "runs": len(latencies),
        "latency_ms": stats,
        "latencies_ms": [round(value, 4) for value in latencies],
        "p90_early_stopping_ms": es_value,
        "p90_early_stopping_discarded": es_discarded,
        "p90_early_stopping_min_runs": early_stopping_min_runs(),
        "throughput_per_s": round(len(latencies) * args.batch / wall_s, 4),
        "cold_start_ms": cold,
        "cold_runs": args.cold_runs,
        "peak_rss_mb": peak_rss_mb(),
        "runtime": {
            "onnxruntime": ort.__version__, "providers": session.get_providers(),
            "threads": args.threads, "inter_op": args.inter_op,
            "python": platform.python_version(), "numpy": np.__version__,
        },
        "env": collect_env(),
        "model": {
            "file": model_path.name, "sha256": sha256_file(model_path),
            "bytes": model_path.stat().st_size,
        },
        "check": check,
        "compare": None,
        "verify_notes": notes,
    }  # fmt: skip
    if args.compare is not None:
        report["compare"] = compare_to_baseline(stats["p50"], args.compare, args.threshold)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return report_outcome(report, args)


def report_outcome(report: Dict[str, Any], args: argparse.Namespace) -> int:
    if not args.quiet:
        print(format_table(report))
        if args.json is not None:
            print("report: {}".format(args.json))
    code = EXIT_OK
    check = report["check"]
    if check["passed"] is False:
        detail = check.get("error") or "min cosine {} < {}".format(
            check["min_cosine"], check["threshold"]
        )
        print("check FAILED: outputs differ from the fp32 reference ({})".format(detail),
              file=sys.stderr)  # fmt: skip
        code = EXIT_FAILED
    comp = report["compare"]
    if comp is not None:
        line = "p50 latency {:.4f} ms vs baseline {:.4f} ms: ratio {:.3f} (allowed {:.3f})".format(
            comp["current_ms"], comp["baseline_ms"], comp["ratio"], 1.0 + comp["threshold"]
        )
        if comp["regressed"]:
            print("REGRESSION: " + line, file=sys.stderr)
            code = EXIT_FAILED
        else:
            print("ok: " + line)
    return code


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        return run(argv)
    except HarnessError as exc:
        print("error: {}".format(exc), file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
