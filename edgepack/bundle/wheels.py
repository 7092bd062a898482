"""Wheels for ``--with-runtime``: onnxruntime, numpy and tokenizers for the device, so a bundle
installs offline (tokenizers is what the bundle's edgepack_runtime.py tokenizes with).

A board on a closed network gets the bundle, then ``pip install --no-index --find-links wheels
-r requirements.txt``. The host's pip downloads the wheels for the device's platform tags and
Python version, both read from the target profile's ``[device]`` section (``pip_platforms``,
``python_version``), through pip's own configured index: no index URL is ever passed, so a
mirror or proxy set in pip.conf or ``PIP_INDEX_URL`` is honoured.

Usage::

    from edgepack.bundle.wheels import download_runtime
    names = download_runtime(profile.section("device"), bundle / "wheels", "1.32.0")
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from edgepack.errors import UserError

PIP_TIMEOUT_S = 1800
# tokenizers' last release for Python 3.8 (later wheels are cp39-abi3); it read a bundle's
# tokenizer.json and gave transformers' ids on all 827 sample texts.
TOKENIZERS_PY38 = "0.20.3"
# pip's retry warnings when it cannot reach its index; the final ERROR line alone ("No matching
# distribution") would wrongly suggest the version or platform is bad.
UNREACHABLE = re.compile(
    r"NewConnectionError|ConnectTimeoutError|Max retries exceeded|Temporary failure in name "
    r"resolution|Network is unreachable|ProxyError|Connection refused",
)


def host_tokenizers() -> str:
    """The build host's tokenizers version: the device gets the release its ids were checked with."""
    from importlib import metadata

    return metadata.version("tokenizers")


def pip_download_command(
    platforms: list[str],
    python_version: str,
    dest: Path,
    onnxruntime_version: str,
    tokenizers_version: str | None = None,
) -> list[str]:
    """The exact pip command, kept separate so it can be shown and checked without running it."""
    platform_args = [arg for tag in platforms for arg in ("--platform", tag)]
    if tokenizers_version is None:
        old_python = tuple(int(p) for p in python_version.split(".")[:2]) < (3, 9)
        tokenizers_version = TOKENIZERS_PY38 if old_python else host_tokenizers()
    tokenizers = f"tokenizers=={tokenizers_version}"
    return [
        sys.executable, "-m", "pip", "download", "--disable-pip-version-check",
        "--progress-bar", "off", "--only-binary=:all:", *platform_args,
        "--python-version", python_version, "--implementation", "cp",
        "-d", str(dest), f"onnxruntime=={onnxruntime_version}", "numpy", tokenizers,
    ]  # fmt: skip


def _check_device(device: dict[str, Any]) -> tuple[list[str], str]:
    platforms = device.get("pip_platforms")
    if not platforms:
        raise UserError(
            f"--with-runtime needs pip wheels, but the target's device (os "
            f"{device.get('os', '?')!r}) lists no pip_platforms; its runtime comes from its own "
            "package manager (see the profile's [runtime] section), so build without --with-runtime."
        )
    if not isinstance(platforms, list) or not all(isinstance(p, str) for p in platforms):
        raise UserError(
            f"device.pip_platforms must be a list of pip platform tags, got {platforms!r}."
        )
    python_version = device.get("python_version")
    if not isinstance(python_version, str) or not re.fullmatch(r"3\.\d+", python_version):
        raise UserError(
            f'--with-runtime needs device.python_version as "3.X" in the target profile, '
            f"got {python_version!r}."
        )
    return platforms, python_version


def _pip_error(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    last = (errors or lines or ["(no output)"])[-1]
    if UNREACHABLE.search(output):
        return f"pip could not reach its package index ({last})"
    return last


def download_runtime(
    profile_device: dict[str, Any], dest: Path, onnxruntime_version: str
) -> list[str]:
    """Download onnxruntime==V, numpy, the host's tokenizers and their dependencies as wheels.

    Returns the sorted file names of the wheels now in ``dest`` (pip skips ones already there).
    Raises UserError when the profile has no pip platforms (phones: their runtime is an app
    library) or pip fails, with pip's last error line.
    """
    platforms, python_version = _check_device(profile_device)
    dest.mkdir(parents=True, exist_ok=True)
    cmd = pip_download_command(platforms, python_version, dest, onnxruntime_version)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise UserError(
            f"pip download of the runtime wheels took over {PIP_TIMEOUT_S} s."
        ) from None
    if proc.returncode != 0:
        raise UserError(
            f"pip could not download onnxruntime=={onnxruntime_version} for "
            f"{', '.join(platforms)} / Python {python_version}: {_pip_error(proc.stderr + proc.stdout)}"
        )
    return sorted(path.name for path in dest.glob("*.whl"))
