"""Bundles: what a target profile puts on a device, written atomically, checked by manifest and sums.

Other stages and the device tools use only the names below.
"""

from edgepack.bundle.archive import (
    ARCHIVE_SUFFIXES,
    bundle_folder,
    bundle_name,
    check_members,
    extract_bundle,
    is_archive,
)
from edgepack.bundle.chat_format import chat_format as chat_table
from edgepack.bundle.llm import package_decoder
from edgepack.bundle.manifest import VOLATILE_KEYS, read_manifest
from edgepack.bundle.outbox import Outbox
from edgepack.bundle.sign import SIGNATURE, check_sign_key, sign_bundle
from edgepack.bundle.target import BuildResult, Shared, Shipment, package_target, published
from edgepack.bundle.verify import read_sums, verify_bundle
from edgepack.bundle.write import WRITE_ERRORS, check_destination, check_out_root, write_files

__all__ = [
    "ARCHIVE_SUFFIXES",
    "SIGNATURE",
    "VOLATILE_KEYS",
    "WRITE_ERRORS",
    "BuildResult",
    "Outbox",
    "Shared",
    "Shipment",
    "bundle_folder",
    "bundle_name",
    "chat_table",
    "check_destination",
    "check_members",
    "check_out_root",
    "check_sign_key",
    "extract_bundle",
    "is_archive",
    "package_decoder",
    "package_target",
    "published",
    "read_manifest",
    "read_sums",
    "sign_bundle",
    "verify_bundle",
    "write_files",
]
