"""Hostile and broken input through the real CLI: exit code 2 and one line naming what is wrong.

Each case is something a user really hands over: a results file edited by hand or written with a
NaN, a half-downloaded bundle archive, a manifest copied without its SHA256SUMS, a model config
with a nonsense value, a calibration file holding one enormous line or half a gigabyte.
"""

from __future__ import annotations

import json
import shutil
import struct
import tarfile
import time
import tracemalloc
import zlib
from pathlib import Path

import pytest
from bundle_factory import make_bundle, make_tarball
from click.testing import CliRunner

from edgepack.calibration import MAX_FILE_BYTES, build_texts, read_texts
from edgepack.cli import cli
from edgepack.config import BuildConfig
from edgepack.errors import UserError

CAP = 32_768  # characters per calibration text: 64 per token of a 512-token window


def _fails_with(args: list[str], *words: str) -> str:
    """Run the CLI; it must exit 2 with exactly one ``Error:`` line holding every word."""
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.output.strip().splitlines()
    assert lines and lines[-1].startswith("Error: "), result.output
    assert sum(line.startswith("Error") for line in lines) == 1, result.output
    assert "Traceback" not in result.output and "Aborted" not in result.output
    for word in words:
        assert word in lines[-1], (word, lines[-1])
    return lines[-1]


# ---- compare: fields of the wrong type, NaN and infinity ---------------------------------------


def _report(**changes: object) -> dict:
    """A valid bench.py report; ``changes`` maps dotted keys to the values to put there."""
    report = {
        "latency_ms": {"p50": 10.0, "p90": 11.0, "p99": 13.0},
        "latencies_ms": [9.0 + i / 25 for i in range(50)],
        "peak_rss_mb": 80.5,
        "cold_start_ms": {"import": 30.0, "session_create": 20.0, "first_inference": 5.0},
        "throughput_per_s": 100.0,
        "check": {"passed": True},
    }
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = report
        for key in parents:
            node = node[key]
        node[last] = value
    return report


def _write_report(tmp_path: Path, name: str, report: dict) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(report))  # json writes NaN and Infinity as bare words, like bench.py
    return path


WRONG_TYPES = [
    ("latencies_ms", "9.1, 9.3, 9.2"),
    ("latencies_ms", [9.1, "9.3"]),
    ("latencies_ms", {"0": 9.1}),
    ("latency_ms.p90", "fast"),
    ("latency_ms.p99", [13.0]),
    ("peak_rss_mb", "80 MB"),
    ("cold_start_ms.import", {"ms": 3}),
    ("throughput_per_s", True),
    ("check.passed", "yes"),
]


@pytest.mark.parametrize(
    ("field", "value"), WRONG_TYPES, ids=[f"{f}={v!r}" for f, v in WRONG_TYPES]
)
def test_compare_refuses_a_field_of_the_wrong_type(tmp_path: Path, field: str, value: object):
    good = _write_report(tmp_path, "base.json", _report())
    bad = _write_report(tmp_path, "edited.json", _report(**{field: value}))
    _fails_with(
        ["compare", str(good), str(bad), "--plot", str(tmp_path / "out.png")], "edited.json", field
    )
    assert not (tmp_path / "out.png").exists()


NOT_FINITE = [
    ("latency_ms.p50", float("nan")),
    ("latency_ms.p50", float("inf")),
    ("latency_ms.p90", float("nan")),
    ("latency_ms.p99", float("inf")),
    ("peak_rss_mb", float("-inf")),
    ("cold_start_ms.first_inference", float("nan")),
    ("throughput_per_s", float("nan")),
    ("latencies_ms", [9.0, float("nan"), 9.2]),
]


@pytest.mark.parametrize(("field", "value"), NOT_FINITE, ids=[f"{f}={v!r}" for f, v in NOT_FINITE])
def test_compare_refuses_nan_and_infinity(tmp_path: Path, field: str, value: object):
    bad = _write_report(tmp_path, "nan.json", _report(**{field: value}))
    assert "NaN" in bad.read_text() or "Infinity" in bad.read_text()
    _fails_with(["compare", str(bad)], "nan.json", field)


def test_compare_still_takes_nulls_and_missing_raw_latencies(tmp_path: Path):
    """perf_test reports have no raw latencies and no import time: that is not an error."""
    lean = _report(**{"latencies_ms": None, "cold_start_ms.import": None, "check.passed": None})
    path = _write_report(tmp_path, "android.json", lean)
    result = CliRunner().invoke(cli, ["compare", str(path)])
    assert result.exit_code == 0, result.output
    assert "skip" in result.output and "nan" not in result.output.lower()


