"""A decoder's bundle: the same contract as an encoder's (manifest, SHA256SUMS, tokenizer files,
reference data, run.sh), with reference prompts as token ids and their greedy continuations, and
the LLM harness (harness/bench_llm.py, shipped as bench.py) in place of the encoder benchmark.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgepack.artifacts import sha256_file
from edgepack.bundle.decoder_readme import decoder_readme
from edgepack.bundle.manifest import write_manifest, write_sums
from edgepack.bundle.outbox import Outbox
from edgepack.bundle.requirements import requirements_text
from edgepack.bundle.sign import sign_bundle
from edgepack.bundle.verify import verify_bundle
from edgepack.bundle.write import (
    HARNESS_DIR,
    render_decoder_app_sources,
    to_ort_format,
    tokenizers_version,
    write_reference_texts,
    write_tar,
)

HARNESS = HARNESS_DIR / "bench_llm.py"
REFERENCE = "reference.json"
# The converter's list of operators and types the model uses: what a reduced (minimal) onnxruntime
# build must include; the encoder bundles ship it under the same name.
OPERATOR_CONFIG = "required_operators_and_types.config"
CHAT_TEMPLATE = "chat_template.jinja"  # the name transformers saves it under
# Shipped from harness/ as they are: the shared integrity check, the decode loop, the app runtime
# and its HTTP server, run.sh.
RUNTIME_FILES = (
    "bench_env.py",
    "bundle_check.py",
    "edgepack_decode.py",
    "edgepack_runtime.py",
    "edgepack_serve.py",
    "run.sh",
)


def _device_model(model_path: Path, tmp: Path, fmt: dict[str, Any]) -> tuple[Path, Path | None]:
    """The model in the profile's format (as the encoder bundles convert it) and, for .ort, the
    operator config."""
    if fmt.get("model") == "ort":
        return to_ort_format(model_path, tmp, fmt)
    return model_path, None


def _copy_tokenizer_and_harness(
    folder: Path, tokenizer_dir: Path, chat_template: str | None
) -> None:
    """The tokenizer files (with the chat template as a file), the harness and the runtime."""
    shutil.copytree(tokenizer_dir, folder / "tokenizer")
    template = folder / "tokenizer" / CHAT_TEMPLATE
    if chat_template and not template.exists():
        template.write_text(chat_template, encoding="utf-8")
    shutil.copy2(HARNESS, folder / "bench.py")
    # run.sh is the encoders' too: it checks SHA256SUMS names and file types, then the sums.
    for shared in RUNTIME_FILES:
        shutil.copy2(HARNESS_DIR / shared, folder / shared)
    (folder / "run.sh").chmod(0o755)


def _write_app_sources(folder: Path, manifest: dict[str, Any], model_file: Path, name: str) -> None:
    """Kotlin and Swift sources for .ort bundles (a phone app has no Python); the manifest says
    what the bundle offers an app, and why no mobile sources when there are none."""
    files, why = {}, "not a mobile (.ort) bundle"
    if model_file.suffix == ".ort":
        files, why = render_decoder_app_sources(manifest, model_file, folder / "tokenizer", name)
    for rel, text in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text, encoding="utf-8")
    manifest["app"] = {
        "python": "edgepack_runtime.py",
        "tokenizers": tokenizers_version(),
        "mobile": sorted(files),
        "mobile_skipped": None if files else why,
    }


def package_decoder(
    box: Outbox,
    name: str,
    model_path: Path,
    tokenizer_dir: Path,
    reference: dict[str, Any],
    manifest: dict[str, Any],
    sign_key: Path | None = None,
    *,
    fmt: dict[str, Any] | None = None,
    check: Callable[[Path], dict[str, Any]] | None = None,
    texts: tuple[list[str], list[list[int]]] | None = None,
    chat_template: str | None = None,
) -> tuple[Path, Path]:
    """Write ``<name>/`` and its .tar.gz into ``box``, which publishes them when the build ends;
    returns (folder, tarball) there until then.

    ``fmt`` is the profile's [format] section; ``check`` runs on the converted model file before
    anything is written (it raises to stop the bundle) and its figures go in manifest ``check``.
    ``texts`` are reference texts and the ids the build host's tokenizer gave them.
    ``chat_template`` is the Jinja source the manifest's chat table was made from, shipped as
    tokenizer/chat_template.jinja for apps that render with Jinja themselves.
    """
    manifest["reference"] = {"inputs": REFERENCE, "outputs": REFERENCE}
    with box.bundle(name) as tmp:
        model_file, op_config = _device_model(model_path, tmp, fmt or {"model": "onnx"})
        manifest["model"] = {
            "file": "model.ort" if model_file.suffix == ".ort" else "model.onnx",
            "sha256": sha256_file(model_file),
            "bytes": model_file.stat().st_size,
            **manifest["model"],
            "operator_config": OPERATOR_CONFIG if op_config is not None else None,
        }
        if check is not None:
            manifest["check"] = {**manifest.get("check", {}), **check(model_file)}
        folder = tmp / name
        folder.mkdir()
        shutil.copy2(model_file, folder / manifest["model"]["file"])
        if op_config is not None:
            shutil.copy2(op_config, folder / OPERATOR_CONFIG)
        _copy_tokenizer_and_harness(folder, tokenizer_dir, chat_template)
        _write_app_sources(folder, manifest, model_file, name)
        (folder / REFERENCE).write_text(json.dumps(reference, indent=1) + "\n", encoding="utf-8")
        if texts is not None:
            named = write_reference_texts(folder, *texts)
            if named is not None:
                manifest["reference"]["texts"] = named
        (folder / "README.md").write_text(decoder_readme(name, manifest), encoding="utf-8")
        fmt = model_file.suffix.lstrip(".")
        (folder / "requirements.txt").write_text(
            requirements_text("decoder", fmt, tokenizers_version()), encoding="utf-8"
        )
        write_manifest(folder, manifest)
        write_sums(folder)
        verify_bundle(folder)  # the device's own check, before anything is published
        if sign_key is not None:
            sign_bundle(folder, sign_key)
        write_tar(folder, tmp / f"{name}.tar.gz")
    return folder, tmp / f"{name}.tar.gz"
