"""One target's bundle: reference data, the model in the target's format, manifest and README.

This is where a target profile turns into files; ``package.py`` only knows how to write them
safely.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.artifacts import HFModel, OnnxModel, sha256_file
from edgepack.bundle.outbox import Outbox
from edgepack.bundle.requirements import min_python
from edgepack.bundle.sign import sign_bundle
from edgepack.bundle.verify import verify_bundle
from edgepack.bundle.write import (
    fix_input_shapes,
    render_app_sources,
    to_ort_format,
    tokenizers_version,
    write_bundle,
    write_tar,
)
from edgepack.calibration import TextSet, encode
from edgepack.config import BuildConfig, recorded_config
from edgepack.evaluate import fidelity, run_onnx
from edgepack.export import labels_of
from edgepack.families import encoder
from edgepack.profiles import TargetProfile

HARNESS_README = Path(__file__).resolve().parent.parent / "harness" / "README.md"
REFERENCE_TEXTS = 8  # rows of reference inputs/outputs shipped in every bundle
# The on-device check allows for kernel differences between the build host and the device
# (e.g. ARM vs x86 int8 GEMM rounding) on top of what the host measured.
DEVICE_COSINE_MARGIN = 0.01


@dataclass(frozen=True)
class BuildResult:
    target: str
    folder: Path
    tarball: Path
    manifest: dict[str, Any]
    fp32_model: Path  # the unquantized ONNX, for side-by-side latency on the host


def _readme(name: str, manifest: dict[str, Any]) -> str:
    fid = manifest["fidelity"]
    lines = [
        f"# {name}",
        "",
        f"{manifest['model']['precision']} {manifest['task']} model for **{manifest['target']['name']}** "
        f"({manifest['target']['description']}), built by edgepack {manifest['versions']['edgepack']} "
        f"from `{manifest['source']['model']}`.",
        "",
        f"- Model file: `{manifest['model']['file']}` ({manifest['model']['bytes'] / 1e6:.1f} MB)",
        f"- Fidelity to fp32 on {fid['count']} held-out texts: mean cosine {fid['mean_cosine']:.4f}, "
        f"min {fid['min_cosine']:.4f}",
        f"- Runtime: {manifest['target']['runtime']['package']}",
        "",
        "Quick start on the device:",
        "",
        "```sh",
        "pip install -r requirements.txt   # or: pip install --no-index --find-links wheels -r requirements.txt",
        "./run.sh --json ../result.json     # verifies the bundle, checks outputs, measures latency",
        "```",
        "",
    ]
    lines += _app_readme(manifest)
    if HARNESS_README.is_file():
        lines += [HARNESS_README.read_text(encoding="utf-8")]
    return "\n".join(lines)


# What an app calls per kind of primary output (families.encoder.output_kind).
APP_CALLS = {
    "sentence": ("embed", "(n, d) float32 array, one row per text"),
    "tokens": ("embed", "(n, d) float32 array: token vectors mean-pooled over the mask"),
    "logits": ("classify", 'list of {"label", "score", "scores"} (softmax over the labels)'),
    "token-logits": ("tag", 'list per text of {"token", "start", "end", "label", "score"}'),
}


def _fmt(manifest: dict[str, Any]) -> str:
    return Path(manifest["model"]["file"]).suffix.lstrip(".")


def _app_readme(manifest: dict[str, Any]) -> list[str]:
    """How an app uses the bundle: the Python runtime, and the Kotlin/Swift files when present."""
    call, returns = APP_CALLS[encoder.output_kind(manifest["task"], manifest["source"]["library"])]
    lines = [
        "## Use the model from an app",
        "",
        "`edgepack_runtime.py` tokenizes exactly as the build host did "
        "(`tokenizer/tokenizer.json`) and runs the model; it needs only onnxruntime, numpy and "
        f"tokenizers (requirements.txt), Python {min_python('encoder', _fmt(manifest))}+.",
        "",
        "```python",
        'import sys; sys.path.insert(0, "/path/to/this/bundle")',
        "from edgepack_runtime import Model",
        'model = Model("/path/to/this/bundle")',
        f'result = model.{call}(["where is my order?", "how do I return a phone?"])',
        f"# {returns}",
        "```",
        "",
        "From a shell in this folder (JSON out): "
        f'`python3 -m edgepack_runtime {call} "where is my order?"`.',
        "",
    ]
    if call == "embed":
        lines += [
            "Semantic search over a text file, one candidate per line (keep your files outside "
            "the bundle: bench.py refuses any file SHA256SUMS does not list):",
            "",
            "```sh",
            "printf 'Track my parcel\\nReset my password\\nStore opening hours\\n' > ~/faq.txt",
            'python3 -m edgepack_runtime search --file ~/faq.txt "where is my order?" --top 2',
            '# [{"line": 1, "score": 0.31, "text": "Track my parcel"}, {"line": 3, ...}]',
            "```",
            "",
        ]
    mobile = manifest.get("app", {}).get("mobile") or []
    if mobile:
        lines += [
            "## Android and iOS",
            "",
            f"`{'`, `'.join(mobile)}` load `{manifest['model']['file']}` with onnxruntime-android or "
            "onnxruntime-objc, feed it the exact input names, dtypes and shapes of this model, and "
            "tokenize with `tokenizer/vocab.txt` the way the build host did. Usage is at the top "
            "of each file.",
            "",
        ]
    return lines


@dataclass(frozen=True)
class Shared:
    """What every target of one build shares: the model, its fp32 export and the texts."""

    name: str  # bundle name prefix; each bundle is "<name>-<target>"
    model: HFModel
    fp32: OnnxModel
    calib: TextSet
    heldout: TextSet
    tokenizer: Any
    config: BuildConfig
    versions: dict[str, str]
    sign_key: Path | None = None  # EC private key: each bundle gets a bundle.sig
    # The build's stage seconds and peak memory so far (Progress.resources), read at packaging.
    resources: Callable[[], dict[str, Any]] = dict


@dataclass(frozen=True)
class Shipment:
    """One target's model and the figures measured on it."""

    profile: TargetProfile
    candidate: OnnxModel
    precision: str
    fidelity: dict[str, Any]
    evaluation: dict[str, Any] | None
    seq_len: int


