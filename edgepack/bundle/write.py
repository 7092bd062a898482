"""Write a bundle folder and its .tar.gz atomically and deterministically.

Everything is written into a temporary folder beside the destination (same filesystem) and renamed
into place at the end, so an interrupted build never leaves a half-written bundle; stale temporary
folders of dead builds are removed on the next run. Files carry no timestamps, JSON has sorted keys
and archive members are sorted with fixed metadata, so two builds of the same inputs are identical.
"""

from __future__ import annotations

import errno
import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.bundle.manifest import bundle_files, write_manifest, write_sums
from edgepack.bundle.requirements import requirements_text
from edgepack.errors import UserError

HARNESS_DIR = Path(__file__).resolve().parent.parent / "harness"
HARNESS_FILES = ("bench.py", "bench_env.py", "bundle_check.py", "run.sh", "edgepack_runtime.py")
EXECUTABLE = ("run.sh", "bench.py", "bench_android.sh", "edgepack_runtime.py")
TMP_PREFIX = ".edgepack-tmp-"
# Failures of the destination, not of edgepack: a full disk, quota, read-only or forbidden folder.
WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)
FIXED_MTIME = 315532800  # 1980-01-01, the earliest a zip entry can say; used for tar too
# Texts with the ids the build host's tokenizer gave them: the bundle check tokenizes them with the
# shipped tokenizer.json, as the app runtime does, and requires the same ids.
REFERENCE_TEXTS = "reference/texts.json"


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez without the wall-clock timestamps it puts in each zip entry."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(arrays):
            buffer = io.BytesIO()
            np.lib.format.write_array(
                buffer, np.ascontiguousarray(arrays[name]), allow_pickle=False
            )
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, buffer.getvalue())


