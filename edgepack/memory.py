"""Each stage's peak resident memory, for the manifest and the stage lines: what a build host
needs, stage by stage (a 1B-class model must fit a 24 GB machine).

The process peak (VmHWM) is reset as each stage starts by writing 5 to /proc/self/clear_refs
(Linux 4.0+), so a figure is that stage's own peak. Where the reset is refused or /proc is absent,
the figure is the process peak so far (getrusage), which is never below the stage's.

The reset is the kernel's own high-water mark, so a parent's ``ru_maxrss`` of the build (what
``/usr/bin/time`` prints) covers only the stages since the last reset: read the manifest's
per-stage peaks instead (their largest is the build's peak).
"""

from __future__ import annotations

import contextlib
import resource
import sys
from pathlib import Path

CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")


def reset_peak() -> None:
    with contextlib.suppress(OSError):
        CLEAR_REFS.write_text("5")


def peak_mb() -> float:
    """The resident peak since the last reset, in MB (10^6 bytes)."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) * 1024 / 1e6, 1)
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak * (1 if sys.platform == "darwin" else 1024) / 1e6, 1)
