"""``edgepack compare`` on the decoder harness's reports (tiny random Llama), alone and mixed
with encoder reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from decoder_factory import build_tiny_decoder

from edgepack.device.compare import compare
from edgepack.errors import UserError


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, Path]:
    root = tmp_path_factory.mktemp("llm-compare")
    result = build_tiny_decoder(root)
    return result.folder, result.manifest, root


def _bench(folder: Path, out: Path, *args: str) -> dict:
    run = subprocess.run(
        [sys.executable, str(folder / "bench.py"), "--new-tokens", "8", "--json", str(out), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    return json.loads(out.read_text())


def test_decoder_reports_share_the_encoder_conventions(
    built: tuple[Path, dict, Path], tmp_path: Path
) -> None:
    folder, _, _ = built
    report = _bench(folder, tmp_path / "a.json")
    assert report["schema_version"] == 1 and report["kind"] == "decoder"
    assert report["bundle"] == folder.name and report["started_utc"].endswith("Z")
    assert {"machine", "os", "cores", "cpu_model"} <= set(report["env"])
    assert report["runtime"]["onnxruntime"] and report["runtime"]["threads"] == 1


def test_compare_decoder_reports_and_plot(built: tuple[Path, dict, Path], tmp_path: Path) -> None:
    folder, _, _ = built
    a = tmp_path / "one.json"
    b = tmp_path / "two.json"
    _bench(folder, a)
    two = _bench(folder, b, "--threads", "2")
    plot = tmp_path / "llm.png"
    text = compare([a, b], plot)
    header = text.splitlines()[0]
    assert "TTFT ms" in header and "tok/s" in header and "RSS MB" in header
    row = next(line for line in text.splitlines() if line.startswith("two"))
    assert f"{two['perf']['ttft_ms']:.2f}" in row and "pass" in row
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_groups_a_mixed_set_by_kind(built: tuple[Path, dict, Path], tmp_path: Path) -> None:
    from test_compare import fake_report

    folder, _, _ = built
    llm = tmp_path / "llm.json"
    _bench(folder, llm)
    enc = tmp_path / "enc.json"
    enc.write_text(json.dumps(fake_report(10.0)))
    plot = tmp_path / "mixed.png"
    text = compare([enc, llm], plot)
    assert "encoder reports" in text and "decoder reports" in text
    assert plot.is_file() and (tmp_path / "mixed-decoder.png").is_file()


def test_compare_refuses_an_unknown_kind(tmp_path: Path) -> None:
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"schema_version": 1, "kind": "vision"}))
    with pytest.raises(UserError, match=r"x\.json.*kind 'vision'.*encoder, decoder"):
        compare([bad], None)
