"""A real OpenSSH server on loopback, so run_remote is tested against the real ssh/scp.

Import the fixture into a test module (``from conftest_ssh import ssh_server``). It skips,
saying why, when sshd or ssh-keygen is missing (CI: apt-get install openssh-server
openssh-client). The device's ``python3`` is a shim onto the test interpreter, so the remote side
has numpy and onnxruntime; sshd's ``SetEnv PYTHON=...`` selects it (run.sh and run_remote honour
$PYTHON), because a login shell's rc files may put another python3 first on PATH.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

SSHD = Path("/usr/sbin/sshd")


@dataclass(frozen=True)
class SshServer:
    host: str  # user@127.0.0.1
    port: int
    identity: Path
    wrong_identity: Path  # a key sshd does not accept


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
        check=True,
        capture_output=True,
    )


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited early: {proc.stderr.read() if proc.stderr else ''}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"sshd did not listen on port {port} within {timeout} s")


@pytest.fixture(scope="session")
def ssh_server(tmp_path_factory: pytest.TempPathFactory):
    if not SSHD.exists() or shutil.which("ssh-keygen") is None or shutil.which("ssh") is None:
        pytest.skip("needs OpenSSH: apt-get install openssh-server openssh-client")
    try:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
    except PermissionError:
        pytest.skip("cannot create /run/sshd (sshd's privilege-separation dir) without root")
    root = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "client_key", "wrong_key"):
        _keygen(root / key)
    shim = root / "bin"
    shim.mkdir()
    (shim / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (shim / "python3").chmod(0o755)
    port = _free_port()
    config = root / "sshd_config"
    config.write_text(
        "\n".join(
            [
                "ListenAddress 127.0.0.1",
                f"Port {port}",
                f"HostKey {root / 'host_key'}",
                f"AuthorizedKeysFile {root / 'client_key.pub'}",
                f"PidFile {root / 'sshd.pid'}",
                "PermitRootLogin prohibit-password",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "StrictModes no",
                f"SetEnv PYTHON={shim / 'python3'}",
                "",
            ]
        )
    )
    proc = subprocess.Popen(
        [str(SSHD), "-D", "-e", "-f", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_port(port, proc)
        yield SshServer(
            host=f"{getpass.getuser()}@127.0.0.1",
            port=port,
            identity=root / "client_key",
            wrong_identity=root / "wrong_key",
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, 9)
            proc.wait()
