"""The report's plots from recorded build results: every bar there, every label readable."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from edgepack.bundle import BuildResult


def result(target: str, model: dict, fidelity: dict) -> BuildResult:
    manifest = {"model": model, "fidelity": fidelity}
    return BuildResult(target, Path(target), Path(f"{target}.tar.gz"), manifest, Path("fp32"))


def image(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as picture:
        return picture.size


def test_layer_names_lose_the_prefixes_every_layer_shares() -> None:
    from edgepack.report import _layer_name

    assert _layer_name("/0/encoder/layer.3/attention/self/query/MatMul") == (
        "layer.3/attention/self/query"
    )
    assert _layer_name("0.model.embeddings.word_embeddings.weight") == "embeddings.word_embeddings"


def test_size_plot_has_a_pair_of_bars_per_target(tmp_path: Path) -> None:
    from edgepack.report import _size_plot

    results = [
        result(t, {"bytes": b, "fp32_bytes": 90_000_000, "precision": p}, {})
        for t, b, p in (("arm64", 23e6, "int8"), ("android-nnapi", 91e6, "fp32"))
    ]
    data = _size_plot(results)
    (tmp_path / "size.png").write_bytes(data)
    width, height = image(data)
    assert width > height > 200


def test_decoder_perplexity_plot_shows_every_step_tried(tmp_path: Path) -> None:
    from edgepack.decoder_report import _perplexity_plot

    fidelity = {
        "perplexity_fp32": 30.5,
        "tried": [{"step": "int4", "perplexity": 39.4}, {"step": "int8", "perplexity": 30.7}],
    }
    data = _perplexity_plot([result("arm64", {}, fidelity), result("android", {}, fidelity)])
    (tmp_path / "ppl.png").write_bytes(data)
    assert image(data)[0] > 500  # four bars widen the figure


@pytest.mark.parametrize("count", [3, 36])
def test_sensitivity_plot_grows_with_its_layers(count: int) -> None:
    from edgepack.report import _sensitivity_plot

    sens = [
        {"name": f"/0/encoder/layer.{i}/attention/output/dense/MatMul", "dev_drop_recovered": i}
        for i in range(count)
    ]
    _, height = image(_sensitivity_plot(sens))
    assert height > (20 * count if count > 10 else 200)  # a readable line per layer