def package_target(shared: Shared, ship: Shipment, box: Outbox) -> BuildResult:
    """Write ``<name>-<target>/`` and its .tar.gz into ``box``, which publishes them when the
    build ends; the result names them there until then."""
    name, fp32 = f"{shared.name}-{ship.profile.name}", shared.fp32
    names = [i["name"] for i in fp32.inputs]
    texts = list(shared.heldout.texts[:REFERENCE_TEXTS])
    inputs = encode(shared.tokenizer, texts, names, ship.seq_len)
    # The ids the model was fed, unpadded: what the runtime's tokenizer.json must give again.
    ids = shared.tokenizer(texts, truncation=True, max_length=ship.seq_len)["input_ids"]
    ref_out = run_onnx(fp32.path, [inputs], threads=1)[0]
    with box.bundle(name) as tmp:
        model_file, io, extra = _device_model(shared, ship, tmp)
        check = fidelity_on(model_file, inputs, ref_out, fp32.task)
        manifest = _manifest(shared, ship, model_file, io, check, len(ref_out))
        tokenizer_dir = _tokenizer_files(shared, tmp)
        generated = _app_files(manifest, ship.profile, tokenizer_dir, name, model_file)
        write_bundle(
            tmp / name,
            model_file,
            tokenizer_dir,
            {"inputs": inputs, "outputs": {fp32.primary_output: ref_out}, "texts": (texts, ids)},
            manifest,
            extra,
            _readme(name, manifest),
            generated,
        )
        verify_bundle(tmp / name)  # the device's own check, before anything is published
        if shared.sign_key is not None:
            sign_bundle(tmp / name, shared.sign_key)
        write_tar(tmp / name, tmp / f"{name}.tar.gz")
    return BuildResult(ship.profile.name, tmp / name, tmp / f"{name}.tar.gz", manifest, fp32.path)


def published(results: list[BuildResult], moved: dict[Path, Path]) -> list[BuildResult]:
    """The results with the paths ``Outbox.publish`` moved their bundles to."""
    return [replace(r, folder=moved[r.folder], tarball=moved[r.tarball]) for r in results]


def _tokenizer_files(shared: Shared, tmp: Path) -> Path:
    """The export's tokenizer files, plus tokenizer.json when only a fast tokenizer has it.

    edgepack_runtime.py needs tokenizer.json; an export that wrote only vocab.txt still loaded a
    fast tokenizer on the host, whose own serialisation gives the same ids.
    """
    import shutil

    folder = tmp / "tokenizer"
    shutil.copytree(shared.fp32.tokenizer_dir, folder)
    backend = getattr(shared.tokenizer, "backend_tokenizer", None)
    if not (folder / "tokenizer.json").is_file() and backend is not None:
        backend.save(str(folder / "tokenizer.json"))
    return folder


