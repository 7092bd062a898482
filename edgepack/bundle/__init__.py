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
from edgepack.bundle.manifest import VOLATILE_KEYS, read_manifest, verify
from edgepack.bundle.target import BuildResult, Shared, Shipment, package_target
from edgepack.bundle.write import check_destination

__all__ = [
    "ARCHIVE_SUFFIXES",
    "VOLATILE_KEYS",
    "BuildResult",
    "Shared",
    "Shipment",
    "bundle_folder",
    "bundle_name",
    "check_destination",
    "check_members",
    "extract_bundle",
    "is_archive",
    "package_target",
    "read_manifest",
    "verify",
]
