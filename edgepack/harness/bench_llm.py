#!/usr/bin/env python3
"""On-device check and benchmark of a decoder bundle: onnxruntime + numpy only, Python 3.8+.

Check: fed each reference prompt and the build host's greedy continuation, the graph's next-token
argmax must equal the host's at ``check.min_agreement`` of the positions or more. int4 kernels
with int8 activations round differently per CPU (x86 VNNI vs ARM dot-product), so at a near-tie a
free-running greedy path may part from the host's and never return; fed the host's tokens, such a
tie costs one position, while a wrong kernel or model misses most of them. How long each free
greedy path stays on the host's is reported beside it.
Benchmark: for each prompt length of a sweep (32/128/512/1024 tokens, those that fit the context)
and each thread count, time to first token and decode tokens/s as percentiles over repeated runs,
after a warm-up, the configurations interleaved within each round so a slow spell on a shared or
throttling device lands on all of them alike; inter-token latency percentiles within the runs;
the KV-cache bytes at each length and at the context; peak RSS; the device's environment in the
encoder harness's schema (bench_env.py); and with --compare, a regression gate against an earlier
report: exit 1 when a configuration's decode p50 tokens/s falls or its TTFT p50 rises by more
than --threshold.

JSON report (--json PATH), beside the encoder report's schema_version, kind ("decoder"), bundle,
started_utc, runtime, env:

    key                    meaning
    check                  passed, agreement, min_agreement, tokens, greedy_prefix_tokens
    settings               runs, warmup, new_tokens, prompt_tokens, threads, skipped_prompt_tokens
    sweep                  one object per (threads, prompt_tokens): runs; ttft_ms,
                           decode_tokens_per_s and inter_token_ms as mean, std, min, p50, p90, p95,
                           p99, max; kv_cache_mb (at prompt + new tokens)
    perf                   the headline, from the first configuration: ttft_ms and
                           decode_tokens_per_s (p50s), their p90s, peak_rss_mb,
                           kv_cache_mb_at_context, kv_cache_in_place (the cache is
                           written where it lies, not copied each step), context_length,
                           threads, prompt_tokens, runs
    compare                baseline, threshold, rows (threads, prompt_tokens, ratios,
                           regressed), regressed; null without --compare
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

# bundle_check.py ships beside this file in every bundle: the same integrity rules as the encoder
# harness. Under `python -I` the script's folder is not on sys.path.
sys.dont_write_bytecode = True  # a __pycache__ in the bundle would fail its own check
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_env import collect_env, peak_rss_mb, positive_number, summarize  # noqa: E402
from bundle_check import HarnessError, bundle_relpath, load_json, verify_bundle  # noqa: E402
from edgepack_decode import (  # noqa: E402
    CACHE_TYPES,
    Cache,
    greedy_stream,
    in_place,
    teacher_forced,
)

# More intra-op threads than this only thrash; onnxruntime takes negative counts as an error.
MAX_THREADS = 1024
# Prompt lengths of the default sweep; those past the context (less the new tokens) are skipped.
SWEEP = (32, 128, 512, 1024)
# The encoder harness's report conventions (schema_version, kind, bundle, started_utc, runtime,
# env), so `edgepack compare` reads both; "kind" tells which figures follow.
SCHEMA_VERSION = 1
KIND = "decoder"


def fail(message):
    sys.stderr.write("error: " + message + "\n")
    sys.exit(2)


def read_json(path, what):
    """A bundle JSON file, nesting bounded (one line, exit 2, for a hostile one)."""
    try:
        return load_json(Path(path), what)
    except HarnessError as exc:
        fail(str(exc))


def progress_line(done, total, what):
    """One machine-readable line on stderr: ``progress DONE/TOTAL WHAT``.

    With ``--progress`` (edgepack's emulated verify asks for it) a caller that reads stderr live
    can show how far a check under qemu has got, and estimate what remains; stdout stays the JSON
    report alone."""
    sys.stderr.write("progress %d/%d %s\n" % (done, total, what))
    sys.stderr.flush()


def kv_bytes(sess, context):
    """The KV cache's bytes at ``context`` positions, in the element type the graph keeps it in."""
    total = 0
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            heads, size = i.shape[1], i.shape[3]
            width = np.dtype(CACHE_TYPES.get(i.type, np.float32)).itemsize
            total += int(heads) * int(size) * context * width
    return total


def int_list(text):
    """argparse type: "32,128" -> [32, 128]."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            "%r is not a comma-separated list of integers" % text
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("%r names no value" % text)
    return values


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the results here")
    p.add_argument(
        "--threads", type=int_list, default=[1], help="intra-op threads; a list sweeps: 1,2"
    )
    p.add_argument(
        "--prompt-tokens",
        type=int_list,
        default=None,
        help="prompt lengths to time (default %s, those that fit the context)"
        % ",".join(str(n) for n in SWEEP),
    )
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run")
    p.add_argument("--runs", type=int, default=5, help="timed runs per configuration")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per configuration first")
    p.add_argument("--compare", type=Path, help="an earlier --json report: the regression gate")
    p.add_argument(
        "--threshold",
        type=float,
        default=0.05,
        help="--compare: the slowdown that counts as a regression (0.05 = 5%%)",
    )
    p.add_argument("--check-only", action="store_true")
    p.add_argument(
        "--forced-only",
        action="store_true",
        help="check the forced agreement alone, without the free greedy runs (under emulation "
        "they take 3/4 of the time and the pass/fail gate does not read them)",
    )
    p.add_argument("--progress", action="store_true", help="one progress line per step on stderr")
    p.add_argument("--no-verify", action="store_true", help="skip the bundle checks")
    p.add_argument("--public-key", type=Path, help="also check bundle.sig with this public key")
    p.add_argument("--require-signature", action="store_true")
    args = p.parse_args(argv)
    if args.require_signature and args.public_key is None:
        fail("--require-signature needs --public-key PUB, the signer's public key")
    for threads in args.threads:
        if not 1 <= threads <= MAX_THREADS:
            fail("--threads %d is out of range: use 1 to %d" % (threads, MAX_THREADS))
    for flag, value in (("--new-tokens", args.new_tokens), ("--runs", args.runs)):
        if value < 1:
            fail("%s must be at least 1, got %d" % (flag, value))
    if args.warmup < 0:
        fail("--warmup must be 0 or more, got %d" % args.warmup)
    if not (args.threshold >= 0 and args.threshold < 100):  # (NaN fails both)
        fail("--threshold must be a number from 0 to 100, got %r" % args.threshold)
    return args


def prompt_lengths(args, context):
    """The sweep's prompt lengths, and the default ones skipped because they do not fit."""
    room = context - args.new_tokens
    if args.prompt_tokens is None:
        fits = [n for n in SWEEP if n <= room]
        return fits or ([room] if room >= 1 else []), [n for n in SWEEP if n > room]
    for n in args.prompt_tokens:
        if n < 1:
            fail("--prompt-tokens must be at least 1, got %d" % n)
        if n > room:
            fail(
                "a prompt of %d tokens plus %d new ones is longer than the context (%d)"
                % (n, args.new_tokens, context)
            )
    return list(args.prompt_tokens), []


def session_for(path, threads):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def run_check(sess, prompts, check, eos, args):
    """The device check: forced agreement with the host's continuations, and (unless
    --forced-only) how long each free greedy path stays on the host's."""
    agree = total = 0
    prefixes = []
    # A step is one graph call: the forced pass of each prompt, then each free greedy token.
    greedy = not args.forced_only
    steps = len(prompts) + (sum(len(i["continuation"]) for i in prompts) if greedy else 0)
    done = 0
    for n, item in enumerate(prompts, 1):
        want = item["continuation"]
        forced = teacher_forced(sess, item["prompt"], want)
        agree += sum(1 for a, b in zip(forced, want) if a == b)  # noqa: B905 (Python 3.8)
        total += len(want)
        done += 1
        if args.progress:
            progress_line(done, steps, "check steps (prompt %d/%d forced)" % (n, len(prompts)))
        if not greedy:
            continue
        got = []
        for token in greedy_stream(sess, item["prompt"], len(want), eos):
            got.append(token)
            done += 1
            if args.progress:
                progress_line(done, steps, "check steps (prompt %d/%d greedy)" % (n, len(prompts)))
        done += len(want) - len(got)  # an end-of-sequence token ends the path early
        same = 0
        while same < min(len(got), len(want)) and got[same] == want[same]:
            same += 1
        prefixes.append(same)
    agreement = agree / total if total else 1.0
    return {
        "passed": agreement >= float(check["min_agreement"]),
        "agreement": round(agreement, 4),
        "min_agreement": check["min_agreement"],
        "tokens": total,
        "greedy_prefix_tokens": prefixes if greedy else None,
    }


def time_generation(sess, prompt, new_tokens):
    """(time to first token in ms, [ms of each decode step]): the prompt pass and the argmax of
    its last position, then ``new_tokens`` single-token steps on the KV cache. EOS does not stop
    it: every run times the same number of steps."""
    t0 = time.perf_counter()
    cache = Cache(sess, len(prompt) + new_tokens)
    logits = cache.feed(prompt)
    token = int(np.argmax(logits[-1]))
    ttft = (time.perf_counter() - t0) * 1000.0
    steps = []
    for _ in range(new_tokens):
        t = time.perf_counter()
        token = int(np.argmax(cache.feed([token])[-1]))
        steps.append((time.perf_counter() - t) * 1000.0)
    return ttft, steps


def sweep(path, seed_prompt, lengths, args, progress):
    """Every (threads, prompt length), warm-up first, then ``runs`` rounds that visit each
    configuration once, so drift over the run is shared by all of them."""
    sessions = dict((threads, session_for(path, threads)) for threads in args.threads)
    configs = [(threads, n) for threads in args.threads for n in lengths]
    prompts = dict((n, (seed_prompt * n)[:n]) for n in lengths)
    for threads, n in configs:
        for _ in range(args.warmup):
            time_generation(sessions[threads], prompts[n], args.new_tokens)
    ttfts = dict((c, []) for c in configs)
    rates = dict((c, []) for c in configs)
    steps = dict((c, []) for c in configs)
    for round_ in range(args.runs):
        for threads, n in configs:
            ttft, times = time_generation(sessions[threads], prompts[n], args.new_tokens)
            ttfts[(threads, n)].append(ttft)
            rates[(threads, n)].append(len(times) / (sum(times) / 1000.0))
            steps[(threads, n)].extend(times)
        if progress:
            progress_line(round_ + 1, args.runs, "benchmark rounds")
    rows = []
    for threads, n in configs:
        sess = sessions[threads]
        rows.append(
            {
                "threads": threads,
                "prompt_tokens": n,
                "new_tokens": args.new_tokens,
                "runs": args.runs,
                "ttft_ms": summarize(ttfts[(threads, n)]),
                "decode_tokens_per_s": summarize(rates[(threads, n)]),
                "inter_token_ms": summarize(steps[(threads, n)]),
                "kv_cache_mb": round(kv_bytes(sess, n + args.new_tokens) / 1e6, 2),
            }
        )
    return rows


def baseline_rows(path):
    """The sweep rows of an earlier report (a report from before sweeps: its perf figures)."""
    try:
        report = load_json(path, "--compare %s" % path, user_file=True)
    except HarnessError as exc:
        fail(str(exc))
    rows = report.get("sweep") if isinstance(report, dict) else None
    if isinstance(rows, list):
        return [r for r in rows if isinstance(r, dict)]
    perf = report.get("perf") if isinstance(report, dict) else None
    if not isinstance(perf, dict):
        fail("--compare %s: not a decoder bench.py JSON report (no sweep or perf)" % path)
    return [
        {
            "threads": perf.get("threads"),
            "prompt_tokens": perf.get("prompt_tokens"),
            "ttft_ms": {"p50": perf.get("ttft_ms")},
            "decode_tokens_per_s": {"p50": perf.get("decode_tokens_per_s")},
        }
    ]


def compare(rows, path, threshold):
    """Each configuration present in both reports, judged on its p50s: regressed when decode
    tokens/s fell below baseline / (1 + threshold) or TTFT rose above baseline x (1 + threshold)."""
    base = dict(((r.get("threads"), r.get("prompt_tokens")), r) for r in baseline_rows(path))
    judged = []
    for row in rows:
        old = base.get((row["threads"], row["prompt_tokens"]))
        if old is None:
            continue
        try:
            old_rate = old["decode_tokens_per_s"]["p50"]
            old_ttft = old["ttft_ms"]["p50"]
        except (KeyError, TypeError):
            fail("--compare %s: a sweep row lacks decode_tokens_per_s.p50 or ttft_ms.p50" % path)
        if not (positive_number(old_rate) and positive_number(old_ttft)):
            fail("--compare %s: baseline p50s must be finite numbers > 0" % path)
        rate = row["decode_tokens_per_s"]["p50"] / old_rate
        ttft = row["ttft_ms"]["p50"] / old_ttft
        judged.append(
            {
                "threads": row["threads"],
                "prompt_tokens": row["prompt_tokens"],
                "decode_ratio": round(rate, 4),
                "ttft_ratio": round(ttft, 4),
                "regressed": rate < 1.0 / (1.0 + threshold) or ttft > 1.0 + threshold,
            }
        )
    if not judged:
        fail(
            "--compare %s: no configuration (threads, prompt tokens) in common with this run" % path
        )
    return {
        "baseline": str(path),
        "threshold": threshold,
        "rows": judged,
        "regressed": any(r["regressed"] for r in judged),
    }


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    args = parse_args()
    if not args.no_verify:
        notes = []
        try:
            verify_bundle(Path(here), args.public_key, args.require_signature, notes)
        except HarnessError as exc:
            fail(str(exc))
        for note in notes:  # the run goes on, but says what was not checked
            sys.stderr.write("warning: " + note + "\n")
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    manifest = read_json(os.path.join(here, "manifest.json"), "manifest.json")
    try:
        name = bundle_relpath(manifest["reference"]["inputs"], "manifest.json reference.inputs")
        model = bundle_relpath(manifest["model"]["file"], "manifest.json model.file")
        context = int(manifest["generation"]["context_length"])
    except (KeyError, TypeError, ValueError, HarnessError) as exc:
        fail("manifest.json is not a decoder bundle's manifest (%s); rebuild the bundle" % exc)
    reference = read_json(os.path.join(here, *name.split("/")), name)
    lengths, skipped = prompt_lengths(args, context)
    if not args.check_only and not lengths:
        fail(
            "the context (%d) leaves no room for a prompt and %d new tokens"
            % (context, args.new_tokens)
        )
    path = os.path.join(here, *model.split("/"))
    sess = session_for(path, args.threads[0])
    eos = set(manifest["generation"]["eos_token_ids"])
    result = {
        "schema_version": SCHEMA_VERSION,
        "kind": KIND,
        "bundle": os.path.basename(here),
        "started_utc": started,
        "runtime": {
            "onnxruntime": ort.__version__,
            "threads": args.threads[0],
            "python": platform.python_version(),
            "numpy": np.__version__,
        },
        "check": run_check(sess, reference["prompts"], manifest["check"], eos, args),
        # What ran the check: an emulated aarch64 run shows up as machine "aarch64".
        "env": dict(collect_env(), python=platform.python_version(), onnxruntime=ort.__version__),
        "compare": None,
    }
    del sess
    if not args.check_only:
        seed = reference["prompts"][0]["prompt"]
        rows = sweep(path, seed, lengths, args, args.progress)
        head = rows[0]
        result["settings"] = {
            "runs": args.runs,
            "warmup": args.warmup,
            "new_tokens": args.new_tokens,
            "prompt_tokens": lengths,
            "threads": args.threads,
            "skipped_prompt_tokens": skipped,
        }
        result["sweep"] = rows
        result["perf"] = {
            "threads": head["threads"],
            "prompt_tokens": head["prompt_tokens"],
            "runs": args.runs,
            "ttft_ms": head["ttft_ms"]["p50"],
            "ttft_ms_p90": head["ttft_ms"]["p90"],
            "decode_tokens_per_s": head["decode_tokens_per_s"]["p50"],
            "decode_tokens_per_s_p90": head["decode_tokens_per_s"]["p90"],
            "peak_rss_mb": peak_rss_mb(),
            "kv_cache_mb_at_context": round(kv_bytes(session_for(path, 1), context) / 1e6, 2),
            "kv_cache_in_place": in_place(session_for(path, 1)),
            "context_length": context,
        }
        if args.compare is not None:
            result["compare"] = compare(rows, args.compare, args.threshold)
    text = json.dumps(result, indent=2, sort_keys=True)
    print(text)
    if args.json:
        if os.path.dirname(args.json):  # as bench.py does: results/NAME.json makes results/
            os.makedirs(os.path.dirname(args.json), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    regressed = bool(result["compare"] and result["compare"]["regressed"])
    sys.exit(0 if result["check"]["passed"] and not regressed else 1)


if __name__ == "__main__":
    main()