def _runtime_io(model_file: Path) -> dict[str, Any]:
    """Inputs and outputs as onnxruntime sees the final model file.

    The .ort converter resolves dimensions the exported graph left symbolic (e.g. the embedding
    size), so the app sources state what the shipped model really declares.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    dtypes = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(int32)": "int32"}
    return {
        kind: [
            {"name": t.name, "dtype": dtypes.get(t.type, t.type), "shape": list(t.shape)}
            for t in tensors
        ]
        for kind, tensors in (("inputs", session.get_inputs()), ("outputs", session.get_outputs()))
    }


def _app_files(
    manifest: dict[str, Any],
    profile: TargetProfile,
    tokenizer_dir: Path,
    name: str,
    model_file: Path,
) -> dict[str, str]:
    """Kotlin and Swift sources for .ort bundles; records what the bundle offers an app."""
    files, why = {}, "not a mobile (.ort) bundle"
    if profile.section("format")["model"] == "ort":
        io = {**manifest["io"], **_runtime_io(model_file)}
        files, why = render_app_sources({**manifest, "io": io}, tokenizer_dir, name)
    manifest["app"] = {
        "python": "edgepack_runtime.py",
        "tokenizers": tokenizers_version(),
        "mobile": sorted(files),
        "mobile_skipped": None if files else why,
    }
    return files


def _device_model(
    shared: Shared, ship: Shipment, tmp: Path
) -> tuple[Path, dict[str, Any], dict[str, Path]]:
    """The model in the profile's format, its I/O signature, and extra files the format needs."""
    fmt, profile = ship.profile.section("format"), ship.profile
    model_file, extra = ship.candidate.path, {}
    io = {"inputs": list(shared.fp32.inputs), "outputs": list(shared.fp32.outputs)}
    if fmt.get("fixed_shape"):
        from edgepack.export import io_signature

        batch = int(profile.section("harness").get("batch", 1))
        model_file = fix_input_shapes(model_file, tmp, batch, ship.seq_len)
        io["inputs"], io["outputs"] = (list(x) for x in io_signature(model_file))
    if fmt["model"] == "ort":
        model_file, op_config = to_ort_format(model_file, tmp, fmt)
        if op_config is not None:
            extra["required_operators_and_types.config"] = op_config
    if shared.config.with_runtime:
        from edgepack.bundle.wheels import download_runtime

        download_runtime(profile.section("device"), tmp / "wheels", shared.versions["onnxruntime"])
        extra["wheels"] = tmp / "wheels"
    return model_file, io, extra


def _manifest(
    shared: Shared,
    ship: Shipment,
    model_file: Path,
    io: dict[str, Any],
    check: dict[str, Any],
    count: int,
) -> dict[str, Any]:
    fp32, model, profile, int8 = shared.fp32, shared.model, ship.profile, ship.precision == "int8"
    return {
        "built_at": _now(),
        "resources": shared.resources(),
        "task": fp32.task,
        "model": {
            "file": "model.ort" if profile.section("format")["model"] == "ort" else "model.onnx",
            "sha256": sha256_file(model_file),
            "bytes": model_file.stat().st_size,
            "precision": ship.precision,
            "fp32_bytes": fp32.path.stat().st_size,
        },
        "io": {**io, "primary_output": fp32.primary_output},
        "source": {
            "model": model.source,
            "model_type": model.model_type,
            "weights_sha256": model.weights_sha256,
            "files_sha256": model.files_sha256,
            "library": model.library,
            "history": list(model.history),
        },
        "target": {**profile.data, "profile_source": Path(profile.source).name},
        "harness": {
            "batch": 1,
            **profile.section("harness"),
            "seq_len": ship.seq_len,
            # bench.py refuses a --seq-len past the model's positions in one line.
            "max_seq_len": model.max_length,
        },
        "export": fp32.records.get("validation", {}),
        "quantization": ship.candidate.records.get("quantization") if int8 else None,
        "calibration": shared.calib.record() if int8 else None,
        "heldout": shared.heldout.record(),
        "fidelity": ship.fidelity,
        "evaluation": ship.evaluation,
        "labels": labels_of(model.path),
        "reference": {
            "inputs": "reference/inputs.npz",
            "outputs": "reference/outputs_fp32.npz",
            "count": count,
            "host_min_cosine": check["min_cosine"],
            "min_cosine": round(min(check["min_cosine"] - DEVICE_COSINE_MARGIN, 0.999), 4),
        },
        "build": {
            # This bundle's own target, so `edgepack rebuild` of one bundle of a matrix works.
            **_recorded(shared.config, profile.name),
            "command": "edgepack rebuild manifest.json",
        },
        "versions": shared.versions,
    }


def _recorded(config: BuildConfig, target: str) -> dict[str, Any]:
    recorded = recorded_config(config)
    return {**recorded, "config": {**recorded["config"], "target": target}}


def fidelity_on(
    model_file: Path, inputs: dict[str, np.ndarray], ref: np.ndarray, task: str
) -> dict[str, Any]:
    got = run_onnx(model_file, [inputs], threads=1)
    return fidelity([ref], got, encoder.masks([inputs]), task)


def _now() -> str:
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


__all__ = ["BuildResult", "Shared", "Shipment", "package_target", "published"]
