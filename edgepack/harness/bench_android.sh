#!/bin/sh
# Benchmark a bundle on an Android phone that has no Python, with onnxruntime's own perf_test.
#
# Usage (on the host, phone attached with USB debugging on):
#   PERF_TEST=/path/to/onnxruntime_perf_test sh bench_android.sh [BUNDLE_DIR] [-- perf_test args]
# Environment:
#   PERF_TEST  the onnxruntime_perf_test binary built for the phone (required)
#   ORT_LIB    libonnxruntime.so, only if perf_test was built with --build_shared_lib
#   EP         cpu | nnapi | xnnpack (default: the manifest's harness.execution_provider)
#   RUNS       timed runs (default 200); THREADS: intra-op threads (default: the manifest's)
#   OUT        report path (default: BUNDLE_DIR/result-android.json)
#
# Building perf_test for the phone (from an onnxruntime checkout, with the Android SDK and NDK):
#   ./build.sh --android --android_sdk_path "$ANDROID_HOME" --android_ndk_path "$ANDROID_NDK" \
#       --android_abi arm64-v8a --android_api 29 --config Release --parallel \
#       --use_nnapi --use_xnnpack --skip_tests --target onnxruntime_perf_test
#   perf_test is one of the test targets (onnxruntime_BUILD_UNIT_TESTS, on by default); the
#   binary lands in build/Android/Release/onnxruntime_perf_test. Add --build_shared_lib only if
#   you also want libonnxruntime.so, and then pass it as ORT_LIB. Use the same onnxruntime release as
#   the one the bundle was built for, so an .ort model's format version is readable.
#
# What it measures: perf_test's -I feeds generated inputs (zeros for int64 token ids) of shape
# [batch, seq_len] from the manifest, so latency is comparable to bench.py but the accuracy check
# cannot run there (check.passed is null in the report). Per-run latencies come from perf_test's
# result file, so `edgepack compare --plot` can draw them.
set -eu

here=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd)
bundle=$here
if [ $# -gt 0 ] && [ "$1" != "--" ]; then
    bundle=$(CDPATH='' cd -- "$1" && pwd)
    shift
fi
[ $# -gt 0 ] && [ "$1" = "--" ] && shift

die() { echo "bench_android.sh: $*" >&2; exit 2; }
[ -n "${PERF_TEST:-}" ] || die "set PERF_TEST=/path/to/onnxruntime_perf_test (see the comments for how to build it)"
[ -f "$PERF_TEST" ] || die "PERF_TEST=$PERF_TEST does not exist"
command -v adb >/dev/null 2>&1 || die "adb not found: install Android platform-tools"
command -v python3 >/dev/null 2>&1 || die "python3 not found on this host (needed to read the manifest)"
[ -f "$bundle/manifest.json" ] || die "$bundle has no manifest.json"
adb get-state >/dev/null 2>&1 || die "no device: connect the phone and allow USB debugging (adb devices)"

setting() {  # setting KEY: a value from manifest.json, e.g. harness.threads
    python3 -c 'import json,sys
v=json.load(open(sys.argv[1]))
for k in sys.argv[2].split("."): v=v[k]
print(v)' "$bundle/manifest.json" "$1"
}
model=$(setting model.file)
[ -f "$bundle/$model" ] || die "$bundle/$model is missing"
ep=${EP:-$(setting harness.execution_provider)}
threads=${THREADS:-$(setting harness.threads)}
batch=$(setting harness.batch)
seq_len=$(setting harness.seq_len)
runs=${RUNS:-200}
out=${OUT:-$bundle/result-android.json}

dev=/data/local/tmp/edgepack-bench
work=$(mktemp -d)
cleanup() { adb shell rm -rf "$dev" >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT INT TERM

adb shell mkdir -p "$dev"
adb push "$PERF_TEST" "$dev/onnxruntime_perf_test" >/dev/null
adb shell chmod 755 "$dev/onnxruntime_perf_test"
libpath=""
if [ -n "${ORT_LIB:-}" ]; then
    adb push "$ORT_LIB" "$dev/" >/dev/null
    libpath="LD_LIBRARY_PATH=$dev"
fi
adb push "$bundle/$model" "$dev/$model" >/dev/null

# -m times -r N: fixed run count; -I: generated inputs; -f: fix the symbolic dims; -s: print
# percentiles; the result file gets one line per run.
# shellcheck disable=SC2086,SC2048
adb shell "cd $dev && $libpath ./onnxruntime_perf_test -e $ep -m times -r $runs -x $threads \
    -I -s -f batch_size:$batch -f sequence_length:$seq_len $* $model $dev/runs.txt" \
    | tee "$work/perf_test_output.txt"
adb pull "$dev/runs.txt" "$work/runs.txt" >/dev/null

python3 "$here/perf_test_to_json.py" "$work/perf_test_output.txt" --runs-file "$work/runs.txt" \
    --manifest "$bundle/manifest.json" --model "$bundle/$model" --ep "$ep" \
    --device-model "$(adb shell getprop ro.product.model | tr -d '\r')" \
    --machine "$(adb shell getprop ro.product.cpu.abi | tr -d '\r')" --out "$out"
echo "report: $out"
