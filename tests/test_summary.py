"""The build table's host latency: a ratio per interleaved round, their median and spread."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgepack.cli import cli
from edgepack.summary import speed_ratio


def flat(*rounds: list[float]) -> list[float]:
    return [t for r in rounds for t in r]


def test_ratio_is_the_median_of_per_round_ratios() -> None:
    # Round 3 ran while the machine was busy: both models 3x slower, the ratio still 0.5.
    # Round 5 saw the load arrive between the two models: one outlying ratio, not the median.
    fp32 = flat([10, 11, 10], [10, 10, 10], [30, 31, 30], [10, 10, 10], [10, 10, 10])
    model = flat([5, 5, 6], [5, 5, 5], [15, 15, 16], [5, 5, 5], [20, 20, 20])
    ratio = speed_ratio(model, fp32, per_round=3)
    assert ratio["median"] == 0.5 and ratio["min"] == 0.5 and ratio["max"] == 2.0
    assert ratio["rounds"] == 5 and ratio["noisy"]
    # The ratio of overall medians would be 5 / 10 here too, but one slow fp32 round moves it:
    steady = speed_ratio([5.0] * 15, [10.0] * 12 + [12.0] * 3, per_round=3)
    assert steady["median"] == 0.5 and steady["max"] == 0.5 and not steady["noisy"]


def test_an_incomplete_round_is_not_counted() -> None:
    assert speed_ratio([1, 1, 1, 1, 9], [2, 2, 2, 2, 2], per_round=2)["rounds"] == 2
    with pytest.raises(ValueError):
        speed_ratio([1.0], [1.0], per_round=5)


def test_build_table_shows_the_spread(tiny_st: Path, texts_file: Path, tmp_path: Path) -> None:
    args = ["build", "--model", str(tiny_st), "--calibration", str(texts_file), "--samples", "40"]
    args += ["--out", str(tmp_path), "--min-cosine", "0.5", "--target", "cpu"]
    result = CliRunner().invoke(cli, args, terminal_width=100)
    assert result.exit_code == 0, result.output
    assert "x range" in result.output
    assert "p50 x: median over 10 interleaved rounds" in result.output
    row = next(line for line in result.output.splitlines() if " cpu " in line and "int8" in line)
    median, low, high = re.search(r"(\d+\.\d\d) │(\d+\.\d\d)-(\d+\.\d\d)", row).groups()
    assert float(low) <= float(median) <= float(high)
    page = (tmp_path / "report.md").read_text()
    assert "ratio (round range)" in page
