"""Run a bundle's on-device harness under qemu-user aarch64, so an x86 host can prove ARM64 bundles.

The bundle's own ``bench.py`` runs on an aarch64 Python with the aarch64 onnxruntime and numpy
wheels, so the check exercises the very kernels a Raspberry Pi or Graviton would. Emulated
timings mean nothing; only the accuracy check is worth reading.

The aarch64 userland is a "sysroot" folder built without chroot or root: apt downloads Debian's
arm64 Python and its libraries from the host's configured sources (a private apt state, so the
host's package lists are untouched), ``dpkg-deb -x`` unpacks them, and the host's pip installs the
aarch64 wheels into it. It is cached, keyed by the onnxruntime version, so only the first run
pays (about a minute and ~210 MB).

Two quirks of Debian's qemu-user-static 7.2 are handled here:
- the guest reads the host's x86 ``/proc/cpuinfo`` and onnxruntime's cpuinfo library segfaults
  on it; ``-L sysroot`` redirects any absolute path that exists in the sysroot, so a fake aarch64
  ``proc/cpuinfo`` there is what the guest sees;
- nothing is registered with binfmt, so the guest Python is started through qemu explicitly.

Usage: when ``emulator_available()`` is None, ``verify_emulated(bundle)`` is the bundle's check.

A decoder bundle's bench.py runs with ``--check-only``: its greedy continuations against the
build host's, no timing. With ``on_progress`` the harness reports each step (stream.py).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from edgepack.cache import cache_root
from edgepack.device.stream import OnProgress, run_streaming, supports_flag
from edgepack.errors import UserError
from edgepack.jsontext import parse_json

QEMU_NAMES = ("qemu-aarch64-static", "qemu-aarch64")
QEMU_PACKAGE = "qemu-user-static"
# Bump when the sysroot's layout or contents change, so old caches are not reused.
# 2: HF tokenizers added, for the bundles' edgepack_runtime.py.
LAYOUT_VERSION = "2"
# Debian bookworm's glibc is 2.36, so every manylinux tag up to 2_28 (onnxruntime's) fits.
PIP_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64")
# Packages the apt dependency closure names that a Python interpreter never loads (package
# tooling, perl via mime-support); skipping them halves the download.
SKIP_PACKAGES = ("dpkg", "tar", "install-info", "perl*", "libperl*", "mailcap", "mime-support")
SITE = "opt/edgepack/site-packages"
MARKER = "edgepack-sysroot.json"
# A Cortex-A76-like core with the dot-product extension; the count matters little (onnxruntime
# copes with fewer entries than CPUs), but one entry per host CPU keeps thread clamping honest.
CPUINFO_ENTRY = (
    "processor\t: {n}\nBogoMIPS\t: 50.00\n"
    "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid "
    "asimdrdm lrcpc dcpop asimddp\n"
    "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0b\n"
    "CPU revision\t: 1\n\n"
)
# Emulation is ~50x slower than native: the real MiniLM fp32 bundle's check (8 x 128 tokens)
# takes ~5 CPU-minutes under qemu, so the limit only catches hangs.
RUN_TIMEOUT_S = 3600


def find_qemu() -> str | None:
    """The qemu-user aarch64 binary on PATH, static build first (it needs no host libraries)."""
    for name in QEMU_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def emulator_available(cache: Path | None = None) -> str | None:
    """None when bundles can run emulated here; otherwise the reason, naming what to install."""
    if find_qemu() is None:
        return (
            f"qemu-aarch64-static is not on PATH; install it with `apt-get install {QEMU_PACKAGE}`"
        )
    try:
        cached = _cached_sysroot(cache)
    except UserError as exc:
        return str(exc)
    if cached is None:
        missing = [tool for tool in ("apt-get", "apt-cache", "dpkg-deb") if not shutil.which(tool)]
        if missing:
            return (
                f"building the aarch64 sysroot needs {', '.join(missing)} "
                "(a Debian host with its package sources configured)"
            )
    return None


def _host_version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        raise UserError(f"{dist} is not installed on the host; `pip install {dist}`.") from None


def default_sysroot_cache() -> Path:
    """``$EDGEPACK_SYSROOT_CACHE``, else ``aarch64-sysroot`` in the edgepack cache.

    The sysroot is a tool install, not a build artifact, so it may live apart from a per-run
    ``$EDGEPACK_CACHE`` (the tests point it at the user's cache so only the first run pays).
    """
    override = os.environ.get("EDGEPACK_SYSROOT_CACHE")
    return Path(override) if override else cache_root() / "aarch64-sysroot"


def _sysroot_path(cache: Path | None, onnxruntime_version: str | None) -> Path:
    ort = onnxruntime_version or _host_version("onnxruntime")
    base = cache if cache is not None else default_sysroot_cache()
    return base / f"debian-arm64-ort{ort}-v{LAYOUT_VERSION}"


def _cached_sysroot(cache: Path | None, onnxruntime_version: str | None = None) -> Path | None:
    path = _sysroot_path(cache, onnxruntime_version)
    return path if (path / MARKER).is_file() else None


def read_sysroot_info(sysroot: Path) -> dict[str, Any]:
    """What a finished sysroot holds: python, onnxruntime, numpy and tokenizers versions, packages."""
    try:
        return json.loads((sysroot / MARKER).read_text())
    except (OSError, ValueError):
        raise UserError(
            f"{sysroot} is not a finished aarch64 sysroot; delete it and run again."
        ) from None


def ensure_sysroot(
    cache: Path | None = None,
    *,
    onnxruntime_version: str | None = None,
    note: Callable[[str], None] | None = None,
) -> Path:
    """The cached aarch64 sysroot, built on first use in a temp dir and renamed into place.

    ``onnxruntime_version`` defaults to the host's, so the emulated check runs the same release
    the build validated with. ``note`` receives one-line progress messages (the first build
    downloads ~13 MB of .debs and ~40 MB of wheels).
    """
    final = _sysroot_path(cache, onnxruntime_version)
    if (final / MARKER).is_file():
        return final
    reason = emulator_available(cache)
    if reason:
        raise UserError(f"cannot emulate aarch64: {reason}.")
    qemu = str(find_qemu())
    ort = onnxruntime_version or _host_version("onnxruntime")
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    say = note or (lambda _msg: None)
    try:
        root = work / "root"
        say(f"building the aarch64 sysroot in {final} (first run only)")
        python, packages = _install_debian_python(work / "apt", work / "debs", root)
        say(f"installing aarch64 wheels: onnxruntime=={ort}, numpy, tokenizers")
        _install_wheels(root / SITE, python, ort)
        _write_cpuinfo(root)
        info = {
            "python": python,
            "onnxruntime": _wheel_version(root / SITE, "onnxruntime"),
            "numpy": _wheel_version(root / SITE, "numpy"),
            "tokenizers": _wheel_version(root / SITE, "tokenizers"),
            "debian_packages": packages,
            "layout_version": LAYOUT_VERSION,
        }
        (root / MARKER).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        _smoke_test(qemu, root, python)
        if final.exists() and not (final / MARKER).is_file():
            shutil.rmtree(final)  # a half-made folder from an older edgepack or a manual copy
        try:
            root.rename(final)
        except OSError:
            if not (final / MARKER).is_file():  # not a concurrent builder that won the race
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def _apt_options(state: Path) -> list[str]:
    """Private arm64 apt state over the host's configured sources; -o beats apt.conf.d."""
    settings = {
        "APT::Architecture": "arm64",
        "APT::Architectures": "arm64",
        "Dir::State": str(state),
        "Dir::State::Lists": str(state / "lists"),
        "Dir::State::status": str(state / "status"),
        "Dir::Cache": str(state / "cache"),
        "Dir::Cache::pkgcache": "",
        "Dir::Cache::srcpkgcache": "",
        "APT::Sandbox::User": "root",  # the private dirs are not readable by _apt
    }
    return [arg for key, value in settings.items() for arg in ("-o", f"{key}={value}")]


def _run_tool(cmd: list[str], what: str, cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UserError(f"{what} failed: {exc}") from None
    if proc.returncode != 0:
        raise UserError(f"{what} failed: {_last_line(proc.stderr or proc.stdout)}")
    return proc.stdout


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("E:", "ERROR:", "error:"))]
    return (errors or lines or ["(no output)"])[-1]


