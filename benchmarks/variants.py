"""Build (or load from an earlier run) every model the benchmark compares, each timed from the HF model.

The baselines are what a user would write without edgepack, following each tool's documented flow:
optimum's exporter, then onnxruntime's ``quantize_dynamic`` / ``quantize_static`` or optimum's
``ORTQuantizer``. edgepack variants are built by the real CLI in a subprocess with a fresh stage
cache, so their build time is a cold ``edgepack build``, exactly as a user would see it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent


class VariantSkipped(Exception):
    """A variant that cannot be built here; its row says why instead of failing the run."""


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    path: Path | None  # the ONNX file; None when skipped
    precision: str  # "fp32" or "int8": which GEMM peak it is judged against
    build_seconds: float | None  # from the HF model folder, export included
    note: str = ""
    # Seconds of the shared fp32 export included in build_seconds (baselines reuse one export).
    export_seconds: float = 0.0


@dataclass(frozen=True)
class Plan:
    """Everything the builders need; one object so every variant sees the same inputs."""

    model_dir: Path  # Hugging Face sentence-transformers folder
    calibration: tuple[str, ...]  # the seeded calibration sample shared by every static variant
    seq_len: int  # calibration padding length (128, as edgepack's profiles use)
    workdir: Path
    edgepack_config: Path | None  # build config for edgepack (None = the sample config)
    distill_data: Path
    distill_seconds: float  # 0 = skip the distilled variant
    # Build-config values for every edgepack build (e.g. a shorter time_budget for --quick).
    edgepack_extra: dict[str, Any] = field(default_factory=dict)
    in_process: bool = False  # quick path: call pipeline.build() instead of a cold CLI process
    skip: tuple[str, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)  # fingerprint for reuse


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def load_or_build(
    key: str, label: str, plan: Plan, settings: dict[str, Any], make: Callable[[Path], Variant]
) -> Variant:
    """Reuse ``workdir/key`` when an earlier run built it with the same settings; else build it."""
    out = plan.workdir / key
    record = out / "variant.json"
    wanted = json.loads(json.dumps({**plan.settings, **settings}, default=str))
    if record.is_file():
        saved = json.loads(record.read_text())
        if saved.get("settings") == wanted and (
            saved["path"] is None or (out / saved["path"]).is_file()
        ):
            path = out / saved["path"] if saved["path"] else None
            return Variant(**{**saved["variant"], "path": path})
    if key in plan.skip:
        return Variant(key, label, None, "int8", None, "skipped (--skip)")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    print(f"[bench] building {key} ({label})", file=sys.stderr, flush=True)
    try:
        variant = make(out)
    except VariantSkipped as exc:
        variant = Variant(key, label, None, "int8", None, f"skipped: {exc}")
    except Exception as exc:  # one broken baseline must not lose an hour-long run
        import traceback

        (out / "error.log").write_text(traceback.format_exc())
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        print(f"[bench] {key} failed: {first} (see {out / 'error.log'})", file=sys.stderr)
        return Variant(key, label, None, "int8", None, f"failed: {first}")
    rel = str(variant.path.relative_to(out)) if variant.path else None
    body = {k: v for k, v in asdict(variant).items() if k != "path"}
    record.write_text(json.dumps({"settings": wanted, "path": rel, "variant": body}, indent=1))
    return variant


# ----------------------------------------------------------------------------- baselines
def export_fp32(model_dir: Path, out: Path) -> Path:
    """optimum's sentence-transformers export; only the pooled, normalised embedding is kept."""
    import warnings

    import onnx
    from optimum.exporters.onnx import main_export

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main_export(
            str(model_dir),
            output=str(out),
            task="feature-extraction",
            library_name="sentence_transformers",
            do_validation=False,
            local_files_only=True,
        )
    path = out / "model.onnx"
    model = onnx.load(str(path))
    keep = [o for o in model.graph.output if o.name == "sentence_embedding"]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    onnx.save(model, str(path))
    return path


def _feeds(plan: Plan, tokenizer: Any, names: list[str], batch: int) -> Iterator[dict[str, Any]]:
    """The calibration sample padded to ``seq_len``, as onnxruntime feeds of ``batch`` rows."""
    texts = list(plan.calibration)
    for start in range(0, len(texts), batch):
        enc = tokenizer(
            texts[start : start + batch],
            padding="max_length",
            truncation=True,
            max_length=plan.seq_len,
            return_tensors="np",
        )
        yield {n: enc[n].astype(np.int64) for n in names}


