from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from edgepack.bundle import Outbox
from edgepack.bundle.write import TMP_PREFIX, clean_stale, save_npz, write_tar
from edgepack.errors import UserError


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_npz_is_byte_stable_and_loads(tmp_path: Path) -> None:
    arrays = {"b": np.arange(6).reshape(2, 3), "a": np.ones(3, np.float32)}
    save_npz(tmp_path / "1.npz", arrays)
    os.utime(tmp_path / "1.npz", (0, 0))
    save_npz(tmp_path / "2.npz", dict(reversed(list(arrays.items()))))
    assert _digest(tmp_path / "1.npz") == _digest(tmp_path / "2.npz")
    loaded = np.load(tmp_path / "1.npz")
    assert sorted(loaded.files) == ["a", "b"] and loaded["b"].tolist() == [[0, 1, 2], [3, 4, 5]]


def test_tar_is_reproducible_with_one_top_folder(tmp_path: Path) -> None:
    folder = tmp_path / "bundle"
    (folder / "reference").mkdir(parents=True)
    (folder / "run.sh").write_text("#!/bin/sh\n")
    (folder / "reference" / "x.npz").write_bytes(b"x")
    (folder / "SHA256SUMS").write_text("")
    write_tar(folder, tmp_path / "1.tar.gz")
    os.utime(folder / "run.sh", (1, 1))
    write_tar(folder, tmp_path / "2.tar.gz")
    assert _digest(tmp_path / "1.tar.gz") == _digest(tmp_path / "2.tar.gz")
    with tarfile.open(tmp_path / "1.tar.gz") as tar:
        members = tar.getmembers()
    assert {m.name.split("/")[0] for m in members} == {"bundle"}
    assert next(m for m in members if m.name == "bundle/run.sh").mode == 0o755


def test_publish_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    out = tmp_path / "dist"
    for attempt, force in ((0, False), (1, False), (1, True)):
        with Outbox(out, force) as box:
            with box.bundle("m-arm64") as tmp:
                (tmp / "m-arm64").mkdir()
                (tmp / "m-arm64" / "f").write_text(str(attempt))
                (tmp / "m-arm64.tar.gz").write_text("tar")
            if attempt == 1 and not force:
                with pytest.raises(UserError, match="already exists; pass --force"):
                    box.publish()
            else:
                box.publish()
    assert (out / "m-arm64" / "f").read_text() == "1"
    assert sorted(p.name for p in out.iterdir()) == ["m-arm64", "m-arm64.tar.gz"]


def test_staging_is_removed_on_failure_and_stale_dirs_are_swept(tmp_path: Path) -> None:
    out = tmp_path / "dist"
    out.mkdir()
    with pytest.raises(RuntimeError), Outbox(out, False) as box, box.bundle("x") as tmp:
        (tmp / "partial").write_text("half")
        raise RuntimeError("killed")
    assert list(out.iterdir()) == []
    dead = out / f"{TMP_PREFIX}999999999-x"
    dead.mkdir()
    assert clean_stale(out) == [dead] and not dead.exists()


def test_unwritable_output_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with (
        pytest.raises(UserError, match="cannot write to output folder"),
        Outbox(blocker / "d", False),
    ):
        pass
