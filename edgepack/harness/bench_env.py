#!/usr/bin/env python3
"""What both device harnesses (the encoder's and the decoder's bench.py) record about the machine
and how they summarize timings, so their reports share one schema and can be compared.

Shipped in every bundle beside bench.py; numpy only, Python 3.8+, never imports edgepack.
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from bundle_check import HarnessError

# Instruction-set extensions the int8/int4 kernels pick their code paths by (x86: VNNI, AMX;
# ARM: dot product, i8mm, SVE): figures from two machines compare only when these match.
CPU_FEATURES = (
    "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni",
    "amx_tile", "amx_int8", "amx_bf16",
    "asimd", "asimdhp", "asimddp", "i8mm", "bf16", "sve", "sve2", "sme",
)  # fmt: skip


def parse_cpu_list(text: str, count: Optional[int] = None) -> List[int]:
    """Parse taskset-style CPU lists ("4-7", "0,2-3") into sorted CPU ids below ``count`` (the
    CPUs this machine has; default os.cpu_count()). Bounds are checked before any range is
    expanded, so "0-99999999999" is one line, not a hang."""
    count = count or os.cpu_count() or 1
    cpus = set()
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                low, high = (int(x) for x in part.split("-", 1))
                if low > high:
                    raise ValueError
            else:
                low = high = int(part)
        except ValueError:
            raise HarnessError(
                "--cpus {!r} is not a CPU list; use ids and ranges like 0,2-3".format(text)
            ) from None
        if low < 0 or high >= count:
            raise HarnessError(
                "--cpus {!r} names CPU {}; this machine has CPUs 0-{}".format(
                    text, low if low < 0 else high, count - 1
                )
            )
        cpus.update(range(low, high + 1))
    return sorted(cpus)


def pin_cpus(cpus: Sequence[int]) -> None:
    if not hasattr(os, "sched_setaffinity"):
        raise HarnessError("--cpus is not supported on this OS (no sched_setaffinity)")
    try:
        os.sched_setaffinity(0, set(cpus))
    except OSError as exc:
        raise HarnessError("cannot pin to CPUs {}: {}".format(list(cpus), exc)) from None


def usable_cpus() -> Optional[List[int]]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return None


def read_text(path: str) -> Optional[str]:
    """A small sysfs/procfs read; None when the file is absent or unreadable."""
    try:
        with open(path, "rb") as handle:
            return handle.read(1 << 16).decode("utf-8", "replace").replace("\x00", "").strip()
    except OSError:
        return None


def cpuinfo_field(names: Sequence[str]) -> Optional[str]:
    info = read_text("/proc/cpuinfo") or ""
    for name in names:
        for line in info.splitlines():
            key, _, value = line.partition(":")
            if key.strip().lower() == name and value.strip():
                return value.strip()
    return None


def command_output(argv: Sequence[str]) -> Optional[str]:
    try:
        out = subprocess.run(
            list(argv), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    text = out.stdout.decode("utf-8", "replace").strip()
    return text or None


def max_temperature_c() -> Optional[float]:
    temps = []
    base = "/sys/class/thermal"
    try:
        zones = [name for name in os.listdir(base) if name.startswith("thermal_zone")]
    except OSError:
        return None
    for zone in zones:
        raw = read_text(os.path.join(base, zone, "temp"))
        try:
            value = float(raw) if raw else None
        except ValueError:
            value = None
        if value is not None:
            temps.append(value / 1000.0 if abs(value) > 200 else value)  # millidegrees on Linux
    return round(max(temps), 1) if temps else None


def cpu_features() -> Optional[List[str]]:
    """The kernel-relevant extensions this CPU reports (x86 "flags", ARM "Features"); None when
    /proc/cpuinfo says nothing (macOS, Windows)."""
    words = set((cpuinfo_field(["flags", "features"]) or "").split())
    return [name for name in CPU_FEATURES if name in words] if words else None


def collect_env() -> Dict[str, Any]:
    """Describe the device, so two results can be told apart; anything unknown is null."""
    affinity = usable_cpus()
    cpu = affinity[0] if affinity else 0
    freq = "/sys/devices/system/cpu/cpu{}/cpufreq/".format(cpu)
    mhz = None  # type: Optional[float]
    khz = read_text(freq + "scaling_cur_freq")
    if khz and khz.isdigit():
        mhz = int(khz) / 1000.0
    else:
        try:
            mhz = float(cpuinfo_field(["cpu mhz"]) or "")
        except ValueError:
            mhz = None
    model = cpuinfo_field(["model name", "hardware", "processor", "cpu model"])
    if (model is None or model.isdigit()) and sys.platform == "darwin":
        model = command_output(["sysctl", "-n", "machdep.cpu.brand_string"])
    device = read_text("/proc/device-tree/model") or read_text(
        "/sys/devices/virtual/dmi/id/product_name"
    )
    if device is None and os.path.exists("/system/bin/getprop"):
        device = command_output(["/system/bin/getprop", "ro.product.model"])
    return {
        "machine": platform.machine() or None,
        "os": platform.platform(),
        "cpu_model": model if model and not model.isdigit() else (platform.processor() or None),
        "cores": os.cpu_count(),
        "affinity": affinity,
        "governor": read_text(freq + "scaling_governor"),
        "cpu_mhz": round(mhz, 1) if mhz else None,
        "temperature_c": max_temperature_c(),
        "device_model": device,
        "cpu_features": cpu_features(),
    }


def peak_rss_mb() -> Optional[float]:
    status = read_text("/proc/self/status") or ""
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024.0, 1)  # kB
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0  # bytes on macOS, kB on Linux
    return round(peak / scale, 1) if peak else None


def summarize(latencies: Sequence[float]) -> Dict[str, float]:
    values = np.asarray(latencies, dtype=np.float64)
    pct = np.percentile(values, [50, 90, 95, 99])  # linear interpolation between order stats
    return {
        "mean": round(float(values.mean()), 4),
        "std": round(float(values.std(ddof=1)) if values.size > 1 else 0.0, 4),
        "min": round(float(values.min()), 4),
        "p50": round(float(pct[0]), 4),
        "p90": round(float(pct[1]), 4),
        "p95": round(float(pct[2]), 4),
        "p99": round(float(pct[3]), 4),
        "max": round(float(values.max()), 4),
    }


def positive_number(value: Any) -> bool:
    """A finite real number > 0: NaN, infinity, strings and booleans (true == 1) are not."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value) and value > 0
    except OverflowError:  # an integer too large for a float
        return False