def _input_names(path: Path) -> list[str]:
    import onnx

    return [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]


def _preprocess(fp32: Path, out: Path) -> Path:
    """onnxruntime's documented pre-quantization step (symbolic shapes fail on optimum's BERT)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out / "preprocessed.onnx"
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    return pre


def build_ort_dynamic(fp32: Path, out: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    pre = _preprocess(fp32, out)
    path = out / "model.onnx"
    quantize_dynamic(
        str(pre), str(path), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8
    )
    pre.unlink()
    return path


class _Reader:
    """onnxruntime CalibrationDataReader over the shared calibration feeds."""

    def __init__(self, feeds: Iterator[dict[str, Any]]):
        self.feeds = feeds

    def get_next(self) -> dict[str, Any] | None:
        return next(self.feeds, None)


def build_ort_static(fp32: Path, out: Path, plan: Plan, tokenizer: Any) -> Path:
    """``quantize_static`` with its defaults except the documented x86 choice: QDQ, U8/S8, per channel."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    pre = _preprocess(fp32, out)
    path = out / "model.onnx"
    reader = _Reader(_feeds(plan, tokenizer, _input_names(pre), batch=8))
    quantize_static(
        str(pre),
        str(path),
        reader,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    pre.unlink()
    return path


def build_optimum_arm64(fp32_dir: Path, out: Path, plan: Plan, tokenizer: Any) -> Path:
    """optimum's documented static flow: ``AutoQuantizationConfig.arm64`` + min-max ``fit``.

    ``fit`` only iterates its dataset as rows of {input: array}, so a list of dicts stands in for a
    ``datasets.Dataset`` and the ``CalibrationConfig`` is written out (``AutoCalibrationConfig.minmax``
    only copies the dataset's name and size into it): no ``datasets`` dependency.
    """
    from onnxruntime.quantization import CalibrationMethod
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig, CalibrationConfig

    names = _input_names(fp32_dir / "model.onnx")
    rows = [
        {n: batch[n][i] for n in names}
        for batch in _feeds(plan, tokenizer, names, batch=8)
        for i in range(len(batch[names[0]]))
    ]
    qconfig = AutoQuantizationConfig.arm64(is_static=True, per_channel=True)
    calibration = CalibrationConfig(
        dataset_name="calibration.txt",
        dataset_config_name="seeded sample",
        dataset_split="calibration",
        dataset_num_samples=len(rows),
        method=CalibrationMethod.MinMax,
    )
    quantizer = ORTQuantizer.from_pretrained(fp32_dir)
    ranges = quantizer.fit(
        dataset=rows,  # type: ignore[arg-type]
        calibration_config=calibration,
        onnx_augmented_model_name=str(out / "augmented.onnx"),
        operators_to_quantize=qconfig.operators_to_quantize,
    )
    quantizer.quantize(quantization_config=qconfig, save_dir=out, calibration_tensors_range=ranges)
    (out / "augmented.onnx").unlink(missing_ok=True)
    return out / "model_quantized.onnx"


# ----------------------------------------------------------------------------- edgepack
def _flags(extra: dict[str, Any]) -> list[str]:
    """Build-config keys as ``edgepack build`` flags (prune=0.3 -> --prune 0.3)."""
    return [part for k, v in extra.items() for part in (f"--{k.replace('_', '-')}", str(v))]


def _build_in_process(key: str, out: Path, plan: Plan, target: str, extra: dict[str, Any]) -> int:
    """``pipeline.build`` as the CLI calls it, without a new interpreter (the quick smoke path)."""
    from edgepack.config import overlay, read_config, sample_config_path
    from edgepack.pipeline import build
    from edgepack.progress import Progress

    config = read_config(plan.edgepack_config or sample_config_path())
    values = {"target": target, "out": str(out), "force": True, "name": key}
    config = overlay(config, {**values, **plan.edgepack_extra, **extra}, "benchmark")
    previous = os.environ.get("EDGEPACK_CACHE")
    os.environ["EDGEPACK_CACHE"] = str(out / "cache")
    try:
        build(config, Progress(quiet=True))
    finally:
        if previous is None:
            os.environ.pop("EDGEPACK_CACHE", None)
        else:
            os.environ["EDGEPACK_CACHE"] = previous
    return 0


def _build_subprocess(key: str, out: Path, plan: Plan, target: str, extra: dict[str, Any]) -> int:
    """The real ``edgepack build`` command, cold: new interpreter, empty stage cache."""
    cmd = [sys.executable, "-m", "edgepack.cli", "build", "--target", target, "--out", str(out)]
    cmd += ["--force", "--name", key, *_flags({**plan.edgepack_extra, **extra})]
    if plan.edgepack_config:
        cmd += ["--config", str(plan.edgepack_config)]
    env = {
        **os.environ,
        "EDGEPACK_CACHE": str(out / "cache"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    with open(out / "build.log", "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        return subprocess.run(
            cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        ).returncode


def run_edgepack(
    key: str, out: Path, plan: Plan, target: str, extra: dict[str, Any]
) -> tuple[Path, str]:
    """Build one edgepack bundle into ``out``; returns (model file, accuracy-search note)."""
    build = _build_in_process if plan.in_process else _build_subprocess
    rc = build(key, out, plan, target, extra)
    shutil.rmtree(out / "cache", ignore_errors=True)
    folder = out / f"{key}-{target}"
    # Exit 3 = the accuracy search missed --max-drop; the best model is still saved and is what
    # a user would ship, so it is measured (and the note says so).
    if rc not in (0, 3) or not (folder / "manifest.json").is_file():
        log = out / "build.log"
        tail = log.read_text().strip().splitlines()[-3:] if log.is_file() else []
        raise RuntimeError(f"edgepack build for {key} failed (exit {rc}): {' | '.join(tail)}")
    manifest = json.loads((folder / "manifest.json").read_text())
    search = (manifest.get("quantization") or {}).get("accuracy_search") or {}
    note = ""
    if search:
        note = f"search: {search.get('chosen')}" + ("" if search.get("met") else " (drop not met)")
    return folder / manifest["model"]["file"], note


def build_all(plan: Plan) -> list[Variant]:
    """Every variant, in table order. A failing baseline is a skipped row, never a lost run."""
    from transformers import AutoTokenizer

    fp32_dir = plan.workdir / "fp32"

    def make_fp32(out: Path) -> Variant:
        path, secs = _timed(lambda: export_fp32(plan.model_dir, out))
        return Variant("fp32", "fp32 (optimum export)", path, "fp32", secs, export_seconds=secs)

    fp32 = load_or_build("fp32", "fp32 (optimum export)", plan, {}, make_fp32)
    if fp32.path is None:
        raise RuntimeError(f"the fp32 export failed, nothing to compare: {fp32.note}")
    export_s = fp32.build_seconds or 0.0
    tokenizer = AutoTokenizer.from_pretrained(str(fp32_dir), local_files_only=True)

    def baseline(key: str, label: str, fn: Callable[[Path], Path]) -> Variant:
        def make(out: Path) -> Variant:
            path, secs = _timed(lambda: fn(out))
            return Variant(key, label, path, "int8", export_s + secs, export_seconds=export_s)

        return load_or_build(key, label, plan, {}, make)

    def edgepack(key: str, label: str, target: str, extra: dict[str, Any]) -> Variant:
        def make(out: Path) -> Variant:
            (path, note), secs = _timed(lambda: run_edgepack(key, out, plan, target, extra))
            return Variant(key, label, path, "int8", secs, note)

        settings = {"target": target, "extra": {**plan.edgepack_extra, **extra}}
        return load_or_build(key, label, plan, settings, make)

    variants = [
        fp32,
        baseline(
            "ort-dynamic", "onnxruntime dynamic int8", lambda out: build_ort_dynamic(fp32.path, out)
        ),
        baseline(
            "ort-static",
            "onnxruntime static int8",
            lambda out: build_ort_static(fp32.path, out, plan, tokenizer),
        ),
        baseline(
            "optimum-arm64",
            "optimum ORTQuantizer arm64 static",
            lambda out: build_optimum_arm64(fp32_dir, out, plan, tokenizer),
        ),
        edgepack("edgepack", "edgepack int8 (cpu-vnni)", "cpu-vnni", {}),
        edgepack("edgepack-cpu", "edgepack int8 (cpu, reduce_range)", "cpu", {}),
        edgepack("edgepack-prune", "edgepack prune 0.3 + int8", "cpu-vnni", {"prune": 0.3}),
    ]
    label = "edgepack distil 3 layers + int8"
    if plan.distill_seconds > 0:
        flags = {
            "distill_layers": 3,
            "distill_data": str(plan.distill_data),
            "distill_seconds": float(plan.distill_seconds),
        }
        variants.append(edgepack("edgepack-distill", label, "cpu-vnni", flags))
    else:
        variants.append(Variant("edgepack-distill", label, None, "int8", None, "not run (--quick)"))
    return variants
