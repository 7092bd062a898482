"""`edgepack compare` and the `bench`/`compare` click commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bundle_factory import load_harness_module, make_bundle
from click.testing import CliRunner

from edgepack.cli.bench import bench, compare_cmd
from edgepack.device.compare import compare
from edgepack.errors import UserError

DATA = Path(__file__).parent / "data"


def fake_report(p50: float, passed: bool | None = True, n: int = 50) -> dict:
    lat = [p50 * (0.9 + 0.2 * i / n) for i in range(n)]
    return {
        "latency_ms": {"p50": p50, "p90": p50 * 1.1, "p99": p50 * 1.3},
        "latencies_ms": lat,
        "peak_rss_mb": 80.5,
        "cold_start_ms": {"import": 30.0, "session_create": 20.0, "first_inference": 5.0},
        "throughput_per_s": 1000.0 / p50,
        "check": {"passed": passed},
    }


def write(path: Path, report: dict) -> Path:
    path.write_text(json.dumps(report))
    return path


def test_table_shows_ratio_to_the_first_and_writes_a_png(tmp_path):
    a = write(tmp_path / "pi.json", fake_report(10.0))
    b = write(tmp_path / "x86.json", fake_report(25.0, passed=False))
    plot = tmp_path / "plots" / "lat.png"
    text = compare([a, b], plot)
    rows = {line.split()[0]: line.split() for line in text.splitlines()[2:4]}
    assert rows["pi"][-1] == "1.00" and rows["x86"][-1] == "2.50"
    assert rows["x86"][-2] == "FAIL" and rows["pi"][-2] == "pass"
    assert rows["pi"][5] == "55.0"  # cold = import + session + first inference
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_key_names_the_file_and_key(tmp_path):
    report = fake_report(10.0)
    del report["cold_start_ms"]["session_create"]
    bad = write(tmp_path / "bad.json", report)
    with pytest.raises(UserError, match=r"bad\.json.*cold_start_ms\.session_create"):
        compare([bad], None)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(UserError, match=r"junk\.json is not valid JSON"):
        compare([tmp_path / "junk.json"], None)


def test_perf_test_report_compares_without_raw_latencies(tmp_path):
    converter = load_harness_module("perf_test_to_json")
    out = tmp_path / "android.json"
    assert converter.main([str(DATA / "perf_test_output.txt"), "--out", str(out)]) == 0
    android = out
    base = write(tmp_path / "base.json", fake_report(11.30565))
    text = compare([base, android], tmp_path / "p.png")
    assert "not drawn: android" in text
    assert "skip" in text  # perf_test cannot run the accuracy check


def test_compare_command_prints_the_table(tmp_path):
    a = write(tmp_path / "a.json", fake_report(10.0))
    b = write(tmp_path / "b.json", fake_report(20.0))
    result = CliRunner().invoke(compare_cmd, [str(a), str(b)])
    assert result.exit_code == 0 and "2.00" in result.output


def test_compare_command_lets_user_error_propagate(tmp_path):
    bad = write(tmp_path / "bad.json", {"latency_ms": {}})
    result = CliRunner().invoke(compare_cmd, [str(bad)])
    assert isinstance(result.exception, UserError) and "latency_ms.p50" in str(result.exception)


def test_bench_command_passes_args_after_double_dash(tmp_path):
    bundle = make_bundle(tmp_path)
    results = tmp_path / "results"
    result = CliRunner().invoke(
        bench, [str(bundle), "--results", str(results), "--", "--runs", "7", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    (report,) = results.glob("*.json")
    assert json.loads(report.read_text())["runs"] == 7
    assert f"report: {report}" in result.output


def test_bench_command_exits_1_when_the_check_fails(tmp_path):
    bundle = make_bundle(tmp_path, reference_noise=5.0)
    result = CliRunner().invoke(
        bench, [str(bundle), "--results", str(tmp_path / "r"), "--", "--runs", "3", "--quiet"]
    )
    assert result.exit_code == 1