def _install_debian_python(state: Path, debs: Path, root: Path) -> tuple[str, list[str]]:
    """Unpack Debian's arm64 python3.X and its libraries into ``root``; returns (X.Y, pkgs)."""
    for sub in ("lists/partial", "cache/archives/partial"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    (state / "status").touch()
    opts = _apt_options(state)
    _run_tool(["apt-get", *opts, "-q", "update"], "apt-get update (arm64 package lists)")
    shown = _run_tool(["apt-cache", *opts, "depends", "python3-minimal"], "apt-cache depends")
    found = re.search(r"python(3\.\d+)-minimal", shown)
    if not found:
        raise UserError("the configured Debian sources have no arm64 python3-minimal package.")
    python = found.group(1)
    roots = [f"python{python}-minimal", f"libpython{python}-stdlib", "libstdc++6", "zlib1g"]
    closure = _run_tool(
        ["apt-cache", *opts, "depends", "--recurse", "--no-recommends", "--no-suggests",
         "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances", *roots],
        "apt-cache depends --recurse",
    )  # fmt: skip
    names = {line for line in closure.splitlines() if line and not line[0].isspace()}
    packages = sorted(
        name
        for name in names
        if not name.startswith("<") and not any(fnmatch.fnmatch(name, p) for p in SKIP_PACKAGES)
    )
    debs.mkdir(parents=True)
    _run_tool(["apt-get", *opts, "-q", "download", *packages], "apt-get download (arm64)", debs)
    root.mkdir(parents=True)
    for deb in sorted(debs.glob("*.deb")):
        _run_tool(["dpkg-deb", "-x", str(deb), str(root)], f"dpkg-deb -x {deb.name}")
    if not (root / "usr" / "bin" / f"python{python}").is_file():
        raise UserError(f"the arm64 python{python}-minimal package did not unpack a python binary.")
    return python, packages


def _install_wheels(site: Path, python: str, onnxruntime_version: str) -> None:
    """The host's pip, with its configured index, fetches the aarch64 wheels into ``site``.

    tokenizers is the host's release (bundles' edgepack_runtime.py tokenizes with it), so an
    emulated check compares the same tokenizer code compiled for aarch64.
    """
    platforms = [arg for tag in PIP_PLATFORMS for arg in ("--platform", tag)]
    _run_tool(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--target", str(site), *platforms, "--only-binary=:all:", "--python-version", python,
         "--implementation", "cp", f"onnxruntime=={onnxruntime_version}", "numpy",
         f"tokenizers=={_host_version('tokenizers')}"],
        "pip install (aarch64 wheels)",
    )  # fmt: skip


