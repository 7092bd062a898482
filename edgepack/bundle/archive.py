"""A bundle as users hand it over: a folder, or the .tar.gz that travels to devices.

Archives are opened as untrusted input: only plain files and folders under one top folder are
extracted, so a crafted archive cannot write outside the temporary folder it is unpacked into.
"""

from __future__ import annotations

import contextlib
import re
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from edgepack.errors import UserError

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.endswith(ARCHIVE_SUFFIXES)


def check_members(archive: Path, tar: tarfile.TarFile) -> str:
    """Refuse anything but plain files and folders under one top folder; return that folder."""
    tops = set()
    for member in tar.getmembers():
        name = member.name
        parts = PurePosixPath(name).parts
        problem = None
        if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
            problem = "absolute path"
        elif ".." in parts:
            problem = "'..' in path"
        elif member.issym() or member.islnk():
            problem = "link"
        elif not (member.isfile() or member.isdir()):
            problem = "device or special file"
        if problem:
            raise UserError(f"{archive}: refusing unsafe member {name!r} ({problem})")
        if parts and parts[0] != ".":
            tops.add(parts[0])
    if len(tops) != 1:
        raise UserError(
            f"{archive}: a bundle archive holds one top-level folder, found {sorted(tops) or 'none'}"
        )
    return tops.pop()


def extract_bundle(archive: Path, dest: Path) -> Path:
    """Extract a bundle archive safely into ``dest``; return the bundle folder."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            top = check_members(archive, tar)
            if hasattr(tarfile, "data_filter"):  # 3.12+, backported to 3.10.12/3.11.4
                tar.extractall(dest, filter="data")
            else:  # members were vetted above
                tar.extractall(dest)
    except tarfile.TarError as exc:
        raise UserError(f"{archive}: not a readable .tar.gz ({exc})") from None
    return dest / top


@contextlib.contextmanager
def bundle_folder(bundle: Path) -> Iterator[Path]:
    """A bundle folder as given, or a .tar.gz safely extracted into a temporary folder."""
    if not is_archive(bundle):
        yield bundle
        return
    with tempfile.TemporaryDirectory(prefix="edgepack-bundle-") as tmp:
        yield extract_bundle(bundle, Path(tmp))


def bundle_name(bundle: Path) -> str:
    name = bundle.name
    for suffix in ARCHIVE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name
