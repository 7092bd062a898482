"""Run a bundle's harness from the host: here, or on a device over the system's ssh.

The device needs only Python 3.8+, numpy and onnxruntime; everything else travels in the bundle.
Remote runs use the user's own OpenSSH so keys, agents and ~/.ssh/config work as usual, but in
BatchMode (never a password prompt that would hang) with a throwaway known_hosts file, so a
benchmark never edits the user's.

Usage:
    run_local(Path("dist/arm64.tar.gz"), ["--runs", "200"], Path("results"))
    run_remote(Path("dist/arm64"), "pi@raspberrypi.local", 22, None, [], Path("results"))
"""

from __future__ import annotations

import contextlib
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from edgepack.bundle import (
    bundle_folder,
    bundle_name,
    check_members,
    extract_bundle,
    is_archive,
    verify_bundle,
)
from edgepack.errors import UserError

SSH_TIMEOUT_S = 15


def _result_path(results_dir: Path, bundle: Path, where: str) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    safe = re.sub(r"[^A-Za-z0-9._@-]", "_", where)
    results_dir.mkdir(parents=True, exist_ok=True)
    return results_dir / f"{bundle_name(bundle)}-{safe}-{stamp}.json"


def _text(raw: bytes) -> str:
    """Decoded ssh output on one line, for a one-line error message."""
    return " ".join(raw.decode("utf-8", "replace").split())


def _harness_failure(stderr: str, where: str) -> UserError:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return UserError(f"bench.py on {where}: {lines[-1] if lines else 'failed without a message'}")


def run_local(bundle: Path, args: list[str], results_dir: Path) -> Path:
    """Run the bundle's bench.py with this Python; return the JSON report's path.

    Exit code 1 from the harness (check failed, p50 regressed) still returns the report: the
    caller reads ``check.passed`` and ``compare.regressed`` from it.
    """
    if not bundle.exists():
        raise UserError(f"bundle {bundle} does not exist")
    out = _result_path(results_dir, bundle, "local").resolve()
    with tempfile.TemporaryDirectory(prefix="edgepack-bench-") as tmp:
        folder = extract_bundle(bundle, Path(tmp)) if is_archive(bundle) else bundle
        if not (folder / "bench.py").is_file():
            raise UserError(f"{bundle} is not a bundle: it has no bench.py")
        if "--no-verify" not in args:  # the same check as `edgepack verify`, before any run
            verify_bundle(folder)
        cmd = [sys.executable, str(folder / "bench.py"), "--json", str(out), *args]
        proc = subprocess.run(cmd, stderr=subprocess.PIPE, text=True, check=False)
    sys.stderr.write(proc.stderr)
    if proc.returncode not in (0, 1) or not out.is_file():
        raise _harness_failure(proc.stderr, "this host")
    return out


def _ensure_tarball(bundle: Path, workdir: Path) -> tuple[Path, str]:
    """The bundle as a vetted .tar.gz and its top folder name; folders are packed on the fly."""
    if is_archive(bundle):
        return bundle, check_members(bundle)  # opens it; a broken archive is a UserError
    if not (bundle / "bench.py").is_file():
        raise UserError(f"{bundle} is not a bundle folder or .tar.gz: it has no bench.py")
    archive = workdir / f"{bundle.name}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(bundle.rglob("*")):
            if path.is_symlink():
                raise UserError(f"{path}: bundles may not contain symlinks")
            tar.add(path, arcname=f"{bundle.name}/{path.relative_to(bundle).as_posix()}",
                    recursive=False)  # fmt: skip
    return archive, bundle.name


class _Ssh:
    """ssh with one set of safe options; turns connection and login failures into UserError."""

    def __init__(self, host: str, port: int, identity: Path | None, workdir: Path):
        if shutil.which("ssh") is None:
            raise UserError("ssh not found: install the OpenSSH client (openssh-client)")
        if identity is not None and not identity.is_file():
            raise UserError(f"--identity {identity} does not exist")
        self.host, self.port = host, port
        self.options = [
            "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=accept-new",
            "-o", f"UserKnownHostsFile={workdir / 'known_hosts'}",
            "-o", f"ConnectTimeout={SSH_TIMEOUT_S}",
            "-o", "LogLevel=ERROR",
        ]  # fmt: skip
        if identity is not None:
            self.options += ["-i", str(identity), "-o", "IdentitiesOnly=yes"]

    def _fail(self, proc: subprocess.CompletedProcess) -> UserError:
        err = " ".join(proc.stderr.decode("utf-8", "replace").split())
        target = f"{self.host} port {self.port}"
        if "Permission denied" in err or "Too many authentication failures" in err:
            return UserError(
                f"ssh authentication to {target} failed: pass --identity KEY or add your public "
                "key to the device's ~/.ssh/authorized_keys (password login is disabled here)"
            )
        return UserError(f"cannot reach {target}: {err or 'ssh failed'}")

    def run(self, script: str, stdin: Path | None = None) -> subprocess.CompletedProcess[bytes]:
        """Run a POSIX sh script on the device; ``stdin`` streams a local file into it.

        Files travel through ssh's own channel, not scp: OpenSSH 9's scp needs an SFTP server,
        which dropbear/BusyBox boards often lack, while `cat`/`tar` are everywhere.
        """
        cmd = ["ssh", "-p", str(self.port), *self.options, self.host, script]
        with open(stdin, "rb") if stdin else contextlib.nullcontext(subprocess.DEVNULL) as src:
            proc = subprocess.run(cmd, stdin=src, capture_output=True, check=False)
        if proc.returncode == 255:
            raise self._fail(proc)
        return proc


