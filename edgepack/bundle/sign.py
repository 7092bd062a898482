"""Signed bundles: OpenSSF model-signing over the whole bundle folder, in ``bundle.sig``.

A regenerated SHA256SUMS defeats checksums; a signature made with a key only the publisher holds
does not. The format is the OpenSSF model-signing one (elliptic-curve key, offline), so a bundle
can also be checked with that project's own tool. The signature covers every file of the folder
except ``bundle.sig`` itself (model-signing does not skip its own output, so both sides name it
as ignored), which means it is written last, after SHA256SUMS, and never listed there.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from edgepack.errors import BundleTampered, UserError

SIGNATURE = "bundle.sig"
INSTALL = "pip install 'edgepack[sign]' (model-signing and pyopenssl)"


def _model_signing() -> Any:
    try:
        import model_signing.hashing
        import model_signing.signing
        import model_signing.verifying
    except ImportError as exc:
        raise UserError(f"signing needs the model-signing package ({exc}); {INSTALL}.") from None
    return model_signing


def _ignore_signature(ms: Any) -> Any:
    return ms.hashing.Config().set_ignored_paths(paths=[SIGNATURE], ignore_git_paths=False)


def _readable(path: Path, what: str) -> None:
    if not path.is_file():
        raise UserError(f"{what} {path}: no such file.")


def check_sign_key(private_key: Path) -> None:
    """Before any work: the package is there and the key is a readable EC private key."""
    _model_signing()
    _readable(private_key, "--sign-key")
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(private_key.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise UserError(f"--sign-key {private_key} is not an unencrypted PEM key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise UserError(f"--sign-key {private_key} is not an elliptic-curve key (use P-256).")


def sign_bundle(folder: Path, private_key: Path) -> Path:
    """Write ``folder/bundle.sig`` with the EC private key (PEM); returns its path."""
    ms = _model_signing()
    _readable(private_key, "--sign-key")
    signature = folder / SIGNATURE
    try:
        config = ms.signing.Config().use_elliptic_key_signer(private_key=private_key)
        config.set_hashing_config(_ignore_signature(ms)).sign(folder, signature)
    except ValueError as exc:  # a key that is not an EC private key in PEM form
        raise UserError(f"--sign-key {private_key} cannot sign: {exc}") from None
    return signature


def verify_signature(folder: Path, public_key: Path) -> None:
    """Raise ``BundleTampered`` unless ``bundle.sig`` verifies with ``public_key``."""
    ms = _model_signing()
    _readable(public_key, "--public-key")
    signature = folder / SIGNATURE
    if not signature.is_file():
        raise BundleTampered(f"{folder} has no {SIGNATURE}; it is not a signed bundle.")
    try:
        config = ms.verifying.Config().use_elliptic_key_verifier(public_key=public_key)
        config.set_hashing_config(_ignore_signature(ms)).verify(folder, signature)
    except Exception as exc:  # model-signing raises ValueError and cryptography's own errors
        raise BundleTampered(
            f"{folder}: {SIGNATURE} does not verify with {public_key}: {_problem(exc)}"
        ) from None


def _problem(exc: BaseException) -> str:
    """model-signing's mismatch report (reprs of raw digests) reduced to the file names."""
    text = str(exc)
    found = [
        ("changed", re.findall(r"Hash mismatch for \\?'(.+?)\\?':", text)),
        ("added", re.findall(r"Extra files found in model '[^']*': ([^\"']+)", text)),
        ("missing", re.findall(r"Missing files in model '[^']*': ([^\"']+)", text)),
    ]
    parts = [f"{kind} {', '.join(names)}" for kind, names in found if names]
    if parts:
        return "files differ from the signed ones: " + "; ".join(parts)
    return " ".join(text.split())[:300] or type(exc).__name__