def _wheel_version(site: Path, dist: str) -> str:
    found = sorted(site.glob(f"{dist}-*.dist-info"))
    return found[0].name[len(dist) + 1 : -len(".dist-info")] if found else "unknown"


def _write_cpuinfo(root: Path) -> None:
    (root / "proc").mkdir(exist_ok=True)
    text = "".join(CPUINFO_ENTRY.format(n=n) for n in range(os.cpu_count() or 1))
    (root / "proc" / "cpuinfo").write_text(text)


def _guest_env(sysroot: Path) -> dict[str, str]:
    """The host environment minus anything that would steer the guest Python or qemu."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "QEMU_"))}
    env["PYTHONPATH"] = str(sysroot / SITE)
    env["PYTHONNOUSERSITE"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # the cached sysroot stays as built
    return env


def _guest_command(qemu: str, sysroot: Path, python: str, args: list[str]) -> list[str]:
    return [qemu, "-L", str(sysroot), str(sysroot / "usr" / "bin" / f"python{python}"), *args]


def _smoke_test(qemu: str, root: Path, python: str) -> None:
    code = (
        "import platform, onnxruntime, tokenizers; "
        "print(platform.machine(), onnxruntime.__version__)"
    )
    proc = run_streaming(
        _guest_command(qemu, root, python, ["-c", code]), _guest_env(root), RUN_TIMEOUT_S, None
    )
    if proc.returncode != 0 or not proc.stdout.startswith("aarch64 "):
        raise RuntimeError(
            f"the new aarch64 sysroot cannot import onnxruntime and tokenizers (exit {proc.returncode}): "
            f"{_last_line(proc.stderr + proc.stdout)}"
        )


def run_python_emulated(
    args: list[str],
    sysroot: Path | None = None,
    timeout: float = RUN_TIMEOUT_S,
    on_progress: OnProgress | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the sysroot's aarch64 Python with ``args`` under qemu; output captured as text, and
    its ``progress k/N`` stderr lines passed to ``on_progress`` as they come."""
    qemu = find_qemu()
    if qemu is None:
        raise UserError(f"cannot emulate aarch64: {emulator_available()}.")
    sysroot = sysroot or ensure_sysroot()
    python = str(read_sysroot_info(sysroot)["python"])
    command = _guest_command(qemu, sysroot, python, args)
    return run_streaming(command, _guest_env(sysroot), timeout, on_progress)