# The device's interpreter is $PYTHON when its environment sets one (run.sh honours it too),
# else python3 from PATH.
PREFLIGHT = """
py=${PYTHON:-python3}
command -v "$py" >/dev/null 2>&1 || { echo edgepack-missing:python3; exit 0; }
"$py" -c 'import sys; sys.exit(sys.version_info < (3, 8))' || { echo edgepack-old:python3; exit 0; }
"$py" -c 'import numpy, onnxruntime' >/dev/null 2>&1 || { echo edgepack-missing:onnxruntime; exit 0; }
mktemp -d
"""


def preflight_problem(host: str, output: str) -> str | None:
    """What the device lacks, as a one-line fix, from PREFLIGHT's output; None if nothing."""
    if "edgepack-missing:python3" in output:
        return f"{host} has no python3: install Python 3.8+ on the device (apt-get install python3)"
    if "edgepack-old:python3" in output:
        return f"{host} has a python3 older than 3.8: install Python 3.8+ on the device"
    if "edgepack-missing:onnxruntime" in output:
        return (
            f"{host}: python3 cannot import numpy/onnxruntime: run "
            "'python3 -m pip install onnxruntime numpy' on the device"
        )
    return None


def run_remote(
    bundle: Path,
    host: str,
    port: int,
    identity: Path | None,
    args: list[str],
    results_dir: Path,
) -> Path:
    """Copy the bundle to ``host``, run its run.sh there, fetch the JSON report; return its path.

    The bundle is unpacked in a fresh ``mktemp -d`` folder on the device, which is removed
    afterwards whatever happened.
    """
    if not bundle.exists():
        raise UserError(f"bundle {bundle} does not exist")
    with tempfile.TemporaryDirectory(prefix="edgepack-ssh-") as tmp:
        workdir = Path(tmp)
        if "--no-verify" not in args:  # refuse here what the device would refuse after the copy
            with bundle_folder(bundle) as folder:
                verify_bundle(folder)
        archive, top = _ensure_tarball(bundle, workdir)
        ssh = _Ssh(host, port, identity, workdir)
        pre = ssh.run(PREFLIGHT)
        problem = preflight_problem(host, pre.stdout.decode("utf-8", "replace"))
        if problem:
            raise UserError(problem)
        remote = pre.stdout.decode().strip().splitlines()[-1:] if pre.returncode == 0 else []
        if not remote or not remote[0].startswith("/") or remote[0].strip() == "/":
            raise UserError(f"{host}: 'mktemp -d' failed: {_text(pre.stderr)}")
        rdir = remote[0].strip()
        q = shlex.quote
        try:
            unpack = ssh.run(f"cd {q(rdir)} && tar -xzf -", stdin=archive)
            if unpack.returncode != 0:
                raise UserError(f"{host}: unpacking the bundle failed: {_text(unpack.stderr)}")
            harness = " ".join(q(a) for a in args)
            proc = ssh.run(
                f"sh {q(rdir + '/' + top)}/run.sh --json {q(rdir + '/result.json')} {harness}"
            )
            sys.stdout.write(proc.stdout.decode("utf-8", "replace"))
            sys.stderr.write(proc.stderr.decode("utf-8", "replace"))
            if proc.returncode not in (0, 1):
                raise _harness_failure(proc.stderr.decode("utf-8", "replace"), host)
            fetched = ssh.run(f"cat {q(rdir + '/result.json')}")
            if fetched.returncode != 0:
                raise UserError(f"{host}: the harness wrote no report: {_text(fetched.stderr)}")
            out = _result_path(results_dir, bundle, host)
            out.write_bytes(fetched.stdout)
        finally:
            # If the device went away, the original error matters more than the cleanup's.
            with contextlib.suppress(UserError):
                ssh.run(f"rm -rf {q(rdir)}")
    return out
