"""A bundle as users hand it over: a folder, or the .tar.gz that travels to devices.

Archives are opened as untrusted input: only plain files and folders under one top folder are
extracted, so a crafted archive cannot write outside the temporary folder it is unpacked into.
"""

from __future__ import annotations

import contextlib
import gzip
import re
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from edgepack.errors import UserError

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")
# What tarfile lets through from a cut-off or damaged .tar.gz: an interrupted download ends the
# gzip stream early (EOFError), a flipped byte breaks the deflate data (zlib.error) or the gzip
# framing (BadGzipFile), a damaged header is a TarError. click would turn EOFError into "Aborted!".
BROKEN_ARCHIVE = (EOFError, zlib.error, gzip.BadGzipFile, tarfile.TarError)


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.endswith(ARCHIVE_SUFFIXES)


@contextlib.contextmanager
def _reading(archive: Path) -> Iterator[None]:
    """Turn a broken archive, found while opening or reading it, into one line for the user."""
    try:
        yield
    except BROKEN_ARCHIVE as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"{archive} is truncated or corrupt ({detail}); download or copy it again."
        ) from None


def check_members(archive: Path, tar: tarfile.TarFile | None = None) -> str:
    """Refuse anything but plain files and folders under one top folder; return that folder.

    Without ``tar`` the archive is opened here, so a caller that only vets it needs no tarfile.
    """
    if tar is None:
        with _reading(archive), tarfile.open(archive, "r:*") as opened:
            return check_members(archive, opened)
    with _reading(archive):
        members = tar.getmembers()  # reads the whole archive: this is where truncation shows
    tops = set()
    for member in members:
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
    with _reading(archive), tarfile.open(archive, "r:*") as tar:
        top = check_members(archive, tar)
        if hasattr(tarfile, "data_filter"):  # 3.12+, backported to 3.10.12/3.11.4
            tar.extractall(dest, filter="data")
        else:  # members were vetted above
            tar.extractall(dest)
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