def write_reference_texts(folder: Path, texts: list[str], ids: list[list[int]]) -> str | None:
    """Write REFERENCE_TEXTS (sorted keys, no timestamp) when the bundle ships the tokenizer.json
    the runtime loads; return its name for manifest.json reference.texts, or None."""
    if not (folder / "tokenizer" / "tokenizer.json").is_file():
        return None
    rows = [
        {"ids": [int(i) for i in row], "text": text} for text, row in zip(texts, ids, strict=True)
    ]
    (folder / REFERENCE_TEXTS).parent.mkdir(exist_ok=True)
    data = json.dumps({"texts": rows}, indent=1, sort_keys=True)
    (folder / REFERENCE_TEXTS).write_text(data + "\n", encoding="utf-8")
    return REFERENCE_TEXTS


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out_root: Path) -> list[Path]:
    """Remove temporary folders left by builds that were killed."""
    removed = []
    for path in out_root.glob(TMP_PREFIX + "*"):
        pid = path.name[len(TMP_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit() or not _pid_alive(int(pid)) or int(pid) == os.getpid():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def write_files(folder: Path, files: dict[str, bytes]) -> None:
    """Write every file beside its final name first, then rename them all into place.

    A full disk (or any failure) while writing leaves none of them, and never half of one: the
    renames that follow need no space.
    """
    tmp = {name: folder / f".{name}.{os.getpid()}.tmp" for name in files}
    try:
        for name, data in files.items():
            tmp[name].write_bytes(data)
        for name in files:
            os.replace(tmp[name], folder / name)
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)


def check_out_root(out_root: Path) -> None:
    """Refuse, before any work, an output location that cannot take bundles.

    Bundles are written beside each other with temporary folders next to them, so the output
    must be a folder of its own: never the filesystem root or the home folder itself, never a
    file, and writable (tried for real: permission bits say nothing for root or a read-only
    mount). Nothing is left behind by the check.
    """
    resolved = out_root.expanduser().resolve()
    if resolved in (Path(resolved.anchor), Path.home().resolve()):
        raise UserError(
            f"--out {out_root} is {resolved} itself; give a folder for the bundles (e.g. dist)."
        )
    if resolved.exists() and not resolved.is_dir():
        raise UserError(f"--out {out_root} is a file; give a folder for the bundles.")
    existing = next(p for p in (resolved, *resolved.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"--out {out_root}: {existing} is a file, so no folder can be made there.")
    try:
        with tempfile.TemporaryDirectory(prefix=".edgepack-probe-", dir=existing):
            pass
    except OSError as exc:
        raise UserError(f"--out {out_root} is not writable: {exc.strerror or exc}.") from None


def check_destination(out_root: Path, name: str, force: bool) -> None:
    """Refuse early, before any work, when the bundle exists and --force was not given."""
    dest = out_root / name
    if (dest.exists() or dest.with_name(name + ".tar.gz").exists()) and not force:
        raise UserError(f"{dest} already exists; pass --force to replace it.")


def publish(tmp: Path, out_root: Path, name: str, force: bool) -> tuple[Path, Path]:
    """Rename the finished folder and archive into place (each rename is atomic)."""
    check_destination(out_root, name, force)
    dest, tar = out_root / name, out_root / f"{name}.tar.gz"
    old = tmp / "replaced"
    old.mkdir()
    try:
        if dest.exists():
            os.replace(dest, old / name)
        os.replace(tmp / name, dest)
        os.replace(tmp / f"{name}.tar.gz", tar)
    except OSError as exc:
        raise UserError(f"cannot move the bundle into {out_root}: {exc.strerror or exc}") from None
    return dest, tar


def write_tar(folder: Path, tar_path: Path) -> None:
    """A reproducible .tar.gz whose single top-level entry is the bundle folder."""
    top = folder.name
    with (
        open(tar_path, "wb") as raw,
        gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0, compresslevel=6) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        dirs = sorted({Path(n).parent.as_posix() for n in bundle_files(folder)} - {"."})
        names = [*(d + "/" for d in dirs), *bundle_files(folder), "SHA256SUMS"]
        for entry in [top + "/", *(f"{top}/{n}" for n in sorted(set(names)))]:
            info = tarfile.TarInfo(entry.rstrip("/"))
            info.mtime, info.uid, info.gid, info.uname, info.gname = FIXED_MTIME, 0, 0, "", ""
            src = folder.parent / entry
            if entry.endswith("/"):
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
                continue
            info.size = src.stat().st_size
            info.mode = 0o755 if src.name in EXECUTABLE else 0o644
            with open(src, "rb") as handle:
                tar.addfile(info, handle)


def fix_input_shapes(onnx_path: Path, out_dir: Path, batch: int, seq_len: int) -> Path:
    """Pin [batch, seq] inputs: NNAPI and CoreML only take the graph whole with static shapes."""
    import onnx
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_input_shape_fixed

    model = onnx.load(str(onnx_path))
    for value in model.graph.input:
        make_input_shape_fixed(model.graph, value.name, [batch, seq_len])
    fix_output_shapes(model)
    fixed = out_dir / "fixed-shape.onnx"
    onnx.save(model, str(fixed))
    return fixed


def to_ort_format(onnx_path: Path, out_dir: Path, fmt: dict[str, Any]) -> tuple[Path, Path | None]:
    """Convert with onnxruntime's own converter, as its mobile docs prescribe."""
    work = out_dir / "ort-convert"
    work.mkdir()
    shutil.copy2(onnx_path, work / "model.onnx")
    cmd = [
        sys.executable,
        "-m",
        "onnxruntime.tools.convert_onnx_models_to_ort",
        str(work),
        "--optimization_style",
        fmt.get("ort_optimization_style", "Fixed"),
        "--target_platform",
        fmt.get("ort_target_platform", "arm"),
    ]
    if fmt.get("operator_config", True):
        cmd.append("--enable_type_reduction")
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ORT format conversion failed:\n{done.stdout}\n{done.stderr}")
    ort_file = next(work.rglob("*.ort"))
    configs = sorted(work.rglob("*.config"))
    if not configs:
        return ort_file, None
    # The converter names the temporary model path in a comment; keep the file build-independent.
    lines = configs[0].read_text(encoding="utf-8").splitlines()
    body = [line for line in lines if not line.startswith("# - ")]
    configs[0].write_text("\n".join(body).replace("model/s:", "model/s: model.ort") + "\n")
    return ort_file, configs[0]


def _harness(name: str) -> Any:
    """A harness module loaded by path: harness/ is a folder of device files, not a package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"edgepack_{name}", HARNESS_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def render_app_sources(
    manifest: dict[str, Any], tokenizer_dir: Path, name: str
) -> tuple[dict[str, str], str]:
    """Kotlin and Swift sources for a mobile bundle (harness/mobile.py), or ({}, why none)."""
    return _harness("mobile").render(manifest, tokenizer_dir, name)


def render_decoder_app_sources(
    manifest: dict[str, Any], model_file: Path, tokenizer_dir: Path, name: str
) -> tuple[dict[str, str], str]:
    """Kotlin and Swift decoder sources and their tokenizer files (harness/mobile_llm.py), from
    the converted model's own signature, or ({}, why none)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    return _harness("mobile_llm").render(manifest, session, tokenizer_dir, name)


def tokenizers_version() -> str:
    """The host's HF tokenizers, which the device's must match or follow (requirements.txt)."""
    from importlib import metadata

    return metadata.version("tokenizers")


def write_bundle(
    folder: Path,
    model_file: Path,
    tokenizer_dir: Path,
    reference: dict[str, Any],
    manifest: dict[str, Any],
    extra_files: dict[str, Path],
    device_readme: str,
    generated: dict[str, str] | None = None,
) -> None:
    """Lay out one bundle folder; the caller decides what goes in the manifest.

    ``generated`` maps bundle-relative paths to text written as is (the app sources);
    ``reference`` holds "inputs" and "outputs" arrays and optionally "texts", (texts, their ids).
    """
    folder.mkdir()
    shutil.copy2(model_file, folder / manifest["model"]["file"])
    shutil.copytree(tokenizer_dir, folder / "tokenizer")
    for rel, text in (generated or {}).items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text, encoding="utf-8")
    (folder / "reference").mkdir()
    save_npz(folder / "reference" / "inputs.npz", reference["inputs"])
    save_npz(folder / "reference" / "outputs_fp32.npz", reference["outputs"])
    if "texts" in reference:
        texts, ids = reference["texts"]
        named = write_reference_texts(folder, texts, ids)
        if named is not None:
            manifest["reference"]["texts"] = named
    for name in HARNESS_FILES:
        shutil.copy2(HARNESS_DIR / name, folder / name)
    for name, src in extra_files.items():
        if src.is_dir():
            shutil.copytree(src, folder / name)
        else:
            shutil.copy2(src, folder / name)
    for name in EXECUTABLE:
        if (folder / name).exists():
            (folder / name).chmod(0o755)
    fmt = Path(manifest["model"]["file"]).suffix.lstrip(".")
    (folder / "requirements.txt").write_text(
        requirements_text("encoder", fmt, tokenizers_version()), encoding="utf-8"
    )
    (folder / "README.md").write_text(device_readme, encoding="utf-8")
    write_manifest(folder, manifest)
    write_sums(folder)
