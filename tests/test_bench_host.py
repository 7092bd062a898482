"""Host-side runs: local bundles and archives, unsafe archives, and ssh against a real sshd."""

from __future__ import annotations

import glob
import io
import json
import socket
import tarfile
from pathlib import Path

import pytest
from bundle_factory import make_bundle, make_tarball
from conftest_ssh import ssh_server  # noqa: F401  (fixture)

from edgepack.device import host as bench_host
from edgepack.errors import UserError

QUICK = ["--runs", "20", "--warmup", "1", "--quiet"]


def test_run_local_on_a_tarball(tmp_path):
    archive = make_tarball(make_bundle(tmp_path / "src"), tmp_path / "dist")
    out = bench_host.run_local(archive, QUICK, tmp_path / "results")
    assert out.parent == (tmp_path / "results").resolve()
    assert out.name.startswith("tiny-cpu-local-") and out.suffix == ".json"
    report = json.loads(out.read_text())
    assert report["check"]["passed"] is True and report["runs"] == 20


def test_run_local_maps_a_harness_usage_error_to_user_error(tmp_path):
    bundle = make_bundle(tmp_path)
    with pytest.raises(UserError, match="NnapiExecutionProvider"):
        bench_host.run_local(bundle, ["--ep", "nnapi"], tmp_path / "results")


def _tar_with(tmp_path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        ok = tarfile.TarInfo("bundle/bench.py")
        ok.size = 1
        tar.addfile(ok, io.BytesIO(b"#"))
        member.size = len(data) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return archive


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        (tarfile.TarInfo("bundle/../x"), "'..'"),
        (tarfile.TarInfo("/etc/evil"), "absolute path"),
        (_link("bundle/link", "/etc/passwd", tarfile.SYMTYPE), "link"),
        (_link("bundle/hard", "bundle/bench.py", tarfile.LNKTYPE), "link"),
        (_link("bundle/dev", "", tarfile.CHRTYPE), "device"),
    ],
)
def test_unsafe_archives_are_refused(tmp_path, member, reason):
    archive = _tar_with(tmp_path, member, b"x")
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(UserError, match=reason) as info:
        bench_host.run_local(archive, QUICK, tmp_path / "results")
    assert member.name in str(info.value)
    with pytest.raises(UserError, match=reason):
        bench_host.extract_bundle(archive, dest)
    assert not (tmp_path / "x").exists() and list(dest.iterdir()) == []


def test_archive_needs_one_top_folder(tmp_path):
    archive = tmp_path / "two.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("a/f", "b/f"):
            tar.addfile(tarfile.TarInfo(name), io.BytesIO(b""))
    with pytest.raises(UserError, match="one top-level folder"):
        bench_host.extract_bundle(archive, tmp_path)


def test_preflight_problems_say_what_to_install():
    assert "install Python 3.8+" in bench_host.preflight_problem("pi", "edgepack-missing:python3")
    msg = bench_host.preflight_problem("pi", "edgepack-missing:onnxruntime")
    assert "pip install onnxruntime numpy" in msg
    assert bench_host.preflight_problem("pi", "/tmp/tmp.abc\n") is None


def test_run_remote_unreachable_host_is_a_user_error(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    bundle = make_bundle(tmp_path)
    with pytest.raises(UserError, match="cannot reach") as info:
        bench_host.run_remote(bundle, "nobody@127.0.0.1", port, None, [], tmp_path / "r")
    assert "\n" not in str(info.value)


def _remote_tmp_dirs() -> set[str]:
    return set(glob.glob("/tmp/tmp.*"))


@pytest.mark.slow  # two full round trips over ssh: ~15 s on a 2-core machine
def test_run_remote_against_a_real_sshd(ssh_server, tmp_path):  # noqa: F811
    bundle = make_bundle(tmp_path / "src")
    before = _remote_tmp_dirs()
    out = bench_host.run_remote(
        bundle, ssh_server.host, ssh_server.port, ssh_server.identity, QUICK, tmp_path / "results"
    )
    report = json.loads(out.read_text())
    assert report["check"]["passed"] is True and report["runs"] == 20
    assert out.name.startswith(f"tiny-cpu-{ssh_server.host}-") and out.suffix == ".json"
    assert _remote_tmp_dirs() - before == set(), "the remote temp folder was not removed"
    archive = make_tarball(bundle, tmp_path / "dist")  # an archive goes over as it is
    again = bench_host.run_remote(
        archive, ssh_server.host, ssh_server.port, ssh_server.identity, QUICK, tmp_path / "r2"
    )
    assert json.loads(again.read_text())["check"]["passed"] is True


def test_run_remote_wrong_key_is_an_auth_error(ssh_server, tmp_path):  # noqa: F811
    bundle = make_bundle(tmp_path)
    with pytest.raises(UserError, match="authentication"):
        bench_host.run_remote(
            bundle, ssh_server.host, ssh_server.port, ssh_server.wrong_identity, [], tmp_path
        )


def test_run_remote_harness_error_comes_back_as_one_line(ssh_server, tmp_path):  # noqa: F811
    bundle = make_bundle(tmp_path)
    with pytest.raises(UserError, match="NnapiExecutionProvider") as info:
        bench_host.run_remote(
            bundle, ssh_server.host, ssh_server.port, ssh_server.identity, ["--ep", "nnapi"],
            tmp_path / "results",
        )  # fmt: skip
    assert "\n" not in str(info.value)
