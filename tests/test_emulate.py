"""ARM64 bundles checked on (qemu-user) aarch64: the bundle's own bench.py, aarch64 wheels.

The sysroot lives in the user's cache (``$EDGEPACK_SYSROOT_CACHE`` or
``~/.cache/edgepack/aarch64-sysroot``), not the per-session test cache, so only the first run
builds it (about a minute, ~210 MB, needs the package registries).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from bundle_factory import make_bundle
from conftest import SYSROOT_CACHE

from edgepack.device import emulate
from edgepack.errors import UserError


@pytest.mark.slow
def test_guest_python_is_aarch64_with_onnxruntime(sysroot: Path) -> None:
    code = "import platform, onnxruntime; print(platform.machine(), onnxruntime.__version__)"
    proc = emulate.run_python_emulated(["-c", code], sysroot)
    assert proc.returncode == 0, proc.stderr
    machine, version = proc.stdout.split()
    assert machine == "aarch64"
    assert version == emulate.read_sysroot_info(sysroot)["onnxruntime"]


@pytest.mark.slow
def test_verify_emulated_passes_on_a_good_bundle(sysroot: Path, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, "tiny-arm64")
    check = emulate.verify_emulated(bundle, sysroot)
    assert check["passed"] is True
    assert check["machine"] == "aarch64"
    assert check["min_cosine"] >= check["threshold"]
    assert check["max_abs_diff"] < 1e-4


@pytest.mark.slow
def test_verify_emulated_reports_a_failed_check(sysroot: Path, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, "noisy", reference_noise=5.0)
    check = emulate.verify_emulated(bundle, sysroot)
    assert check["passed"] is False
    assert check["min_cosine"] < check["threshold"]


@pytest.mark.slow
def test_ensure_sysroot_is_cached(sysroot: Path) -> None:
    marker = sysroot / emulate.MARKER
    before = marker.stat().st_mtime_ns
    start = time.perf_counter()
    again = emulate.ensure_sysroot(SYSROOT_CACHE)
    assert again == sysroot
    assert time.perf_counter() - start < 2.0
    assert marker.stat().st_mtime_ns == before
    info = emulate.read_sysroot_info(sysroot)
    assert (sysroot / "usr" / "bin" / f"python{info['python']}").is_file()
    cpuinfo = (sysroot / "proc" / "cpuinfo").read_text()
    assert cpuinfo.startswith("processor\t: 0") and "asimddp" in cpuinfo


def test_missing_qemu_names_the_apt_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(emulate, "find_qemu", lambda: None)
    reason = emulate.emulator_available(tmp_path)
    assert reason is not None and "apt-get install qemu-user-static" in reason
    bundle = make_bundle(tmp_path, "tiny")
    with pytest.raises(UserError, match="qemu-user-static"):
        emulate.verify_emulated(bundle)


def test_missing_apt_tools_are_named_when_no_sysroot_is_cached(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(emulate, "find_qemu", lambda: "/usr/bin/qemu-aarch64-static")
    monkeypatch.setattr(emulate.shutil, "which", lambda tool: None)
    reason = emulate.emulator_available(tmp_path / "empty-cache")
    assert reason is not None and "dpkg-deb" in reason and "apt-get" in reason
    with pytest.raises(UserError, match="dpkg-deb"):
        emulate.ensure_sysroot(tmp_path / "empty-cache")


def test_half_built_sysroot_is_not_taken_as_cached(tmp_path: Path) -> None:
    final = emulate._sysroot_path(tmp_path, "1.0.0")
    (final / "usr" / "bin").mkdir(parents=True)
    assert emulate._cached_sysroot(tmp_path, "1.0.0") is None
    (final / emulate.MARKER).write_text('{"python": "3.11"}')
    assert emulate._cached_sysroot(tmp_path, "1.0.0") == final


def test_bundle_without_bench_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"no bench\.py"):
        emulate.run_harness_emulated(tmp_path, [], sysroot=tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        emulate.verify_emulated(tmp_path / "missing")


@pytest.mark.parametrize(
    ("returncode", "stderr", "error", "match"),
    [
        (
            2,
            "error: model.onnx does not match SHA256SUMS\n",
            UserError,
            "does not match SHA256SUMS",
        ),
        (139, "qemu: uncaught target signal 11 (Segmentation fault)\n", RuntimeError, "exited 139"),
        (None, "", UserError, "took over 5 s"),
    ],
)
def test_harness_failures_are_mapped(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, returncode, stderr, error, match
) -> None:
    def fake_run(args, sysroot=None, timeout=0.0, on_progress=None):
        if returncode is None:
            raise subprocess.TimeoutExpired(args, timeout)
        return subprocess.CompletedProcess(args, returncode, "", stderr)

    monkeypatch.setattr(emulate, "run_python_emulated", fake_run)
    bundle = make_bundle(tmp_path)
    with pytest.raises(error, match=match) as caught:
        emulate.run_harness_emulated(bundle, ["--runs", "1"], sysroot=tmp_path, timeout=5)
    assert "\n" not in str(caught.value)