# ---- truncated or corrupt bundle archives ------------------------------------------------------


def _archive(tmp_path: Path) -> Path:
    return make_tarball(make_bundle(tmp_path / "src"), tmp_path / "dl")


def _truncate(archive: Path, keep: float | int) -> Path:
    data = archive.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    archive.write_bytes(data[:n])
    return archive


def _bad_second_block(archive: Path) -> Path:
    """The same tar, gzipped with stored (level 0) deflate blocks, the second block's length
    check broken: the archive opens, then zlib fails part-way (zlib.error, not EOFError)."""
    import gzip

    raw = gzip.decompress(archive.read_bytes())
    comp = zlib.compressobj(0, zlib.DEFLATED, 31)
    data = bytearray(comp.compress(raw) + comp.flush())
    (first_len,) = struct.unpack_from("<H", data, 11)  # 10-byte gzip header, 1 block-header byte
    second = 10 + 5 + first_len
    assert second + 5 < len(data), "the tar must span two stored blocks"
    data[second + 3] ^= 0xFF  # NLEN, the one's complement of LEN
    archive.write_bytes(bytes(data))
    return archive


BROKEN = [
    ("first 60% of the bytes", lambda a: _truncate(a, 0.6)),
    ("first 9 bytes", lambda a: _truncate(a, 9)),
    ("corrupt deflate block", _bad_second_block),
]


@pytest.mark.parametrize("breakage", [b[1] for b in BROKEN], ids=[b[0] for b in BROKEN])
@pytest.mark.parametrize(
    "command",
    [
        lambda a, t: ["verify", str(a)],
        lambda a, t: [
            "bench",
            str(a),
            "--results",
            str(t / "r"),
            "--",
            "--runs",
            "5",
            "--warmup",
            "1",
        ],
        lambda a, t: ["bench", str(a), "--host", "nobody@127.0.0.1", "--port", "9"],
    ],
    ids=["verify", "bench", "bench --host"],
)
def test_a_broken_archive_says_so(tmp_path: Path, command, breakage):
    archive = breakage(_archive(tmp_path))
    broken = (tarfile.TarError, EOFError, zlib.error)
    with pytest.raises(broken), tarfile.open(archive, "r:*") as tar:  # it really is broken
        tar.extractall(tmp_path / "raw", filter="data")
    _fails_with(command(archive, tmp_path), archive.name, "truncated or corrupt", "download")
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


# ---- rebuild from a manifest with no SHA256SUMS beside it --------------------------------------


