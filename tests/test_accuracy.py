"""Accuracy-aware quantization: search order, fallback surgery, best model kept, exit code 3."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from click.testing import CliRunner

from edgepack.cli import cli


def _build(model: Path, texts: Path, out: Path, *extra: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        cli,
        [
            "build",
            "--model",
            str(model),
            "--calibration",
            str(texts),
            "--samples",
            "30",
            "--target",
            "cpu-vnni",
            "--out",
            str(out),
            "--min-cosine",
            "0.5",
            *extra,
        ],
    )
    return result.exit_code, result.output


def test_unreachable_tolerance_saves_the_best_and_exits_3(
    tiny_st: Path, texts_file: Path, tmp_path: Path
) -> None:
    code, output = _build(
        tiny_st, texts_file, tmp_path, "--max-drop", "0"
    )  # weight rounding alone makes the drop > 0
    assert code == 3, output
    assert "no int8 model met --max-drop 0" in output and "the best model was saved" in output
    manifest = json.loads((tmp_path / f"{tiny_st.name}-cpu-vnni" / "manifest.json").read_text())
    search = manifest["quantization"]["accuracy_search"]
    assert search["met"] is False
    labels = [entry["candidate"] for entry in search["log"]]
    assert labels[:3] == ["default", "calibration percentile", "calibration entropy"]
    assert any(label.startswith("fallback") for label in labels)
    assert search["dev_drop"] == min(entry["dev_drop"] for entry in search["log"])
    kept = [k for k in manifest["quantization"]["kept_fp32"] if "dev drop" in k.get("reason", "")]
    assert kept, "the fallback layers and why must be recorded"


def test_met_tolerance_stops_at_the_first_candidate(
    tiny_st: Path, texts_file: Path, tmp_path: Path
) -> None:
    code, output = _build(tiny_st, texts_file, tmp_path, "--max-drop", "0.5")
    assert code == 0, output
    manifest = json.loads((tmp_path / f"{tiny_st.name}-cpu-vnni" / "manifest.json").read_text())
    search = manifest["quantization"]["accuracy_search"]
    assert search["met"] is True and [e["candidate"] for e in search["log"]] == ["default"]


def test_bypass_removes_only_the_named_activation_qdq(
    tiny_st: Path, texts_file: Path, tmp_path: Path
) -> None:
    import onnx

    from edgepack.profiles import targets_dir
    from edgepack.quantize.search import bypass_activation_qdq

    qdq = tmp_path / "qdq.toml"  # cpu-vnni as QDQ (its default is ort_fused)
    text = (targets_dir() / "cpu-vnni.toml").read_text()
    qdq.write_text(text.replace('name = "cpu-vnni"', 'name = "qdq"').replace("ort_fused", "qdq"))
    code, output = _build(tiny_st, texts_file, tmp_path, "--max-drop", "-1", "--target", str(qdq))
    assert code == 0, output
    model = onnx.load(str(tmp_path / f"{tiny_st.name}-qdq" / "model.onnx"))
    producer = {o: n for n in model.graph.node for o in n.output}
    linears = [
        n
        for n in model.graph.node
        if n.op_type == "MatMul"
        and producer.get(n.input[0]) is not None
        and producer[n.input[0]].op_type == "DequantizeLinear"
    ]
    target = linears[-1].name
    changed = bypass_activation_qdq(model, {target})
    node = next(n for n in changed.graph.node if n.name == target)
    new_producer = {o: n for n in changed.graph.node for o in n.output}
    assert (
        node.input[0] not in new_producer
        or new_producer[node.input[0]].op_type != "DequantizeLinear"
    )
    before, after = (
        Counter(n.op_type for n in model.graph.node),
        Counter(n.op_type for n in changed.graph.node),
    )
    assert after["QuantizeLinear"] <= before["QuantizeLinear"]
    assert after["MatMul"] == before["MatMul"]
    onnx.checker.check_model(changed)


def test_search_works_on_the_fused_format(tiny_st: Path, texts_file: Path, tmp_path: Path) -> None:
    from edgepack.profiles import targets_dir

    profile = tmp_path / "fused.toml"
    text = (targets_dir() / "cpu-vnni.toml").read_text()
    if 'quant_format = "ort_fused"' not in text:  # cpu-vnni's default since the fused format won
        text = text.replace(
            'calibrate_method = "minmax"', 'calibrate_method = "minmax"\nquant_format = "ort_fused"'
        )
    profile.write_text(text.replace('name = "cpu-vnni"', 'name = "fused"'))
    result = CliRunner().invoke(
        cli,
        [
            "build",
            "--model",
            str(tiny_st),
            "--calibration",
            str(texts_file),
            "--samples",
            "30",
            "--target",
            str(profile),
            "--out",
            str(tmp_path / "o"),
            "--min-cosine",
            "0.5",
            "--max-drop",
            "0",
        ],
    )
    assert result.exit_code == 3, result.output
    manifest = json.loads((tmp_path / "o" / f"{tiny_st.name}-fused" / "manifest.json").read_text())
    assert manifest["quantization"]["quant_format"] == "ort_fused"
    search = manifest["quantization"]["accuracy_search"]
    assert search["sensitivity"] and any(
        e["candidate"].startswith("fallback") for e in search["log"]
    )


def test_manifest_records_the_quantized_embeddings(
    tiny_st: Path, texts_file: Path, tmp_path: Path
) -> None:
    """manifest["quantization"] is the stage's record: each table it lists as quantized is gone
    from model.onnx as fp32, and a table the search put back (max drop 0) is fp32 again."""
    import onnx

    for drop, code_wanted in (("-1", 0), ("0", 3)):
        out = tmp_path / f"drop{drop}"
        code, output = _build(tiny_st, texts_file, out, "--max-drop", drop)
        assert code == code_wanted, output
        folder = out / f"{tiny_st.name}-cpu-vnni"
        quant = json.loads((folder / "manifest.json").read_text())["quantization"]
        model = onnx.load(str(folder / "model.onnx"))
        fp32 = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
        listed = {e["table"] for e in quant["embeddings"]}
        restored = {
            k["name"] for k in quant["kept_fp32"] if k.get("reason", "").startswith("embedding")
        }
        assert not listed & fp32 and restored <= fp32 and not listed & restored
        if drop == "-1":
            assert len(listed) == 3 and all(e["bits"] == 8 for e in quant["embeddings"])
            assert all(e["bytes_quantized"] < e["bytes_fp32"] / 3 for e in quant["embeddings"])
        else:  # every quantized item is tried in fp32; the best keeps what it needs
            names = {s["name"] for s in quant["accuracy_search"]["sensitivity"]}
            assert listed | restored <= names
