"""The benchmark suite: MAC counting, interleaved timing, reuse of builds, tables, and a smoke run."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

from benchmarks.report import Row, latency_table, peak_table, quality_table
from benchmarks.timing import Harness, interleave, linear_macs, linear_shapes
from benchmarks.variants import Plan, Variant, _flags, load_or_build


def _qdq_graph(path: Path) -> Path:
    """x -> MatMul(w fp32 4x8) -> MatMul(DQ(w int8 8x6)) -> MatMul(self^T), the last not linear."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [
        numpy_helper.from_array(np.ones((4, 8), np.float32), "w1"),
        numpy_helper.from_array(np.ones((8, 6), np.int8), "w2q"),
        numpy_helper.from_array(np.float32(0.1), "s"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"]),
        helper.make_node("DequantizeLinear", ["w2q", "s"], ["w2"]),
        helper.make_node("MatMul", ["h1", "w2"], ["h2"]),
        helper.make_node("Transpose", ["h2"], ["h2t"], perm=[1, 0]),
        helper.make_node("MatMul", ["h2", "h2t"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 3])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_linear_shapes_follow_dequantize_and_skip_activation_matmuls(tmp_path: Path) -> None:
    path = _qdq_graph(tmp_path / "g.onnx")
    assert dict(linear_shapes(path)) == {(4, 8): 1, (8, 6): 1}
    assert linear_macs(path) == 4 * 8 + 8 * 6


class _FakeSession:
    def __init__(self, name: str, log: list[str]):
        self.name, self.log = name, log

    def run(self, _outputs: object, _feeds: object) -> None:
        self.log.append(self.name)


def test_interleave_alternates_models_and_counts_every_call() -> None:
    log: list[str] = []
    calls = {n: (_FakeSession(n, log), {}) for n in ("a", "b", "c")}
    times = interleave(calls, Harness(rounds=3, per_round=2, warmup=1))
    assert {n: len(t) for n, t in times.items()} == {"a": 6, "b": 6, "c": 6}
    measured = log[3:]  # after one warm-up call each
    assert measured[:6] == ["a", "a", "b", "b", "c", "c"]
    assert measured[6:8] == ["a", "a"]  # round two starts again with the first model


def _plan(tmp_path: Path, **kw: object) -> Plan:
    return Plan(
        model_dir=tmp_path,
        calibration=("x",),
        seq_len=8,
        workdir=tmp_path / "work",
        edgepack_config=None,
        distill_data=tmp_path / "d.txt",
        distill_seconds=0.0,
        **kw,  # type: ignore[arg-type]
    )


def test_load_or_build_reuses_same_settings_and_rebuilds_changed_ones(tmp_path: Path) -> None:
    built: list[int] = []

    def make(out: Path) -> Variant:
        built.append(1)
        (out / "m.onnx").write_bytes(b"x")
        return Variant("k", "K", out / "m.onnx", "int8", 1.5, "note")

    plan = _plan(tmp_path)
    first = load_or_build("k", "K", plan, {"a": 1}, make)
    again = load_or_build("k", "K", plan, {"a": 1}, make)
    assert len(built) == 1 and again == first and again.build_seconds == 1.5
    load_or_build("k", "K", plan, {"a": 2}, make)
    assert len(built) == 2
    saved = json.loads((tmp_path / "work" / "k" / "variant.json").read_text())
    assert saved["settings"]["a"] == 2 and saved["path"] == "m.onnx"


def test_a_failing_build_becomes_a_row_note_not_a_crash(tmp_path: Path) -> None:
    def make(out: Path) -> Variant:
        raise ValueError("calibration exploded")

    variant = load_or_build("bad", "Bad", _plan(tmp_path), {}, make)
    assert variant.path is None and "calibration exploded" in variant.note
    assert (tmp_path / "work" / "bad" / "error.log").is_file()


def test_flags_spell_build_config_keys_as_cli_options() -> None:
    assert _flags({"prune": 0.3, "distill_layers": 3}) == [
        "--prune",
        "0.3",
        "--distill-layers",
        "3",
    ]


def test_tables_show_ratios_to_fp32_and_dashes_for_missing_rows() -> None:
    fp32 = Variant("fp32", "fp32 (optimum export)", Path("a"), "fp32", 10.0)
    q = Variant("ep", "edgepack int8", Path("b"), "int8", 100.0, "search: default")
    missing = Variant("d", "distilled", None, "int8", None, "not run (--quick)")
    rows = [
        Row(fp32, 90.0, 1.0, 1.0, 0.8, 1000, {(1, 128): 40.0}, {(1, 128): 0.5}),
        Row(q, 23.0, 0.995, 0.98, 0.79, 1000, {(1, 128): 20.0}, {(1, 128): 0.25}),
        Row(missing),
    ]
    lat = latency_table(rows, [(1, 128)])
    assert "| edgepack int8 | 20.00 (0.50×) |" in lat
    assert "| fp32 (optimum export) | 40.00 (1.00×) |" in lat
    assert "| distilled | – |" in lat
    qual = quality_table(rows)
    assert "| edgepack int8 | 23.0 | 0.9950 | 0.9800 | 0.7900 | 100 | search: default |" in qual
    assert "not run (--quick)" in qual
    assert "| edgepack int8 | 0.00 | 25 % |" in peak_table(rows, [(1, 128)])


def _table_rows(markdown: str, header: str) -> dict[str, list[str]]:
    """{variant label: cells} of the markdown table whose header starts with ``header``."""
    block = markdown.split(header, 1)[1].split("\n\n", 1)[0]
    rows = {}
    for line in block.splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


LABELS = (
    "fp32 (optimum export)",
    "onnxruntime dynamic int8",
    "onnxruntime static int8",
    "optimum ORTQuantizer arm64 static",
    "edgepack int8 (cpu-vnni)",
    "edgepack int8 (cpu, reduce_range)",
    "edgepack prune 0.3 + int8",
    "edgepack distil 3 layers + int8",
)


@pytest.mark.slow
def test_quick_run_has_every_variant_with_sane_numbers(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from benchmarks.compare import main

    out = tmp_path / "results.md"
    result = CliRunner().invoke(
        main, ["--quick", "--workdir", str(tmp_path / "work"), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    markdown = out.read_text()
    assert (tmp_path / "results.png").stat().st_size > 1000
    quality = _table_rows(markdown, "| variant | size MB")
    latency = _table_rows(markdown, "| variant | 1 thr, seq 32")
    assert set(LABELS) <= set(quality) and set(LABELS) <= set(latency)
    assert quality["fp32 (optimum export)"][1] == "1.0000"
    for label in LABELS[:-1]:
        size, mean, low, rho = (float(x) for x in quality[label][:4])
        assert 0 < size < 5 and 0.9 < mean <= 1.0 and 0.5 < low <= mean and -1 <= rho <= 1
        for cell in latency[label]:
            ms, ratio = re.fullmatch(r"([\d.]+) \(([\d.]+)×\)", cell).groups()  # type: ignore[union-attr]
            assert float(ms) > 0 and float(ratio) > 0
    assert "not run (--quick)" in quality[LABELS[-1]][-1]
    assert all(c.startswith("1.00×") or "(1.00×)" in c for c in latency[LABELS[0]])
    assert "MatMulInteger u8×s8→s32" in markdown
