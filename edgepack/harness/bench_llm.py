#!/usr/bin/env python3
"""On-device check and benchmark of a decoder bundle: onnxruntime + numpy only, Python 3.8+.

Check: fed each reference prompt and the build host's greedy continuation, the graph's next-token
argmax must equal the host's at ``check.min_agreement`` of the positions or more. int4 kernels
with int8 activations round differently per CPU (x86 VNNI vs ARM dot-product), so at a near-tie a
free-running greedy path may part from the host's and never return; fed the host's tokens, such a
tie costs one position, while a wrong kernel or model misses most of them. How long each free
greedy path stays on the host's is reported beside it.
Benchmark: time to first token for an N-token prompt, decode tokens/s, peak RSS, and the KV-cache
bytes at the profile's context length.
"""

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

# bundle_check.py ships beside this file in every bundle: the same integrity rules as the encoder
# harness. Under `python -I` the script's folder is not on sys.path.
sys.dont_write_bytecode = True  # a __pycache__ in the bundle would fail its own check
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bundle_check import HarnessError, bundle_relpath, load_json, verify_bundle  # noqa: E402
from edgepack_decode import empty_past, greedy_stream, step, teacher_forced  # noqa: E402

# More intra-op threads than this only thrash; onnxruntime takes negative counts as an error.
MAX_THREADS = 1024
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
    total = 0
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            heads, size = i.shape[1], i.shape[3]
            total += int(heads) * int(size) * context * 4
    return total


def cpu_model():
    """The CPU's name from /proc/cpuinfo (Linux, Android), else what platform knows, else null."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("model name", "hardware", "cpu model"):
                    return value.strip() or None
    except OSError:
        pass
    return platform.processor() or None


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the results here")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
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
    args = p.parse_args()
    if args.require_signature and args.public_key is None:
        fail("--require-signature needs --public-key PUB, the signer's public key")
    if not 1 <= args.threads <= MAX_THREADS:
        fail("--threads %d is out of range: use 1 to %d" % (args.threads, MAX_THREADS))
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
    for flag, value in (("--prompt-tokens", args.prompt_tokens), ("--new-tokens", args.new_tokens)):
        if value < 1:
            fail("%s must be at least 1, got %d" % (flag, value))
    if args.prompt_tokens + args.new_tokens > context:
        fail(
            "a prompt of %d tokens plus %d new ones is longer than the context (%d)"
            % (args.prompt_tokens, args.new_tokens, context)
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(
        os.path.join(here, *model.split("/")), options, providers=["CPUExecutionProvider"]
    )
    eos = set(manifest["generation"]["eos_token_ids"])
    check = manifest["check"]
    agree = total = 0
    prefixes = []
    prompts = reference["prompts"]
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
    result = {
        "schema_version": SCHEMA_VERSION,
        "kind": KIND,
        "bundle": os.path.basename(here),
        "started_utc": started,
        "runtime": {
            "onnxruntime": ort.__version__,
            "threads": args.threads,
            "python": platform.python_version(),
            "numpy": np.__version__,
        },
        "check": {
            "passed": agreement >= float(check["min_agreement"]),
            "agreement": round(agreement, 4),
            "min_agreement": check["min_agreement"],
            "tokens": total,
            "greedy_prefix_tokens": prefixes if greedy else None,
        },
        # What ran the check: an emulated aarch64 run shows up as machine "aarch64".
        "env": {
            "machine": platform.machine() or None,
            "os": platform.platform(),
            "cpu_model": cpu_model(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "onnxruntime": ort.__version__,
        },
    }
    if not args.check_only:
        prompt = (reference["prompts"][0]["prompt"] * args.prompt_tokens)[: args.prompt_tokens]
        t0 = time.perf_counter()
        logits, past = step(sess, prompt, empty_past(sess), 0)
        token = int(np.argmax(logits[-1]))
        t1 = time.perf_counter()
        pos = len(prompt)
        for _ in range(args.new_tokens):
            logits, past = step(sess, [token], past, pos)
            token, pos = int(np.argmax(logits[-1])), pos + 1
        t2 = time.perf_counter()
        result["perf"] = {
            "threads": args.threads,
            "prompt_tokens": args.prompt_tokens,
            "ttft_ms": round((t1 - t0) * 1000, 2),
            "decode_tokens_per_s": round(args.new_tokens / (t2 - t1), 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "kv_cache_mb_at_context": round(kv_bytes(sess, context) / 1e6, 2),
            "context_length": context,
        }
    text = json.dumps(result, indent=2, sort_keys=True)
    print(text)
    if args.json:
        if os.path.dirname(args.json):  # as bench.py does: results/NAME.json makes results/
            os.makedirs(os.path.dirname(args.json), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    sys.exit(0 if result["check"]["passed"] else 1)


if __name__ == "__main__":
    main()
