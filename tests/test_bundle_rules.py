"""One rule set: `edgepack verify` on the host and the harness on the device judge every bundle
alike, and the device side never hangs on what SHA256SUMS names.

Every case changes a real bundle_factory bundle (a real tokenizer.json, reference texts, an
onnxruntime model), then runs the host's `edgepack verify` and the bundle's own bench.py, each
as a subprocess under a timeout that only a hang reaches.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from bundle_factory import make_bundle, write_sums

EDGEPACK = Path(sys.executable).with_name("edgepack")
QUICK = ("--runs", "1", "--warmup", "0", "--quiet", "--skip-check")
HANG = 30  # seconds; every case takes about one, so only a hang reaches it


def run_host(bundle: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(EDGEPACK), "verify", str(bundle)], capture_output=True, text=True,
                          timeout=HANG, check=False)  # fmt: skip


def run_device(bundle: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-I", str(bundle / "bench.py"), *QUICK, *extra],
                          capture_output=True, text=True, timeout=HANG, env=env, check=False)  # fmt: skip


def run_sh(bundle: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["sh", str(bundle / "run.sh"), *QUICK], capture_output=True, text=True,
                          env=env, timeout=HANG, check=False)  # fmt: skip


def edit_json(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def resummed(action: Callable[[Path], None]) -> Callable[[Path], None]:
    """The change, then SHA256SUMS written again: the sums alone agree with the bundle."""

    def run(bundle: Path) -> None:
        action(bundle)
        write_sums(bundle)

    return run


def append_sums_line(name: str) -> Callable[[Path], None]:
    def run(bundle: Path) -> None:
        with open(bundle / "SHA256SUMS", "a", encoding="utf-8", newline="") as handle:
            handle.write("0" * 64 + "  " + name + "\n")

    return run


def sums_line_ending(ending: str) -> Callable[[Path], None]:
    """A line of SHA256SUMS ends in ``ending`` before its newline (or is split by it)."""

    def run(bundle: Path) -> None:
        path = bundle / "SHA256SUMS"
        lines = path.read_text(encoding="utf-8").splitlines()
        lines[0] += ending
        path.write_text("\n".join(lines) + "\n", encoding="utf-8", newline="")

    return run


def swap_tokens(bundle: Path) -> None:
    """A valid tokenizer.json whose vocabulary maps two words the other way round."""
    path = bundle / "tokenizer" / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    vocab["cat"], vocab["dog"] = vocab["dog"], vocab["cat"]
    path.write_text(json.dumps(data))


def fifo(bundle: Path) -> None:
    os.mkfifo(bundle / "reference" / "pipe")
    append_sums_line("reference/pipe")(bundle)


def symlinked_tokenizer(bundle: Path) -> None:
    shutil.move(bundle / "tokenizer", bundle.parent / "shared-tokenizer")
    (bundle / "tokenizer").symlink_to(bundle.parent / "shared-tokenizer", target_is_directory=True)


def deep_manifest(bundle: Path) -> None:
    text = (bundle / "manifest.json").read_text().rstrip()
    (bundle / "manifest.json").write_text(text[:-1] + ', "deep": ' + "[" * 5000 + "]" * 5000 + "}")


def remove(name: str) -> Callable[[Path], None]:
    return resummed(lambda bundle: (bundle / name).unlink())


def set_model(field: str, value: object) -> Callable[[Path], None]:
    return resummed(lambda b: edit_json(b / "manifest.json", lambda m: m["model"].update({field: value})))  # fmt: skip


def set_manifest(key: str, value: object) -> Callable[[Path], None]:
    return resummed(lambda b: edit_json(b / "manifest.json", lambda m: m.update({key: value})))


def flip_model(bundle: Path) -> None:
    data = bytearray((bundle / "model.onnx").read_bytes())
    data[-5] ^= 0x01
    (bundle / "model.onnx").write_bytes(bytes(data))


def retokenize_reference(bundle: Path) -> None:
    def change(data: dict) -> None:
        data["texts"][0]["ids"][1] += 1

    edit_json(bundle / "reference" / "texts.json", change)


def truncated_tokenizer(bundle: Path) -> None:
    path = bundle / "tokenizer" / "tokenizer.json"
    path.write_text(path.read_text()[:200])


def tokenizer_pads_to_64(bundle: Path) -> None:
    """The file's own padding: the runtime drops it, so the ids it gives are still the build's."""
    edit_json(bundle / "tokenizer" / "tokenizer.json", lambda t: t["padding"].update(
        {"strategy": {"Fixed": 64}}))  # fmt: skip


def texts_gone(bundle: Path) -> None:
    lines = (bundle / "SHA256SUMS").read_text().splitlines()
    kept = "".join(f"{line}\n" for line in lines if "texts.json" not in line)
    (bundle / "SHA256SUMS").write_text(kept)
    (bundle / "reference" / "texts.json").unlink()


# name -> (change, refused?). The first part is the suite's older tamper cases (tests/
# test_manifest.py, test_harness_integrity.py); the rest is what the host used to accept.
CASES: dict[str, tuple[Callable[[Path], None], bool]] = {
    "as built": (lambda bundle: None, False),
    "older bundle without reference texts": (
        resummed(lambda b: edit_json(b / "manifest.json", lambda m: m["reference"].pop("texts"))),
        False,
    ),
    "tokenizer.json with its own fixed padding": (resummed(tokenizer_pads_to_64), False),
    "model changed, sums regenerated": (resummed(flip_model), True),
    "model changed": (flip_model, True),
    "tokenizer removed": (resummed(lambda b: shutil.rmtree(b / "tokenizer")), True),
    "manifest names a file outside": (set_model("file", "../outside.onnx"), True),
    "manifest names an absolute path": (set_model("file", "/etc/passwd"), True),
    "model is a symlink": (
        lambda b: (
            (b / "model.onnx").rename(b.parent / "m.onnx"),
            (b / "model.onnx").symlink_to(b.parent / "m.onnx"),
        ),
        True,
    ),
    "tokenizer folder is a symlink": (symlinked_tokenizer, True),
    "file added": (lambda b: (b / "extra.txt").write_text("x\n"), True),
    "reference missing from sums and disk": (
        resummed(lambda b: (b / "reference" / "outputs_fp32.npz").unlink()),
        True,
    ),
    "model format ort": (
        resummed(
            lambda b: edit_json(
                b / "manifest.json", lambda m: m["target"].update({"format": {"model": "ort"}})
            )
        ),
        True,
    ),
    "schema version 7": (set_manifest("schema_version", 7), True),
    # New: what the host accepted and the device refused, or neither checked.
    "schema version true": (set_manifest("schema_version", True), True),
    "model.bytes as a float": (
        lambda b: set_model("bytes", float((b / "model.onnx").stat().st_size))(b),
        True,
    ),
    "bundle_check.py removed": (remove("bundle_check.py"), True),
    "run.sh removed": (remove("run.sh"), True),
    "sums line ends in \\r": (sums_line_ending("\r"), True),
    "sums line holds \\u2028": (sums_line_ending("\u2028x"), True),
    "sums line holds \\x85": (sums_line_ending("\x85x"), True),
    "sums name with a backslash": (append_sums_line("tokenizer\\tokenizer.json"), True),
    "sums names /dev/zero": (append_sums_line("/dev/zero"), True),
    "FIFO in the bundle": (fifo, True),
    "manifest nested 5000 deep": (resummed(deep_manifest), True),
    "reference texts nested 5000 deep": (
        resummed(lambda b: (b / "reference" / "texts.json").write_text("[" * 5000 + "]" * 5000)),
        True,
    ),
    "tokenizer.json corrupt": (resummed(truncated_tokenizer), True),
    "tokenizer.json maps two words the other way": (resummed(swap_tokens), True),
    "reference ids edited": (resummed(retokenize_reference), True),
    "reference texts neither in sums nor on disk": (texts_gone, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_host_verify_and_device_check_agree(tmp_path: Path, case: str) -> None:
    change, tampered = CASES[case]
    bundle = make_bundle(tmp_path)
    change(bundle)
    host, device = run_host(bundle), run_device(bundle)
    assert (host.returncode == 0) == (device.returncode == 0), (host.stdout, device.stderr)
    if not tampered:
        assert host.returncode == 0 and device.returncode == 0, (host.stdout, device.stderr)
        return
    assert host.returncode == 2 and device.returncode == 2, (host.stdout, device.stderr)
    assert device.stderr.count("\n") == 1 and device.stderr.startswith("error: ")
    # One function decides: the host says what the device says.
    said = device.stderr.strip()[len("error: ") :]
    assert said in host.stdout + host.stderr, (said, host.stdout + host.stderr)
    assert "Traceback" not in host.stdout + host.stderr + device.stderr


def test_the_host_names_bundles_the_device_would_not_run() -> None:
    assert sum(refused for _, refused in CASES.values()) >= 25


@pytest.mark.parametrize("case", ["sums names /dev/zero", "FIFO in the bundle"])
def test_run_sh_refuses_special_files_before_hashing(tmp_path: Path, case: str) -> None:
    bundle = make_bundle(tmp_path)
    CASES[case][0](bundle)
    proc = run_sh(bundle)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    named = "/dev/zero" if "zero" in case else "reference/pipe"
    assert named in proc.stderr and (
        "not a path inside" in proc.stderr or "not a regular" in proc.stderr
    )


def test_run_sh_refuses_a_link_on_the_way_to_a_listed_file(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path)
    (bundle / "reference" / "dev").symlink_to("/dev")
    append_sums_line("reference/dev/zero")(bundle)
    proc = run_sh(bundle)
    assert proc.returncode == 2 and "reference/dev is a symbolic link" in proc.stderr, proc.stderr


def test_bundle_check_never_opens_a_special_file(tmp_path: Path) -> None:
    """bundle_check.py alone (what run.sh's python side runs): lstat before open."""
    bundle = make_bundle(tmp_path)
    fifo(bundle)
    proc = subprocess.run([sys.executable, "-I", str(bundle / "bundle_check.py"), str(bundle)],
                          capture_output=True, text=True, timeout=HANG, check=False)  # fmt: skip
    assert proc.returncode == 2 and "reference/pipe is not a regular file" in proc.stderr


def test_without_tokenizers_the_device_says_the_tokenizer_was_not_checked(tmp_path: Path) -> None:
    """A tokenizers package that fails to import first on the path stands in for a device
    without it: the run goes on (bench.py never tokenizes) with one warning line."""
    bundle = make_bundle(tmp_path / "b")
    shadow = tmp_path / "shadow" / "tokenizers"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('no tokenizers on this device')\n")
    env = dict(os.environ, PYTHONPATH=str(shadow.parent))
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(bundle / "bench.py"), *QUICK, "--json", str(out)],
                          capture_output=True, text=True, timeout=HANG, env=env, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("warning: ")
    assert "tokenizer/tokenizer.json was NOT checked" in proc.stderr
    assert "pip install -r requirements.txt" in proc.stderr
    assert "NOT checked" in json.loads(out.read_text())["verify_notes"][0]


def test_an_older_bundle_says_its_tokenizer_was_not_checked(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, texts=False)
    device = run_device(bundle)
    assert device.returncode == 0
    assert "no reference texts" in device.stderr and "tokenizer not checked" in device.stderr
    host = run_host(bundle)
    assert host.returncode == 0 and "note: no reference texts" in host.stdout
    checked = run_host(make_bundle(tmp_path / "new"))
    assert "tokenizer gives the build's ids" in checked.stdout and "note:" not in checked.stdout