def _rebuildable(tmp_path: Path) -> Path:
    bundle = make_bundle(tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["build"] = {"config": {"model": str(tmp_path / "model"), "samples": 20}}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return bundle


def test_rebuild_without_sha256sums(tmp_path: Path):
    bundle = _rebuildable(tmp_path)
    (bundle / "SHA256SUMS").unlink()
    _fails_with(["rebuild", str(bundle / "manifest.json")], "SHA256SUMS", str(bundle))


def test_rebuild_with_a_garbled_sha256sums(tmp_path: Path):
    bundle = _rebuildable(tmp_path)
    (bundle / "SHA256SUMS").write_text("not a checksum line\n")
    _fails_with(["rebuild", str(bundle)], "SHA256SUMS", "line 1")


# ---- a model config with a nonsense max_position_embeddings ------------------------------------

POSITIONS = ["abc", 3.5, None, [512], True, 0, -64]


@pytest.mark.parametrize("value", POSITIONS, ids=[repr(v) for v in POSITIONS])
def test_max_position_embeddings_must_be_a_positive_integer(
    tiny_bert: Path, texts_file: Path, tmp_path: Path, value: object
):
    model = Path(shutil.copytree(tiny_bert, tmp_path / "model"))
    config = json.loads((model / "config.json").read_text())
    config["max_position_embeddings"] = value
    (model / "config.json").write_text(json.dumps(config))
    args = ["build", "--model", str(model), "--calibration", str(texts_file), "--samples", "20"]
    line = _fails_with([*args, "--target", "cpu", "--out", str(tmp_path / "dist")], "config.json")
    assert "max_position_embeddings" in line and repr(value) in line
    assert not (tmp_path / "dist").exists() or not any((tmp_path / "dist").iterdir())


# ---- calibration files: one huge line, half a gigabyte -----------------------------------------


def _calibration_with_a_huge_line(tmp_path: Path, line: int = 11, suffix: str = ".txt") -> Path:
    from conftest import WORDS

    normal = [" ".join(WORDS[i : i + 5]) for i in range(20)]
    huge = "the cat runs over the lazy dog " * 130_000  # about 4 MB on one line
    texts = [*normal[: line - 1], huge, *normal[line - 1 :]]
    path = tmp_path / f"calib{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    else:
        path.write_text("\n".join(texts) + "\n")
    return path


def test_a_huge_calibration_line_is_refused_before_tokenizing(
    tiny_bert: Path, tmp_path: Path
) -> None:
    calib = _calibration_with_a_huge_line(tmp_path)
    start = time.monotonic()
    line = _fails_with(
        [
            "build",
            "--model",
            str(tiny_bert),
            "--calibration",
            str(calib),
            "--samples",
            "1",
            "--target",
            "cpu",
            "--out",
            str(tmp_path / "dist"),
        ],
        "calib.txt:11",
        f"{CAP:,}",
        "--truncate",
    )
    assert time.monotonic() - start < 20, "the text was tokenized before being refused"
    assert "characters" in line


def test_truncate_cuts_huge_texts_to_the_cap_before_tokenizing(tmp_path: Path) -> None:
    calib = _calibration_with_a_huge_line(tmp_path, line=3, suffix=".jsonl")
    config = BuildConfig(calibration=str(calib), samples=10, truncate=True)
    texts = build_texts(config)
    everything = texts.calibration.texts + texts.heldout.texts + texts.dev.texts
    assert max(len(t) for t in everything) == CAP
    with pytest.raises(UserError, match=r"calib\.jsonl:3: .*32,768"):
        build_texts(BuildConfig(calibration=str(calib), samples=10))


def test_a_build_with_truncate_calibrates_on_the_cut_text(tiny_bert: Path, tmp_path: Path) -> None:
    calib = _calibration_with_a_huge_line(tmp_path, line=1)
    args = ["build", "--model", str(tiny_bert), "--calibration", str(calib), "--samples", "10"]
    args += ["--target", "cpu", "--out", str(tmp_path / "dist"), "--truncate"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, (result.output, result.exception)
    (path,) = (tmp_path / "dist").glob("*-cpu/manifest.json")
    manifest = json.loads(path.read_text())
    expected = build_texts(
        BuildConfig(calibration=str(calib), samples=10, truncate=True)
    ).calibration
    assert manifest["calibration"]["sha256"] == expected.sha256
    assert max(len(t) for t in expected.texts) == CAP, "not cut to the cap"


@pytest.mark.parametrize("suffix", [".txt", ".csv"])
def test_the_cap_is_exact_and_names_the_line(tmp_path: Path, suffix: str) -> None:
    """A text of exactly the cap is read whole; one character more is refused, or cut."""
    head = ["text"] if suffix == ".csv" else []
    at_cap, over = "a" * (CAP - 1) + "b", "c" * CAP + "d"
    path = tmp_path / f"t{suffix}"
    lines = [*head, "short one", at_cap, over, *(f"short {n}" for n in range(10))]
    path.write_text("\n".join(lines) + "\n")
    refused = BuildConfig(calibration=str(path), samples=1)
    with pytest.raises(UserError, match=rf"t\{suffix}:{3 + len(head)}: .*{CAP:,}"):
        build_texts(refused)
    texts = build_texts(BuildConfig(calibration=str(path), samples=1, truncate=True))
    parts = (texts.calibration, texts.heldout, texts.dev, texts.fit)
    everything = {t for part in parts for t in part.texts}
    assert at_cap in everything and "c" * CAP in everything and over not in everything


def test_a_513_mb_calibration_file_is_refused_unread(tiny_bert: Path, tmp_path: Path) -> None:
    big = tmp_path / "big.txt"
    with open(big, "wb") as handle:
        handle.truncate(MAX_FILE_BYTES + (1 << 20))  # sparse: no disk used
    tracemalloc.start()
    try:
        with pytest.raises(UserError, match="larger than 512 MB"):
            read_texts(big)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"{peak >> 20} MB allocated to refuse a file by its size"
    _fails_with(
        [
            "build",
            "--model",
            str(tiny_bert),
            "--calibration",
            str(big),
            "--target",
            "cpu",
            "--out",
            str(tmp_path / "dist"),
        ],
        "big.txt",
        "larger than 512 MB",
    )
