"""Decoder bundles checked on (qemu-user) aarch64: the bundle's bench.py with ``--check-only``, its
greedy continuations against the build host's, on the aarch64 onnxruntime wheel.

A tiny random Llama in int8 (int4 rounding parts greedy paths on a random model, so its check
would test luck); the emulated run takes ~6 s once the cached sysroot exists.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from decoder_factory import build_tiny_decoder

from edgepack.bundle.manifest import write_sums
from edgepack.cli import cli
from edgepack.device import emulate
from edgepack.errors import UserError


@pytest.fixture(scope="module")
def decoder_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_decoder(tmp_path_factory.mktemp("llm-emulate")).folder


def test_decoder_check_passes_on_emulated_aarch64(sysroot: Path, decoder_bundle: Path) -> None:
    check = emulate.verify_emulated(decoder_bundle, sysroot)
    assert check["passed"] is True, check
    assert check["machine"] == "aarch64"
    assert check["min_agreement"] == 0.9 and check["agreement"] >= 0.9
    assert check["tokens"] > 0 and check["greedy_prefix_tokens"] is None  # forced pass alone
    assert "min_cosine" not in check  # the decoder harness ran, not the encoder one
    result = CliRunner().invoke(cli, ["verify", "--emulate", str(decoder_bundle)])
    assert result.exit_code == 0, result.output
    assert "aarch64 (emulated): check passed, next-token agreement" in result.output
    assert "greedy prefix" not in result.output


def test_an_older_decoder_harness_is_emulated_with_its_greedy_runs(
    decoder_bundle: Path, tmp_path: Path
) -> None:
    """A bundle whose bench.py predates ``--forced-only`` would refuse the flag (exit 2): it is
    run as before."""
    copy = tmp_path / "older"
    shutil.copytree(decoder_bundle, copy)
    bench = copy / "bench.py"
    bench.write_text(bench.read_text().replace('"--forced-only"', '"--forced-only-x"'))
    assert emulate._check_args(decoder_bundle) == ["--check-only", "--forced-only"]
    assert emulate._check_args(copy) == ["--check-only"]


def test_a_changed_reference_fails_the_emulated_check(
    sysroot: Path, decoder_bundle: Path, tmp_path: Path
) -> None:
    """The continuations the device must reproduce, shifted by one token id: next-token
    agreement near 0, and ``verify --emulate`` exits 1 (a failed check, not
    a broken bundle)."""
    copy = tmp_path / "changed"
    shutil.copytree(decoder_bundle, copy)
    ref = json.loads((copy / "reference.json").read_text())
    for item in ref["prompts"]:
        item["continuation"] = [(t + 1) % 50 for t in item["continuation"]]
    (copy / "reference.json").write_text(json.dumps(ref))
    write_sums(copy)  # SHA256SUMS agrees, so only the check itself can tell
    check = emulate.verify_emulated(copy, sysroot)
    assert check["passed"] is False and check["machine"] == "aarch64"
    assert check["agreement"] < 0.2
    result = CliRunner().invoke(cli, ["verify", "--emulate", str(copy)])
    assert result.exit_code == 1, result.output
    assert "check FAILED, next-token agreement" in result.output


def test_a_tampered_decoder_bundle_is_refused_under_emulation(
    sysroot: Path, decoder_bundle: Path, tmp_path: Path
) -> None:
    """Without new sums the guest's bench.py refuses the bundle (exit 2): a UserError, one line."""
    copy = tmp_path / "tampered"
    shutil.copytree(decoder_bundle, copy)
    ref = json.loads((copy / "reference.json").read_text())
    ref["prompts"][0]["continuation"][0] += 1
    (copy / "reference.json").write_text(json.dumps(ref))
    with pytest.raises(UserError, match=r"reference\.json") as caught:
        emulate.verify_emulated(copy, sysroot)
    assert "\n" not in str(caught.value) and "qemu aarch64" in str(caught.value)
