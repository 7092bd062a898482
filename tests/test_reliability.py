"""Bad input through the real CLI: one clear line, exit code 2, no traceback, nothing written.

Each case breaks one thing a user could get wrong and names the words the message must contain.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from bundle_factory import write_sums
from click.testing import CliRunner

from edgepack.cli import cli
from edgepack.profiles import targets_dir

Case = tuple[str, Callable[[Path, Path, Path], list[str]], str]


def _model(tiny: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(tiny, tmp / "model"))


def _build(tmp: Path, model: Path | str, calib: Path | str, *extra: str) -> list[str]:
    return [
        "build",
        "--model",
        str(model),
        "--calibration",
        str(calib),
        "--samples",
        "20",
        "--out",
        str(tmp / "dist"),
        "--target",
        "arm64",
        *extra,
    ]


def _texts(tmp: Path, name: str, content: bytes) -> Path:
    path = tmp / name
    path.write_bytes(content)
    return path


def _lines(count: int) -> str:
    from conftest import WORDS

    return "\n".join(" ".join(WORDS[i : i + 4]) for i in range(count))


def _edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _profile(tmp: Path, old: str, new: str) -> Path:
    path = tmp / "custom.toml"
    path.write_text((targets_dir() / "arm64.toml").read_text().replace(old, new, 1))
    return path


def _tar(tmp: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    path = tmp / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        top = tarfile.TarInfo("bundle")
        top.type = tarfile.DIRTYPE
        tar.addfile(top)
        member.size = len(data) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


def _weights(m: Path) -> Path:
    return m / "model.safetensors"


def _pickle_bomb(m: Path) -> None:
    import pickle

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("pwned",))

    _weights(m).unlink()
    (m / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Evil()}))


def _bundle(tmp: Path) -> Path:
    from bundle_factory import make_bundle

    return make_bundle(tmp / "b")


CASES: list[Case] = [
    ("model path missing", lambda t, m, c: _build(t, t / "nope", c), "does not exist"),
    ("model path is a file", lambda t, m, c: _build(t, c, c), "is a file; give the model folder"),
    (
        "config but no weights",
        lambda t, m, c: (_weights(m).unlink(), _build(t, m, c))[1],
        "no weights",
    ),
    (
        "weights truncated",
        lambda t, m, c: (_weights(m).write_bytes(_weights(m).read_bytes()[:999]), _build(t, m, c))[
            1
        ],
        "corrupt",
    ),
    (
        "weights corrupt",
        lambda t, m, c: (
            _weights(m).write_bytes(b"\x08" + b"\x00" * 7 + b"notjson!"),
            _build(t, m, c),
        )[1],
        "corrupt",
    ),
    (
        "unsupported architecture",
        lambda t, m, c: (_edit_json(m / "config.json", model_type="mamba"), _build(t, m, c))[1],
        "unsupported architecture 'mamba'",
    ),
    (
        "needs trust_remote_code",
        lambda t, m, c: (
            _edit_json(m / "config.json", auto_map={"AutoModel": "x.Y"}),
            _build(t, m, c),
        )[1],
        "--trust-remote-code",
    ),
    (
        "pickle with code in it",
        lambda t, m, c: (_pickle_bomb(m), _build(t, m, c))[1],
        "not a plain weights pickle",
    ),
    (
        "unknown task",
        lambda t, m, c: _build(t, m, c, "--task", "translation"),
        "unknown task 'translation'",
    ),
    (
        "calibration missing",
        lambda t, m, c: _build(t, m, t / "none.txt"),
        "none.txt does not exist",
    ),
    (
        "calibration empty",
        lambda t, m, c: _build(t, m, _texts(t, "e.txt", b"\n \n")),
        "holds no texts",
    ),
    (
        "calibration binary",
        lambda t, m, c: _build(t, m, _texts(t, "b.txt", b"\x00\xff" * 50)),
        "looks binary",
    ),
    (
        "calibration wrong encoding",
        lambda t, m, c: _build(
            t, m, _texts(t, "l.txt", "na\u00efve caf\u00e9\n".encode("utf-16-le"))
        ),
        "UTF-8",
    ),
    (
        "jsonl missing field",
        lambda t, m, c: _build(t, m, _texts(t, "x.jsonl", b'{"sentence": "hi"}\n')),
        "no field 'text'",
    ),
    (
        "csv missing column",
        lambda t, m, c: _build(t, m, _texts(t, "x.csv", b"sentence\nhi\n")),
        "no column 'text'",
    ),
    (
        "fewer texts than --samples",
        lambda t, m, c: _build(t, m, c, "--samples", "5000"),
        "fewer than --samples 5000",
    ),
    (
        "text longer than the model's maximum",
        lambda t, m, c: _build(
            t,
            m,
            _texts(t, "long.txt", (_lines(40) + "\n" + "the cat " * 200).encode()),
        ),
        "more than the model's maximum 64",
    ),
    (
        "unknown target",
        lambda t, m, c: _build(t, m, c, "--target", "risc-v"),
        "unknown target 'risc-v'",
    ),
    (
        "profile key mistyped",
        lambda t, m, c: _build(
            t, m, c, "--target", str(_profile(t, "reduce_range", "reduce_rang"))
        ),
        "Did you mean 'reduce_range'",
    ),
    (
        "profile key missing",
        lambda t, m, c: _build(t, m, c, "--target", str(_profile(t, "seq_len = 128\n", ""))),
        "missing key harness.seq_len",
    ),
    (
        "profile value not allowed",
        lambda t, m, c: _build(t, m, c, "--target", str(_profile(t, '"minmax"', '"average"'))),
        "'average' is not allowed",
    ),
    (
        "unknown build config key",
        lambda t, m, c: ["build", "--config", str(_texts(t, "b.toml", b'modle = "x"\n'))],
        "unknown key 'modle'. Valid",
    ),
    (
        "output folder not writable",
        lambda t, m, c: [
            "build",
            "--model",
            str(m),
            "--calibration",
            str(c),
            "--samples",
            "20",
            "--out",
            str(_texts(t, "blocker", b"") / "dist"),
        ],
        "is a file, so no folder can be made there",
    ),
    (
        "negative samples",
        lambda t, m, c: _build(t, m, c, "--samples", "-3"),
        "--samples must be positive",
    ),
    (
        "distillation without data",
        lambda t, m, c: _build(t, m, c, "--distill-layers", "1"),
        "needs --distill-data",
    ),
    (
        "tar with ../ path",
        lambda t, m, c: ["verify", str(_tar(t, _member("bundle/../../etc/x"), b"x"))],
        "'..' in path",
    ),
    (
        "tar with absolute path",
        lambda t, m, c: ["verify", str(_tar(t, _member("/etc/evil"), b"x"))],
        "absolute path",
    ),
    (
        "tar with symlink",
        lambda t, m, c: [
            "verify",
            str(_tar(t, _member("bundle/link", tarfile.SYMTYPE, "/etc/passwd"))),
        ],
        "link",
    ),
    (
        "tar with device file",
        lambda t, m, c: ["verify", str(_tar(t, _member("bundle/dev", tarfile.CHRTYPE)))],
        "device or special file",
    ),
    (
        "bundle file changed",
        lambda t, m, c: [
            "verify",
            str((lambda b: (b.joinpath("model.onnx").write_bytes(b"x"), b)[1])(_bundle(t))),
        ],
        "model.onnx does not match SHA256SUMS",
    ),
    (
        "manifest of unknown schema",
        lambda t, m, c: [
            "verify",
            # The sums are regenerated: only the schema check can refuse it.
            str(
                (
                    lambda b: (_edit_json(b / "manifest.json", schema_version=7), write_sums(b), b)[
                        2
                    ]
                )(_bundle(t))
            ),
        ],
        "schema version 7 is not supported",
    ),
    ("not a bundle", lambda t, m, c: ["verify", str(t)], "is not a bundle"),
]


@pytest.mark.parametrize(("name", "make", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input(
    name: str,
    make: Callable[[Path, Path, Path], list[str]],
    message: str,
    tiny_bert: Path,
    texts_file: Path,
    tmp_path: Path,
) -> None:
    args = make(tmp_path, _model(tiny_bert, tmp_path), texts_file)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    # Progress lines of the stages that ran may come first; the error itself is the one last line.
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("Error: ") and sum(x.startswith("Error") for x in lines) == 1
    assert "Traceback" not in result.output and "pwned" not in result.output
    dist = tmp_path / "dist"
    assert not dist.exists() or not any(dist.iterdir()), "something was written"


def test_at_least_25_cases() -> None:
    assert len(CASES) >= 25


def test_disk_full_while_writing_leaves_nothing(
    tiny_bert: Path, texts_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import edgepack.bundle.target as bundle

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(bundle, "write_tar", full)
    result = CliRunner().invoke(cli, _build(tmp_path, tiny_bert, texts_file))
    assert result.exit_code == 2, result.output
    assert "No space left on device; nothing was kept" in result.output
    assert not (tmp_path / "dist").exists()  # the build made it, and removed it again


def test_tampered_bundle_is_refused_by_the_harness_and_no_verify_overrides(tmp_path: Path) -> None:
    import subprocess
    import sys

    bundle = _bundle(tmp_path)
    (bundle / "reference" / "inputs.npz").write_bytes(
        (bundle / "reference" / "inputs.npz").read_bytes() + b"\0"
    )
    base = [
        sys.executable,
        str(bundle / "bench.py"),
        "--warmup",
        "0",
        "--runs",
        "2",
        "--skip-check",
    ]
    refused = subprocess.run(base, capture_output=True, text=True)
    assert refused.returncode == 2 and "reference/inputs.npz" in refused.stderr + refused.stdout
    assert subprocess.run([*base, "--no-verify"], capture_output=True).returncode == 0


def test_soak_10000_inferences_do_not_grow_memory(tmp_path: Path) -> None:
    import subprocess
    import sys

    bundle = _bundle(tmp_path)
    peaks = []
    for runs in (500, 10_000):
        out = tmp_path / f"r{runs}.json"
        cmd = [
            sys.executable,
            str(bundle / "bench.py"),
            "--warmup",
            "10",
            "--runs",
            str(runs),
            "--duration",
            "300",
            "--json",
            str(out),
            "--quiet",
        ]
        subprocess.run(cmd, check=True, capture_output=True)
        report = json.loads(out.read_text())
        assert report["runs"] == runs
        peaks.append(report["peak_rss_mb"])
    assert peaks[1] - peaks[0] < 8.0, peaks  # 20x the inferences, no more than a few MB more
