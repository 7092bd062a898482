"""Build settings: a flat, typed record filled from a TOML file and then from CLI flags.

The sample config in ``samples/build.toml`` (``--config sample:build``) supplies every default, so
``edgepack build`` with no argument builds the real sample model; ``sample:llm`` is the decoder's. Unknown keys are errors (with the closest valid key), never
silently ignored.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from edgepack.errors import UserError, choices_hint

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class BuildConfig:
    model: str = ""  # "package:NAME", a local HF folder, or a hub id (hub needs a network)
    name: str = ""  # bundle name prefix; default: derived from the model
    task: str = ""  # "" = detect from the model's config
    target: str = "arm64"  # profile name, alias, "all", or a path to a profile .toml
    calibration: str = ""  # .txt / .jsonl / .csv of texts for int8 calibration
    text_field: str = "text"  # field (.jsonl) or column (.csv) holding the text
    samples: int = 300  # calibration texts drawn (seeded) from the file
    heldout: str = ""  # texts for the fidelity check; "" = calibration texts not sampled
    # Labelled task data (text_a,text_b,score / text,label / tokens,tags): the task metric of the
    # fp32 and int8 models is recorded side by side. "" = fidelity only.
    eval_data: str = ""
    seed: int = 0  # drives every random choice, so builds are reproducible
    precision: str = ""  # "" = the target profile's; "fp32" builds the same bundle unquantized
    kv_cache: str = ""  # decoders: "" = the target profile's; "int8" or "fp32"
    # Decoders from a GGUF: write its Q4_0/Q4_1/Q8_0 blocks into the bundle as they are ("all"),
    # all but the vocabulary ("layers": smaller, the vocabulary re-quantized to int4), or none
    # ("off": re-quantize everything, as for any other checkpoint).
    source_blocks: str = "all"
    out: str = "dist"
    force: bool = False
    trust_remote_code: bool = False
    truncate: bool = False  # cut calibration texts longer than the model's maximum
    with_runtime: bool = False  # put the device's onnxruntime/numpy wheels into the bundle
    min_cosine: float = 0.98  # build fails if int8 mean cosine to fp32 falls below this
    # Accuracy-aware quantization: allowed drop of mean cosine to fp32 on dev texts (0.005 means
    # >= 0.995); the search tries other calibrations, then keeps the most sensitive layers in fp32.
    # A negative value turns the search off (the recipe alone).
    max_drop: float = 0.005
    time_budget: float = 900.0  # seconds for the accuracy search; the best model so far is kept
    # Fraction to remove before export (0 = off): of encoder MACs for an encoder, of the parameters
    # outside the embedding and lm_head for a decoder.
    prune: float = 0.0
    distill_layers: int = 0  # train a student with this many layers first (0 = off)
    distill_data: str = ""  # texts for distillation
    distill_seconds: float = 600.0  # time budget for distillation; it stops cleanly and saves


PATH_KEYS = ("calibration", "heldout", "distill_data", "eval_data")


SAMPLE_PREFIX = "sample:"


def _samples_folder() -> Path:
    """samples/ ships inside the installed package (edgepack/samples) and sits beside it in a
    checkout; a plain path works for both, where importlib.resources would hand back a
    namespace-package object for a folder without ``__init__.py``."""
    here = Path(__file__).resolve().parent
    for folder in (here / "samples", here.parent / "samples"):
        if (folder / "build.toml").is_file():
            return folder
    raise FileNotFoundError(f"no samples/build.toml beside {here}; the installation is incomplete")


def sample_config_path() -> Path:
    """The default build config (``sample:build``)."""
    return _samples_folder() / "build.toml"


def config_path(spec: str | None) -> Path:
    """A ``--config`` value as a file: ``sample:NAME`` names a shipped sample config, which works
    from any folder (an installed wheel keeps samples/ inside site-packages); no value is
    ``sample:build``; anything else is a path."""
    if spec is None:
        return sample_config_path()
    if not spec.startswith(SAMPLE_PREFIX):
        return Path(spec)
    name = spec[len(SAMPLE_PREFIX) :]
    samples = sorted(p.stem for p in _samples_folder().glob("*.toml"))
    if name not in samples:
        choices = ", ".join(SAMPLE_PREFIX + s for s in samples)
        raise UserError(f"--config {spec} names no shipped sample; use one of {choices}.")
    return _samples_folder() / f"{name}.toml"


def read_config(path: Path) -> BuildConfig:
    """Parse a build config file; relative paths are relative to the file."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"build config {path} does not exist.") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"build config {path} is not readable TOML: {exc}") from None
    return overlay(BuildConfig(), data, str(path), base=path.parent)


