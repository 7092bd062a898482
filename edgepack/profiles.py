"""Target profiles: what a device needs from the model, kept as data in ``targets/*.toml``.

Code never branches on a target's name; it reads the profile's fields. A profile file is checked
against ``SCHEMA`` strictly, so a typo in a key fails loudly (naming the closest valid key) instead
of silently falling back to a default.

Usage::

    from edgepack.profiles import load_target, list_targets
    profile = load_target("arm64")          # or a path to a custom .toml
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.errors import UserError, choices_hint
from edgepack.folders import check_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# (type, required, allowed values or None). Every key a profile may hold is listed here.
Spec = tuple[type | tuple[type, ...], bool, tuple[Any, ...] | None]
SCHEMA: dict[str, dict[str, Spec] | Spec] = {
    "name": (str, True, None),
    "description": (str, True, None),
    "aliases": (list, False, None),
    "device": {
        "os": (str, True, ("linux", "android", "ios", "any")),
        "machine": (str, True, ("x86_64", "aarch64", "arm64")),
        "cpu_features": (list, False, None),
        "min_glibc": (str, False, None),
        "pip_platforms": (list, False, None),
        "python_version": (str, False, None),
        "notes": (str, False, None),
    },
    "quantization": {
        "precision": (str, True, ("int8", "fp32")),
        "activation_type": (str, True, ("uint8", "int8")),
        "weight_type": (str, True, ("int8", "uint8")),
        "per_channel": (bool, True, None),
        "reduce_range": (bool, True, None),
        "calibrate_method": (str, True, ("minmax", "entropy", "percentile")),
        # "ort_fused" folds the bias into MatMulIntegerToFloat (CPU EP only); default "qdq".
        "quant_format": (str, False, ("qdq", "ort_fused")),
        # Embedding tables weight-only: int8 per row (default), int4 blocks (onnxruntime CPU only).
        "embedding_precision": (str, False, ("int8", "int4", "fp32")),
    },
    "format": {
        "model": (str, True, ("onnx", "ort")),
        "ort_target_platform": (str, False, ("amd64", "arm")),
        "ort_optimization_style": (str, False, ("Fixed", "Runtime")),
        "operator_config": (bool, False, None),
        "fixed_shape": (bool, False, None),
    },
    "harness": {
        "threads": (int, True, None),
        "seq_len": (int, True, None),
        "batch": (int, False, None),
        "execution_provider": (str, True, ("cpu", "xnnpack", "nnapi", "coreml")),
    },
    "runtime": {
        "package": (str, True, None),
        "install": (str, False, None),
    },
    # Generative decoders only (weight-only quantization); a profile without it serves decoders
    # with the defaults, int4 at accuracy level 4.
    "decoder": {
        "precision": (str, False, ("int4", "int8", "fp32")),
        # MatMulNBits compute type: 4 = int8 activations (the CPU's dot-product kernels), 0 = fp32.
        "accuracy_level": (int, False, (0, 1, 2, 3, 4)),
        # The KV cache's type: int8 keeps a quarter of fp32's memory (quantize/kv_cache.py).
        "kv_cache": (str, False, ("fp32", "int8")),
    },
}
OPTIONAL_SECTIONS = frozenset({"decoder"})


@dataclass(frozen=True)
class TargetProfile:
    """A validated profile; ``data`` is the parsed file, recorded verbatim in the manifest."""

    name: str
    description: str
    source: str
    data: dict[str, Any]

    def section(self, name: str) -> dict[str, Any]:
        return dict(self.data.get(name, {}))

    @property
    def precision(self) -> str:
        return str(self.data["quantization"]["precision"])


def targets_dir() -> Path:
    """The folder of built-in profiles: edgepack/targets in an installed wheel, the repo's
    targets/ in a checkout (a plain path: the data folder has no ``__init__.py``)."""
    here = Path(__file__).resolve().parent
    for folder in (here / "targets", here.parent / "targets"):
        if any(folder.glob("*.toml")):
            return folder
    raise FileNotFoundError(f"no targets/*.toml beside {here}; the installation is incomplete")


def _check(data: dict[str, Any], schema: dict[str, Any], where: str, source: str) -> None:
    for key in data:
        if key not in schema:
            raise UserError(f"{source}: unknown key {where}{key!r}. {choices_hint(key, schema)}")
    for key, spec in schema.items():
        if isinstance(spec, dict):
            if key not in data and key in OPTIONAL_SECTIONS:
                continue
            if key not in data:
                raise UserError(f"{source}: missing section [{where}{key}].")
            if not isinstance(data[key], dict):
                raise UserError(f"{source}: {where}{key} must be a [section].")
            _check(data[key], spec, f"{where}{key}.", source)
            continue
        typ, required, allowed = spec
        if key not in data:
            if required:
                raise UserError(f"{source}: missing key {where}{key}.")
            continue
        value = data[key]
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            names = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
            raise UserError(f"{source}: {where}{key} must be a {names}, got {value!r}.")
        if allowed is not None and value not in allowed:
            raise UserError(
                f"{source}: {where}{key} = {value!r} is not allowed. "
                f"{choices_hint(str(value), map(str, allowed))}"
            )
        if typ is int and allowed is None and value <= 0:
            raise UserError(f"{source}: {where}{key} must be positive, got {value}.")


def parse_profile(text: str, source: str) -> TargetProfile:
    """Parse and validate one profile's TOML text."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{source}: not valid TOML ({exc}).") from None
    _check(data, SCHEMA, "", source)
    check_name(data["name"], f"{source}: target name")
    return TargetProfile(data["name"], data["description"], source, data)


def _read_profile(path: Path) -> TargetProfile:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read target profile {path}: {exc}") from None
    return parse_profile(text, str(path))


def builtin_targets() -> dict[str, TargetProfile]:
    """Built-in profiles by name and alias, in file-name order."""
    found: dict[str, TargetProfile] = {}
    for path in sorted(targets_dir().glob("*.toml")):
        profile = _read_profile(path)
        found[profile.name] = profile
        for alias in profile.data.get("aliases", []):
            found.setdefault(str(alias), profile)
    return found


def list_targets() -> list[TargetProfile]:
    """Each built-in profile once (aliases folded), for ``edgepack targets`` and ``--target all``."""
    seen: dict[str, TargetProfile] = {}
    for profile in builtin_targets().values():
        seen.setdefault(profile.name, profile)
    return list(seen.values())


def load_target(name_or_path: str) -> TargetProfile:
    """A built-in profile by name or alias, or a user-written profile file by path."""
    if name_or_path.endswith(".toml") or "/" in name_or_path:
        path = Path(name_or_path)
        if not path.is_file():
            raise UserError(f"target profile file {name_or_path} does not exist.")
        return _read_profile(path)
    builtins = builtin_targets()
    if name_or_path not in builtins:
        raise UserError(
            f"unknown target {name_or_path!r}. "
            f"{choices_hint(name_or_path, [*builtins, 'all', 'path/to/profile.toml'])}"
        )
    return builtins[name_or_path]


def resolve_targets(spec: str) -> list[TargetProfile]:
    """``all`` expands to the matrix of built-in profiles; anything else is one profile."""
    if spec == "all":
        return list_targets()
    return [load_target(spec)]