def run_harness_emulated(
    bundle: Path,
    args: list[str],
    sysroot: Path | None = None,
    timeout: float = RUN_TIMEOUT_S,
    on_progress: OnProgress | None = None,
) -> dict[str, Any]:
    """Run ``bundle/bench.py args`` on emulated aarch64; returns its JSON report.

    Exit 1 (check failed or p50 regressed) still returns the report, so the caller reads
    ``check.passed``; exit 2 (tampered bundle, bad flag) is a UserError with bench.py's line.
    With ``on_progress``, a harness that takes ``--progress`` reports each step to it.
    """
    bench = bundle / "bench.py"
    if not bench.is_file():
        raise UserError(f"{bundle} has no bench.py; is it an edgepack bundle folder?")
    if on_progress is not None and supports_flag(bench, "--progress"):
        args = [*args, "--progress"]
    with tempfile.TemporaryDirectory(prefix="edgepack-emulate-") as tmp:
        report = Path(tmp) / "report.json"
        if "--json" in args:
            report = Path(args[args.index("--json") + 1])
        else:
            args = [*args, "--json", str(report)]
        try:
            proc = run_python_emulated([str(bench.resolve()), *args], sysroot, timeout, on_progress)
        except subprocess.TimeoutExpired:
            raise UserError(
                f"bench.py under qemu aarch64 took over {timeout:.0f} s; try fewer --runs."
            ) from None
        if proc.returncode == 2:
            raise UserError(f"bench.py under qemu aarch64: {_last_line(proc.stderr)}")
        if proc.returncode not in (0, 1) or not report.is_file():
            raise RuntimeError(
                f"bench.py under qemu aarch64 exited {proc.returncode} without a report: "
                f"{_last_line(proc.stderr + proc.stdout)}"
            )
        return json.loads(report.read_text())


def _check_args(bundle: Path) -> list[str]:
    """bench.py's flags for its accuracy check alone (the two harnesses take different ones). An
    unreadable manifest gets the encoder's: bench.py's own integrity check then refuses the
    bundle with its one line (exit 2), which is the message worth showing."""
    try:
        text = (bundle / "manifest.json").read_text(encoding="utf-8")
        family = parse_json(text, "manifest.json").get("family")
    except (OSError, ValueError, AttributeError, UserError):
        family = None
    if family != "decoder":
        return ["--warmup", "0", "--runs", "1"]
    # The forced agreement is the gate; the free greedy runs are 3/4 of the emulated time.
    forced = supports_flag(bundle / "bench.py", "--forced-only")
    return ["--check-only", "--forced-only"] if forced else ["--check-only"]


def verify_emulated(
    bundle: Path,
    sysroot: Path | None = None,
    timeout: float = RUN_TIMEOUT_S,
    on_progress: OnProgress | None = None,
) -> dict[str, Any]:
    """The bundle's accuracy check alone on emulated aarch64: bench.py's ``check`` (an encoder's
    passed, max_abs_diff, min_cosine, threshold, skipped; a decoder's passed, agreement,
    min_agreement, tokens, greedy_prefix_tokens - None, as emulation skips the greedy runs) plus
    ``machine``, the guest's ``platform.machine()`` ("aarch64"), so callers can show what ran."""
    if not bundle.is_dir():
        raise UserError(f"bundle folder {bundle} does not exist.")
    report = run_harness_emulated(bundle, _check_args(bundle), sysroot, timeout, on_progress)
    check = dict(report["check"])
    check["machine"] = report.get("env", {}).get("machine")
    return check
