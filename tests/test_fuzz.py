"""Fuzz the parsers that read user files: any input ends in a value or a clean UserError."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgepack.bundle.manifest import read_manifest
from edgepack.calibration import read_texts
from edgepack.config import read_config
from edgepack.device.compare import load_report
from edgepack.errors import UserError
from edgepack.profiles import SCHEMA, parse_profile, targets_dir

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
GOOD_PROFILE = (targets_dir() / "cpu.toml").read_text()
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)


_FOLDER: list[Path] = []


@pytest.fixture(scope="module", autouse=True)
def _scratch() -> Iterator[None]:
    """One folder for the module's examples, removed at the end (hypothesis forbids tmp_path)."""
    with tempfile.TemporaryDirectory(prefix="edgepack-fuzz-") as folder:
        _FOLDER.append(Path(folder))
        yield
        _FOLDER.clear()


def _write(name: str, content: bytes) -> Path:
    path = _FOLDER[0] / name
    path.write_bytes(content)
    return path


@FUZZ
@given(suffix=st.sampled_from([".txt", ".jsonl", ".csv"]), content=st.binary(max_size=400))
def test_text_readers_never_crash(suffix: str, content: bytes) -> None:
    try:
        texts = read_texts(_write("data" + suffix, content))
    except UserError as exc:
        assert "\n" not in str(exc)
    else:
        assert texts.texts and all(isinstance(t, str) and t for t in texts.texts)


@FUZZ
@given(rows=st.lists(json_values, max_size=5))
def test_jsonl_reader_with_json_rows(rows: list[object]) -> None:
    content = "\n".join(json.dumps(r) for r in rows).encode()
    try:
        texts = read_texts(_write("d.jsonl", content))
    except UserError as exc:
        assert "\n" not in str(exc)
    else:
        wanted = [
            r["text"].strip()
            for r in rows
            if isinstance(r, dict) and isinstance(r.get("text"), str)
        ]
        assert list(texts.texts) == list(dict.fromkeys(t for t in wanted if t))


@FUZZ
@given(text=st.text(max_size=300))
def test_profile_parser_never_crashes_on_text(text: str) -> None:
    try:
        parse_profile(text, "fuzz.toml")
    except UserError as exc:
        assert "\n" not in str(exc)


@FUZZ
@given(
    section=st.sampled_from([k for k, v in SCHEMA.items() if isinstance(v, dict)]),
    value=st.sampled_from(['"x"', "0", "-1", "true", "1.5", "[]", '["a"]', "{}"]),
    line=st.integers(min_value=0, max_value=60),
)
def test_profile_parser_on_mutated_profiles(section: str, value: str, line: int) -> None:
    lines = GOOD_PROFILE.splitlines()
    keyed = [i for i, x in enumerate(lines) if " = " in x and not x.startswith("#")]
    i = keyed[line % len(keyed)]
    lines[i] = lines[i].split(" = ")[0] + " = " + value
    try:
        profile = parse_profile("\n".join(lines), "fuzz.toml")
    except UserError as exc:
        assert "\n" not in str(exc)
    else:
        assert profile.name


@FUZZ
@given(content=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_build_config_reader(content: bytes) -> None:
    try:
        read_config(_write("build.toml", content))
    except UserError as exc:
        assert "\n" not in str(exc)


@FUZZ
@given(data=json_values)
def test_manifest_reader(data: object) -> None:
    path = _write("manifest.json", json.dumps(data).encode())
    try:
        manifest = read_manifest(path.parent)
    except UserError:
        pass
    else:
        assert manifest["schema_version"] == 1


@FUZZ
@given(data=json_values)
def test_bench_report_reader(data: object) -> None:
    try:
        load_report(_write("r.json", json.dumps(data).encode()))
    except UserError as exc:
        assert str(exc)


@FUZZ
@given(data=json_values)
def test_harness_baseline_reader(data: object) -> None:
    from bundle_factory import load_harness_module

    bench = load_harness_module("bench")
    try:
        result = bench.compare_to_baseline(
            10.0, _write("base.json", json.dumps(data).encode()), 0.05
        )
    except bench.HarnessError:
        pass
    else:
        assert result["statistic"] == "p50"
