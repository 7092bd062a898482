"""What the device harness takes from the user: flags in range, a --compare baseline it can judge,
and JSON of any depth, each refused in one line with exit 2 instead of a hang, a traceback or a
false "ok". The host's readers get the same bound on JSON nesting.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from bundle_factory import load_harness_module, make_bundle, write_sums
from click.testing import CliRunner

from edgepack.cli import cli
from edgepack.errors import UserError

QUICK = ("--runs", "2", "--warmup", "0", "--quiet", "--skip-check")
HANG = 30  # seconds; only a hang (a range expanded, a warmup without end) reaches it
DEEP = "[" * 5000 + "]" * 5000

bench = load_harness_module("bench")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = make_bundle(tmp_path_factory.mktemp("gates"))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["harness"]["max_seq_len"] = 64  # the model's positions, as a build records them
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    write_sums(folder)
    return folder


def run_bench(bundle: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-I", str(bundle / "bench.py"), *args],
                          capture_output=True, text=True, timeout=HANG, check=False)  # fmt: skip


def refused(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in proc.stderr, (word, proc.stderr)


BASELINES = {
    "NaN": "NaN",
    "Infinity": "Infinity",
    "-Infinity": "-Infinity",
    "string nan": '"nan"',
    "true": "true",
    "zero": "0",
    "negative": "-3.5",
    "string number": '"10.0"',
    "null": "null",
}


@pytest.mark.parametrize("name", list(BASELINES))
def test_compare_refuses_a_baseline_p50_that_is_not_a_positive_number(
    bundle: Path, tmp_path: Path, name: str
) -> None:
    base = tmp_path / "base.json"
    base.write_text('{"latency_ms": {"p50": ' + BASELINES[name] + "}}")
    with pytest.raises(bench.HarnessError, match=r"latency_ms\.p50"):
        bench.compare_to_baseline(1.0, base, 0.05)
    proc = run_bench(bundle, *QUICK, "--compare", str(base))
    refused(proc, "--compare", "latency_ms.p50")
    assert "ok:" not in proc.stdout


def test_compare_still_judges_a_real_baseline(tmp_path: Path) -> None:
    base = tmp_path / "base.json"
    base.write_text('{"latency_ms": {"p50": 4}}')
    assert bench.compare_to_baseline(4.1, base, 0.05)["regressed"] is False
    assert bench.compare_to_baseline(5.0, base, 0.05)["regressed"] is True
    (tmp_path / "latest.json").symlink_to(base)  # the user's own link is fine
    assert bench.compare_to_baseline(4.1, tmp_path / "latest.json", 0.05)["ratio"] == 1.025
    big = tmp_path / "big.json"
    big.write_text('{"latency_ms": {"p50": 1' + "0" * 400 + "}}")
    with pytest.raises(bench.HarnessError, match="finite number"):
        bench.compare_to_baseline(4.1, big, 0.05)
    os.mkfifo(tmp_path / "pipe.json")  # never opened: opening a FIFO blocks without a writer
    with pytest.raises(bench.HarnessError, match="not a regular file"):
        bench.compare_to_baseline(4.1, tmp_path / "pipe.json", 0.05)


FLAGS = [
    ("--runs", "0"),
    ("--runs", "-5"),
    ("--runs", "100000000000"),
    ("--warmup", "-1"),
    ("--warmup", "1000000000"),
    ("--threads", "0"),
    ("--threads", "100000"),
    ("--inter-op", "0"),
    ("--batch", "0"),
    ("--batch", "1000000000"),
    ("--cold-runs", "-1"),
    ("--seq-len", "0"),
    ("--seq-len", "65"),
    ("--duration", "0"),
    ("--duration", "1e12"),
    ("--cpus", "0-99999999999999"),
    ("--cpus", "-1"),
]


@pytest.mark.parametrize(("flag", "value"), FLAGS, ids=[f"{f}={v}" for f, v in FLAGS])
def test_out_of_range_flags_are_one_line(bundle: Path, flag: str, value: str) -> None:
    refused(run_bench(bundle, "--runs", "2", "--warmup", "0", "--quiet", flag, value), flag)


def test_seq_len_within_the_models_positions_runs(bundle: Path) -> None:
    proc = run_bench(bundle, *QUICK, "--seq-len", "64")
    assert proc.returncode == 0, proc.stderr


# --- JSON nesting, device and host -------------------------------------------------------------


def test_device_compare_file_nested_deep_is_one_line(bundle: Path, tmp_path: Path) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text('{"latency_ms": {"p50": ' + DEEP + "}}")
    refused(run_bench(bundle, *QUICK, "--compare", str(deep)), "deep.json", "levels deep")


def test_host_compare_file_nested_deep_is_one_line(tmp_path: Path) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text(DEEP)
    result = CliRunner().invoke(cli, ["compare", str(deep)])
    assert result.exit_code == 2 and "levels deep" in result.output, result.output
    assert "Traceback" not in result.output


def test_host_readers_bound_json_nesting(tmp_path: Path) -> None:
    from edgepack.bundle import read_manifest
    from edgepack.calibration import read_texts
    from edgepack.evaldata import read_eval_data

    calibration = tmp_path / "calib.jsonl"
    calibration.write_text('{"text": "fine"}\n{"text": ' + DEEP + "}\n")
    with pytest.raises(UserError, match=r"calib\.jsonl:2: JSON nested 5001 levels deep"):
        read_texts(calibration)
    data = tmp_path / "eval.jsonl"
    data.write_text('{"tokens": ' + DEEP + ', "tags": []}\n')
    with pytest.raises(UserError, match=r"eval\.jsonl:1: JSON nested"):
        read_eval_data(data)
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "manifest.json").write_text('{"schema_version": 1, "x": ' + DEEP + "}")
    with pytest.raises(UserError, match="levels deep"):
        read_manifest(bundle)
    (bundle / "manifest.json").write_text('{"schema_version": 1, "x": ' + "[" * 60 + "]" * 60 + "}")
    assert read_manifest(bundle)["schema_version"] == 1  # deep but sane nesting still reads
