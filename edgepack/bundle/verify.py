"""Is this bundle exactly what was built? The one check behind `verify`, `bench` and `rebuild`.

The rules are not written twice: this module runs the device's own check,
``edgepack/harness/bundle_check.py`` (the file every bundle ships and its harness runs), so a
bundle `edgepack verify` calls OK is one the device runs, and one it refuses is refused with the
same words. That check holds the files to SHA256SUMS and to what manifest.json says (the model's
sha256 and size, the files it names, the files a bundle must have), refuses links and special
files before opening anything, and tokenizes the reference texts with the shipped
tokenizer.json. SHA256SUMS alone proves nothing against someone who can regenerate it; only the
signature (``--public-key``, checked here with model-signing) proves who made the bundle.
"""

from __future__ import annotations

from pathlib import Path

from edgepack.bundle.sign import verify_signature
from edgepack.errors import BundleTampered, UserError
from edgepack.harness import bundle_check


def verify_bundle(
    folder: Path,
    public_key: Path | None = None,
    require_signature: bool = False,
    notes: list[str] | None = None,
) -> int:
    """Raise ``BundleTampered`` naming the first problem; return the number of files checked.

    ``notes`` collects what could not be checked (a bundle without reference texts)."""
    if require_signature and public_key is None:
        raise UserError("--require-signature needs --public-key PUB to check the signature with.")
    if not folder.is_dir():
        raise UserError(f"{folder} is not a bundle folder.")
    try:
        bundle_check.verify_bundle(folder, notes=notes if notes is not None else [])
        listed = bundle_check.read_sums(folder)
    except bundle_check.HarnessError as exc:
        message = str(exc)
        if "is not a bundle" in message:
            raise UserError(message + ".") from None
        raise BundleTampered(f"{folder}: {message}.") from None
    if public_key is not None:
        verify_signature(folder, public_key)
    return len(listed)


def read_sums(folder: Path) -> dict[str, str]:
    """SHA256SUMS as {path: digest}, read by the device's reader (names checked, nothing opened)."""
    try:
        return bundle_check.read_sums(folder)
    except bundle_check.HarnessError as exc:
        raise BundleTampered(f"{folder}: {exc}.") from None
