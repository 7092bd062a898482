"""Tools that run a finished bundle: here, over ssh, under emulated aarch64, and compare results.

They read bundles; nothing in the build imports them.
"""

from edgepack.device.compare import compare
from edgepack.device.emulate import verify_emulated
from edgepack.device.host import run_local, run_remote

__all__ = ["compare", "run_local", "run_remote", "verify_emulated"]
