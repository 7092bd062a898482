"""The sizes a config.json declares, checked before transformers allocates anything.

transformers builds whatever config.json says: 100000 layers or a hidden size of 10**9 run the
machine out of memory before any error, and a string, float or ``true`` where an integer belongs
ends in a traceback inside a constructor. A family names the keys it reads and how its parameters
add up; this module reads them strictly and holds the estimate against the weight files and the
memory the machine has.

Usage (in a family module)::

    sizes = dims.read(config, where, DIMENSIONS)
    dims.check_size(estimate(sizes), weight_bytes, where)
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any

from edgepack.errors import UserError

# The most parameters one byte of weight file can hold: 4-bit packing stores two; a config that
# implies more than twice that does not describe these weights (the estimates below count only
# the big matrices, so they never overshoot a real checkpoint).
PARAMS_PER_BYTE = 4
FP32 = 4


def _integer(value: Any, key: str, where: Path) -> int:
    # bool is an int to Python: `true` must not pass as 1 layer.
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(
            f"{where}: {key} must be a positive integer, got {_shown(value)} "
            f"({type(value).__name__})."
        )
    return value


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def read(
    config: dict[str, Any],
    model_type: str,
    where: Path,
    spec: dict[str, tuple[tuple[str, ...], bool]],
) -> dict[str, int | None]:
    """``spec`` maps a size to (its config keys, nullable). Every key present must hold a
    positive integer (or null, when nullable); an absent size takes transformers' default for
    ``model_type``, which is what ``from_pretrained`` would build."""
    sizes: dict[str, int | None] = {}
    for name, (keys, nullable) in spec.items():
        found = [k for k in keys if k in config]
        for key in found:
            if not (nullable and config[key] is None):
                _integer(config[key], key, where)
        if found:
            sizes[name] = config[found[0]]
        else:
            default = _default(model_type, keys[0])
            sizes[name] = default if isinstance(default, int) and default > 0 else None
    return sizes


def _default(model_type: str, key: str) -> Any:
    """The value transformers' config class gives ``key`` when config.json leaves it out."""
    import inspect

    from transformers import CONFIG_MAPPING

    try:
        cls = CONFIG_MAPPING[model_type]
    except KeyError:
        return None
    param = inspect.signature(cls.__init__).parameters.get(key)
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def positive_numbers(config: dict[str, Any], keys: tuple[str, ...], where: Path) -> None:
    """Epsilons and rotary bases: a finite positive number when present."""
    for key in keys:
        value = config.get(key)
        if value is None:
            continue
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or value <= 0:
            raise UserError(f"{where}: {key} must be a positive number, got {_shown(value)}.")


def divisible(sizes: dict[str, int | None], big: str, small: str, keys: str, where: Path) -> None:
    """An architecture that splits ``big`` into ``small`` equal parts (heads, head groups)."""
    a, b = sizes[big], sizes[small]
    if a is not None and b is not None and a % b:
        raise UserError(
            f"{where}: {keys} ({a} and {b}): the first must be a multiple of the second."
        )


def available_memory() -> int | None:
    """Bytes this process could still allocate: MemAvailable, capped by a cgroup v2 limit (a
    container's), or None where neither is readable."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    if not found:
        with contextlib.suppress(ValueError, OSError, AttributeError):
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = Path("/sys/fs/cgroup/memory.current").read_text().strip()
        if limit.isdigit() and used.isdigit():
            found.append(int(limit) - int(used))
    except OSError:
        pass
    return min(found) if found else None


def check_size(
    parameters: int, weight_bytes: int, where: Path, per_byte: int = PARAMS_PER_BYTE
) -> None:
    """Refuse a config that implies far more parameters than the weight files hold, or more fp32
    bytes than the machine has free: transformers would allocate them before failing."""
    need = parameters * FP32
    if parameters > per_byte * max(weight_bytes, 1):
        raise UserError(
            f"{where} describes a model of {_size(need)} in fp32 ({parameters:,} "
            f"parameters), but its weight files hold {_size(weight_bytes)}: the config does not "
            "match the weights."
        )
    free = available_memory()
    if free is not None and need > free:
        raise UserError(
            f"{where} describes a model of {_size(need)} in fp32, more than the {_size(free)} "
            "of memory available here; build it on a machine with more memory."
        )


def _size(n: int) -> str:
    if n >= 10**15:  # past a float's reach for absurd configs, and past any machine
        return "over 1000 TB"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"about {n / scale:.3g} {unit}"
    return f"about {n} bytes"