def overlay(
    config: BuildConfig, values: dict[str, Any], source: str, base: Path | None = None
) -> BuildConfig:
    """Apply ``values`` (from a file or CLI flags) on top of ``config``, type-checked."""
    known = {f.name: f for f in fields(BuildConfig)}
    changes: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            raise UserError(f"{source}: unknown key {key!r}. {choices_hint(key, known)}")
        want = type(getattr(BuildConfig(), key))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise UserError(f"{source}: {key} must be a {want.__name__}, got {value!r}.")
        if want is float and not math.isfinite(value):
            raise UserError(f"{source}: {key} must be a finite number, got {value!r}.")
        if key in PATH_KEYS and value and base is not None and not Path(value).is_absolute():
            value = str((base / value).resolve())
        changes[key] = value
    return replace(config, **changes)


def portable_name(path: str) -> str:
    """How a manifest names an input file: ``sample:FILE`` for a file shipped in samples/, else
    its file name. Never the build machine's path, and not one relative to the current folder
    either, so the same build from another folder or machine records the same manifest (and a
    rebuild's own record matches it); the sha256 beside it tells files of one name apart."""
    if not path:
        return path
    real = Path(path).resolve()
    if real.is_relative_to(_samples_folder()):
        return SAMPLE_PREFIX + real.relative_to(_samples_folder()).as_posix()
    return real.name


def recorded_config(config: BuildConfig) -> dict[str, Any]:
    """``build.config`` and ``build.inputs`` of a manifest: the settings with input files named
    portably, and each input's sha256 so ``edgepack rebuild`` can tell the same file from another
    one of the same name."""
    from edgepack.artifacts import sha256_file

    values = {k: v for k, v in config.__dict__.items() if k not in ("out", "force")}
    inputs = {}
    for key in PATH_KEYS:
        if values[key] and Path(values[key]).is_file():
            inputs[key] = sha256_file(Path(values[key]))
            values[key] = portable_name(values[key])
    return {"config": values, "inputs": inputs}


def resolve_recorded(
    values: dict[str, Any], inputs: dict[str, str], folders: list[Path]
) -> dict[str, Any]:
    """The recorded config with each input file found again: ``sample:FILE`` in the installed
    samples, a relative name in the current folder or one of ``folders``; the file whose sha256
    matches the recorded one is used. A missing or changed input is a one-line UserError."""
    from edgepack.artifacts import sha256_file

    resolved = dict(values)
    for key, digest in inputs.items():
        if key not in PATH_KEYS or not isinstance(digest, str) or len(digest) != 64:
            raise UserError(
                f"the manifest's build.inputs.{key} is not an input file's sha256; the manifest "
                f"was edited or damaged (inputs are {', '.join(PATH_KEYS)})."
            )
        name = str(values.get(key) or "")
        if name.startswith(SAMPLE_PREFIX):
            places = [_samples_folder() / name[len(SAMPLE_PREFIX) :]]
        else:
            places = [Path(name)] if Path(name).is_absolute() else []
            places += [base / name for base in (Path.cwd(), *folders)]
        found = [p for p in dict.fromkeys(places) if p.is_file()]
        match = next((p for p in found if sha256_file(p) == digest), None)
        if match is None and found:
            raise UserError(
                f"{key} file {found[0]} has sha256 {sha256_file(found[0])[:12]}, not the recorded "
                f"{digest[:12]}; restore the original {name} to rebuild."
            )
        if match is None:
            where = ", ".join(str(p.parent) for p in places)
            raise UserError(f"{key} file {name} is missing (looked in {where}); put it there.")
        resolved[key] = str(match.resolve())
    return resolved
