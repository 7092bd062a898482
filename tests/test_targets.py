from __future__ import annotations

from pathlib import Path

import pytest

from edgepack.errors import UserError
from edgepack.profiles import list_targets, load_target, parse_profile, resolve_targets, targets_dir

GOOD = (targets_dir() / "arm64.toml").read_text()


def test_every_builtin_profile_parses_and_is_named_after_its_file() -> None:
    files = sorted(p.stem for p in targets_dir().glob("*.toml"))
    assert files == sorted(p.name for p in list_targets())
    assert {"cpu", "cpu-vnni", "arm64", "android", "ios"} <= set(files)


def test_alias_resolves_and_all_expands_to_the_matrix() -> None:
    assert load_target("mobile").name == "android"
    assert [p.name for p in resolve_targets("all")] == [p.name for p in list_targets()]


def test_reduce_range_only_where_avx2_saturates() -> None:
    assert load_target("cpu").data["quantization"]["reduce_range"] is True
    assert load_target("cpu-vnni").data["quantization"]["reduce_range"] is False


def test_unknown_target_names_the_choices() -> None:
    with pytest.raises(UserError, match=r"unknown target 'arm46'.*arm64.*Did you mean 'arm64'"):
        load_target("arm46")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            ("per_channel = true", "per_chanel = true"),
            r"unknown key quantization\.'per_chanel'.*Did you mean 'per_channel'",
        ),
        (("per_channel = true\n", ""), r"missing key quantization\.per_channel"),
        (
            ('activation_type = "uint8"', 'activation_type = "uint7"'),
            r"activation_type = 'uint7' is not allowed.*uint8",
        ),
        (("threads = 4", 'threads = "four"'), r"harness\.threads must be a int"),
        (("threads = 4", "threads = 0"), r"harness\.threads must be positive"),
        (("[harness]", "[harnes]"), r"unknown key 'harnes'.*Did you mean 'harness'"),
        (("name = ", "name = = "), r"not valid TOML"),
    ],
)
def test_bad_profile_gets_one_clear_line(edit: tuple[str, str], message: str) -> None:
    with pytest.raises(UserError, match=message) as info:
        parse_profile(GOOD.replace(*edit, 1), "custom.toml")
    assert "\n" not in str(info.value)


def test_user_written_profile_file_works(tmp_path: Path) -> None:
    path = tmp_path / "pi4.toml"
    path.write_text(
        GOOD.replace('name = "arm64"', 'name = "pi4"').replace("threads = 4", "threads = 3")
    )
    profile = load_target(str(path))
    assert profile.name == "pi4"
    assert profile.section("harness")["threads"] == 3


def test_missing_profile_file() -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_target("nowhere/custom.toml")


def test_decoder_section_is_optional_and_checked() -> None:
    """Profiles that serve decoders state their weight-only setting; the fixed-shape variants
    (NNAPI, CoreML) have none, and a bad value fails with one line."""
    served = {p.name: p.section("decoder") for p in list_targets() if p.section("decoder")}
    assert {"arm64", "cpu", "cpu-vnni", "android", "ios"} <= set(served)
    assert all(s == {"precision": "int4", "accuracy_level": 4} for s in served.values())
    assert load_target("android-nnapi").section("decoder") == {}
    fp32 = parse_profile(GOOD.replace("accuracy_level = 4", "accuracy_level = 0"), "c.toml")
    assert fp32.section("decoder")["accuracy_level"] == 0
    with pytest.raises(UserError, match=r"decoder\.accuracy_level = 5 is not allowed"):
        parse_profile(GOOD.replace("accuracy_level = 4", "accuracy_level = 5"), "c.toml")
    with pytest.raises(UserError, match=r"decoder\.precision = 'int2' is not allowed.*int4"):
        parse_profile(GOOD.replace('precision = "int4"', 'precision = "int2"'), "c.toml")
