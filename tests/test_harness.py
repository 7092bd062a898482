"""The on-device harness (edgepack/harness/bench.py), run as the device runs it: a subprocess."""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bundle_factory import HARNESS, load_harness_module, write_sums
from test_harness_integrity import full_bundle

BENCH = HARNESS / "bench.py"


bench = load_harness_module("bench")
check = load_harness_module("bundle_check")
converter = load_harness_module("perf_test_to_json")
DATA = Path(__file__).parent / "data"


def run_bench(bundle: Path, *args: str, isolated: bool = False, cwd: Path | None = None):
    cmd = [sys.executable, *(["-I"] if isolated else []), str(bundle / "bench.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=300, check=False)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return full_bundle(tmp_path_factory.mktemp("bundles"))


@pytest.fixture(scope="module")
def report(bundle, tmp_path_factory) -> dict:
    """One isolated (-I) run from an unrelated folder, shared by the schema tests."""
    out = tmp_path_factory.mktemp("out") / "r.json"
    proc = run_bench(bundle, "--runs", "150", "--warmup", "3", "--json", str(out), isolated=True,
                     cwd=tmp_path_factory.mktemp("elsewhere"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "p50" in proc.stdout and "PASS" in proc.stdout
    return json.loads(out.read_text())


NUM = (int, float)
SCHEMA = {
    "latency_ms": {k: NUM for k in ("mean", "std", "min", "p50", "p90", "p95", "p99", "max")},
    "cold_start_ms": {k: NUM for k in ("import", "session_create", "first_inference")},
    "runtime": {"onnxruntime": str, "providers": list, "threads": int, "inter_op": int,
                "python": str, "numpy": str},
    "env": {"machine": str, "cpu_model": (str, type(None)), "cores": int, "affinity": list,
            "governor": (str, type(None)), "cpu_mhz": (float, type(None)),
            "temperature_c": (float, type(None)), "device_model": (str, type(None))},
    "model": {"file": str, "sha256": str, "bytes": int},
    "check": {"passed": bool, "max_abs_diff": float, "min_cosine": float, "threshold": float},
}  # fmt: skip
TOP = {"p90_early_stopping_ms": float, "p90_early_stopping_discarded": int,
       "throughput_per_s": float, "peak_rss_mb": float, "runs": int, "latencies_ms": list}  # fmt: skip


def test_report_has_every_key_with_its_type(report):
    for key, kind in TOP.items():
        assert isinstance(report[key], kind), key
    for section, keys in SCHEMA.items():
        for key, kind in keys.items():
            assert isinstance(report[section][key], kind), f"{section}.{key}"
    assert report["runs"] == 150 == len(report["latencies_ms"])
    lat = report["latency_ms"]
    assert lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert report["check"]["passed"] is True and report["check"]["min_cosine"] > 0.999
    assert report["runtime"]["providers"] == ["CPUExecutionProvider"]
    assert len(report["model"]["sha256"]) == 64 and report["model"]["file"] == "model.onnx"
    assert all(v > 0 for v in report["cold_start_ms"].values())


def test_early_stopping_p90_is_at_least_the_empirical_p90(report):
    assert report["p90_early_stopping_ms"] >= report["latency_ms"]["p90"] - 1e-3
    assert report["p90_early_stopping_min_runs"] == 64


def loadgen_reference(latencies, p=0.9, c=0.99):
    """LoadGen's SingleStream loop, written literally: binary search for h per t (results.cc)."""

    def odds(h, t):  # P(Binomial(h + t, 1 - p) <= t)
        n = h + t
        return sum(math.comb(n, x) * (1 - p) ** x * p ** (n - x) for x in range(t + 1))

    def find_min_passing(t):
        h = 1
        while odds(h, t) >= 1 - c:
            h += 1
        return h

    n = len(latencies)
    h_min = find_min_passing(1)
    if n < h_min + 1:
        return None, None
    t = 1
    for i in range(2, n + 1):
        if n < find_min_passing(i) + i:
            t = i - 1
            break
    return sorted(latencies)[n - t], t - 1


@pytest.mark.parametrize("n", [20, 63, 64, 65, 100, 257])
def test_early_stopping_matches_loadgen_loop(n):
    values = list(np.random.default_rng(n).gamma(2.0, 3.0, size=n))
    want_value, want_discarded = loadgen_reference(values)
    got_value, got_discarded = bench.early_stopping_estimate(values)
    assert got_discarded == want_discarded
    assert got_value == (None if want_value is None else round(want_value, 4))
    assert (got_value is None) == (n < 64)


def test_compare_against_itself_passes_and_against_20x_faster_baseline_fails(
    bundle, report, tmp_path
):
    """End to end through the CLI. The tiny model takes ~0.02 ms, and wall-clock latency that
    small on a shared 2-core machine swings by 2x or more between processes, so the margins are
    wide (a 5x slowdown allowed; a 20x faster baseline), each outcome gets three tries, and the
    exact arithmetic is tested below."""
    same = tmp_path / "same.json"
    same.write_text(json.dumps(report))
    args = ("--runs", "150", "--quiet", "--skip-check", "--compare")
    for _ in range(3):
        ok = run_bench(bundle, *args, str(same), "--threshold", "4.0")
        if ok.returncode == 0:
            break
    assert ok.returncode == 0, ok.stderr
    assert "ratio" in ok.stdout and "p50" in ok.stdout
    faster = dict(report["latency_ms"], p50=report["latency_ms"]["p50"] / 20)
    fast = tmp_path / "fast.json"
    fast.write_text(json.dumps(dict(report, latency_ms=faster)))
    for _ in range(3):
        bad = run_bench(bundle, *args, str(fast), "--threshold", "0.5")
        if bad.returncode == 1:
            break
    assert bad.returncode == 1, bad.stdout
    assert "REGRESSION" in bad.stderr and "p50" in bad.stderr and "ratio" in bad.stderr


def test_compare_to_baseline_judges_exactly_the_threshold(tmp_path):
    base = tmp_path / "b.json"
    base.write_text(json.dumps({"latency_ms": {"p50": 10.0}}))
    assert bench.compare_to_baseline(10.5, base, 0.05)["regressed"] is False
    judged = bench.compare_to_baseline(10.6, base, 0.05)
    assert judged["regressed"] is True and judged["ratio"] == 1.06 and judged["statistic"] == "p50"
    base.write_text("{}")
    with pytest.raises(bench.HarnessError, match=r"latency_ms\.p50"):
        bench.compare_to_baseline(1.0, base, 0.05)


def test_tampered_file_is_refused_by_name_unless_no_verify(tmp_path):
    bundle = full_bundle(tmp_path)
    with open(bundle / "reference" / "inputs.npz", "ab") as handle:
        handle.write(b"\0")
    proc = run_bench(bundle, "--runs", "5", "--skip-check", "--quiet")
    assert proc.returncode == 2
    assert "reference/inputs.npz" in proc.stderr and proc.stderr.count("\n") == 1
    forced = run_bench(bundle, "--runs", "5", "--quiet", "--skip-check", "--no-verify")
    assert forced.returncode == 0, forced.stderr


def test_missing_listed_file_is_refused(tmp_path):
    bundle = full_bundle(tmp_path)
    (bundle / "requirements.txt").unlink()
    proc = run_bench(bundle, "--runs", "5", "--quiet")
    assert proc.returncode == 2 and "requirements.txt" in proc.stderr and "missing" in proc.stderr


def test_sums_naming_a_path_outside_the_bundle_are_refused(tmp_path):
    bundle = full_bundle(tmp_path)
    with open(bundle / "SHA256SUMS", "a") as handle:
        handle.write("0" * 64 + "  ../outside.txt\n")
    with pytest.raises(check.HarnessError, match="outside the bundle"):
        check.read_sums(bundle)
    with pytest.raises(bench.HarnessError, match="outside the bundle"):
        bench.verify_bundle(bundle)


def test_unavailable_provider_exits_2_naming_it(bundle):
    proc = run_bench(bundle, "--ep", "nnapi", "--runs", "5")
    assert proc.returncode == 2
    assert "NnapiExecutionProvider" in proc.stderr and "available: " in proc.stderr
    assert "CPUExecutionProvider" in proc.stderr


def test_failed_accuracy_check_exits_1_and_skip_check_overrides(tmp_path):
    bundle = full_bundle(tmp_path, reference_noise=5.0)
    out = tmp_path / "r.json"
    proc = run_bench(bundle, "--runs", "5", "--json", str(out))
    assert proc.returncode == 1 and "check FAILED" in proc.stderr
    assert json.loads(out.read_text())["check"]["passed"] is False
    skipped = run_bench(bundle, "--runs", "5", "--skip-check", "--json", str(out))
    assert skipped.returncode == 0
    assert json.loads(out.read_text())["check"] == {
        "passed": None, "max_abs_diff": None, "min_cosine": None, "threshold": 0.98,
        "skipped": True,
    }  # fmt: skip


def test_token_outputs_are_checked_per_real_token(tmp_path):
    bundle = full_bundle(tmp_path, token_output=True)
    out = tmp_path / "r.json"
    assert run_bench(bundle, "--runs", "5", "--json", str(out)).returncode == 0
    assert json.loads(out.read_text())["check"]["passed"] is True
    # Padding tokens must not count: garbage there still passes, garbage on a real token fails.
    want = np.ones((2, 3, 4))
    got = want.copy()
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    got[0, 2] = -1.0
    assert bench.compare_outputs(got, want, mask, 0.98)["passed"] is True
    got[1, 0] = -1.0
    assert bench.compare_outputs(got, want, mask, 0.98)["passed"] is False


def test_cold_runs_report_medians_of_fresh_processes(bundle, tmp_path):
    out = tmp_path / "r.json"
    proc = run_bench(bundle, "--runs", "5", "--cold-runs", "2", "--json", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["cold_runs"] == 2
    assert set(data["cold_start_ms"]) == {"import", "session_create", "first_inference"}
    assert all(v > 0 for v in data["cold_start_ms"].values())


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux CPU affinity only")
def test_cpus_pins_and_clamps_threads(bundle, tmp_path):
    out = tmp_path / "r.json"
    proc = run_bench(bundle, "--runs", "5", "--cpus", "0", "--json", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["env"]["affinity"] == [0] and data["runtime"]["threads"] == 1


def test_parse_cpu_list():
    assert bench.parse_cpu_list("0,2-3", 8) == [0, 2, 3]
    assert bench.parse_cpu_list("4-7", 8) == [4, 5, 6, 7]
    for bad in ("", "3-1", "a", "-1", "8", "0-99999999999999"):
        with pytest.raises(bench.HarnessError, match="--cpus"):
            bench.parse_cpu_list(bad, 8)


def test_run_sh_works_from_any_folder_and_resolves_json_against_the_caller(bundle, tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["sh", str(bundle / "run.sh"), "--runs", "5", "--quiet", "--json",
                           "mine.json"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "mine.json").read_text())["runs"] == 5
    assert not (bundle / "mine.json").exists()


def test_run_sh_refuses_a_tampered_bundle(tmp_path):
    bundle = full_bundle(tmp_path)
    (bundle / "manifest.json").write_text((bundle / "manifest.json").read_text() + " ")
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["sh", str(bundle / "run.sh"), "--runs", "3"], env=env,
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert proc.returncode == 2 and "manifest.json" in proc.stderr


def test_latency_inputs_tile_the_first_rows_real_tokens(bundle):
    class Input:
        def __init__(self, name):
            self.name, self.type = name, "tensor(int64)"

    class Session:
        def get_inputs(self):
            return [Input("input_ids"), Input("attention_mask"), Input("token_type_ids")]

    ref = {"input_ids": np.array([[5, 6, 7, 0], [1, 1, 1, 1]]),
           "attention_mask": np.array([[1, 1, 1, 0], [1, 1, 1, 1]])}  # fmt: skip
    feeds = bench.latency_feeds(Session(), ref, batch=2, seq_len=7)
    assert feeds["input_ids"].tolist() == [[5, 6, 7, 5, 6, 7, 5]] * 2
    assert feeds["attention_mask"].tolist() == [[1] * 7] * 2
    assert feeds["token_type_ids"].tolist() == [[0] * 7] * 2


STDLIB = set(getattr(sys, "stdlib_module_names", ())) | {"__future__"}


def test_harness_imports_only_stdlib_numpy_onnxruntime():
    """model_signing is the one optional import: bundle_check.py imports it inside a function,
    only when --public-key is given. bundle_check is the harnesses' shared sibling module."""
    assert STDLIB, "needs Python 3.10+ for sys.stdlib_module_names"
    for script in (
        "bench.py",
        "bench_env.py",
        "bench_llm.py",
        "bundle_check.py",
        "edgepack_decode.py",
        "perf_test_to_json.py",
    ):
        tree = ast.parse((HARNESS / script).read_text())
        roots, top_level = set(), set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{script}: relative import"
                names = {node.module.split(".")[0]}
            else:
                continue
            roots |= names
            if node in tree.body:
                top_level |= names
        allowed = STDLIB | {
            "bench.py": {"numpy", "onnxruntime", "bundle_check", "bench_env"},
            "bench_env.py": {"numpy", "bundle_check"},
            "bench_llm.py": {
                "numpy",
                "onnxruntime",
                "bundle_check",
                "bench_env",
                "edgepack_decode",
            },
            "edgepack_decode.py": {"numpy"},
            "bundle_check.py": {"model_signing", "tokenizers"},
        }.get(script, set())
        assert roots - allowed == set(), f"{script} imports {roots - allowed}"
        assert "edgepack" not in roots
        assert "model_signing" not in top_level, f"{script} imports model_signing eagerly"
        assert "tokenizers" not in top_level, f"{script} imports tokenizers eagerly"


def test_harness_parses_as_python_38():
    for script in (
        "bench.py",
        "bench_env.py",
        "bench_llm.py",
        "bundle_check.py",
        "edgepack_decode.py",
        "perf_test_to_json.py",
    ):
        source = (HARNESS / script).read_text()
        ast.parse(source, feature_version=(3, 8))
        for newer in (".removeprefix(", ".removesuffix(", "math.lcm", "functools.cache("):
            assert newer not in source, f"{script} uses {newer} (Python 3.9+)"


def test_write_sums_matches_sha256sum_format(bundle):
    lines = (bundle / "SHA256SUMS").read_text().splitlines()
    names = [line.split("  ", 1)[1] for line in lines]
    assert names == sorted(names) and "SHA256SUMS" not in names
    assert list(check.read_sums(bundle)) == names
    assert bench.verify_bundle(bundle)["model"]["file"] == "model.onnx"
    write_sums(bundle)  # idempotent
    assert (bundle / "SHA256SUMS").read_text().splitlines() == lines


def test_perf_test_converter_on_recorded_output(bundle, tmp_path):
    out = tmp_path / "android.json"
    runs = tmp_path / "runs.txt"
    runs.write_text(
        "model,0.0226,98467840,92,1\nmodel,0.0213351,98467840,92,0\n\nMin Latency: 1 s\n"
    )
    argv = [str(DATA / "perf_test_output.txt"), "--runs-file", str(runs), "--manifest",
            str(bundle / "manifest.json"), "--model", str(bundle / "model.onnx"), "--ep", "nnapi",
            "--device-model", "Pixel 7", "--out", str(out)]  # fmt: skip
    assert converter.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["latency_ms"] == {
        "mean": 23.0861, "std": pytest.approx(0.8944, abs=1e-4), "min": 21.3351, "p50": 22.6113,
        "p90": 24.4857, "p95": 26.1209, "p99": 33.1075, "max": 39.1442,
    }  # fmt: skip
    assert data["latencies_ms"] == [21.3351, 22.6]  # ordered by run index
    assert data["runs"] == 200 and data["throughput_per_s"] == 43.1791
    assert data["cold_start_ms"] == {"import": None, "session_create": 412.385,
                                     "first_inference": 47.0}  # fmt: skip
    assert data["peak_rss_mb"] == 93.9 and data["runtime"]["threads"] == 4
    assert data["runtime"]["providers"] == ["NnapiExecutionProvider"]
    assert data["check"]["passed"] is None and data["check"]["threshold"] == 0.98
    assert data["env"]["device_model"] == "Pixel 7"
    assert data["model"]["sha256"] == bench.sha256_file(bundle / "model.onnx")
    report_keys = set(TOP) | set(SCHEMA)
    assert report_keys <= set(data)


def test_perf_test_converter_rejects_other_text(tmp_path, capsys):
    junk = tmp_path / "junk.txt"
    junk.write_text("hello\n")
    assert converter.main([str(junk)]) == 2
    assert "onnxruntime_perf_test output" in capsys.readouterr().err
