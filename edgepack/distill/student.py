"""The student: which teacher layers it keeps, how it is built or loaded, and how it is saved.

DistilBERT's recipe: same width as the teacher, a subset of its layers, everything else
(embeddings, pooler, classifier head) copied. Starting from the teacher's own weights is what
lets a few minutes of CPU training reach high fidelity; a randomly initialised student would need
hours.

Even layer rule (``keep_layers``: ``--layer-choice even``, and the layer map of a folder
student; the default choice is measured instead, see ``distill_layers``): with ``n`` teacher
layers and ``k`` student layers, student layer ``i`` (0-based) is teacher layer
``ceil((i + 1) · n / k) − 1``: evenly spaced and always ending at the last layer, whose output is
what the teacher's head (or pooling) was trained on.
6 -> 3 keeps 1, 3, 5; 6 -> 2 keeps 2, 5; 12 -> 4 keeps 2, 5, 8, 11; k = n keeps all.
"""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path
from typing import Any

from edgepack.artifacts import HFModel
from edgepack.errors import UserError
from edgepack.families import encoder
from edgepack.folders import TOKENIZER_FILES, module_dirs
from edgepack.prune import is_pruned, load_pruned

# Everything besides weights and config that a model folder needs to be itself again: the
# tokenizer files (one list, shared with the exporter) and sentence-transformers' module files.
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
LAYER_KEY = re.compile(r"(^|\.)layer\.(\d+)\.")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layers")


def keep_layers(n_teacher: int, k: int) -> tuple[int, ...]:
    """Evenly spaced teacher layers ending at the last one (rule in the module docstring)."""
    if not 1 <= k <= n_teacher:
        raise UserError(f"--layers {k} is out of range; the teacher has {n_teacher} layers (1..).")
    return tuple(math.ceil((i + 1) * n_teacher / k) - 1 for i in range(k))


def check_keep(keep: tuple[int, ...], n_teacher: int) -> tuple[int, ...]:
    """Explicit ``--keep``: valid, distinct, increasing teacher layer indices."""
    if not keep:
        raise UserError("--keep needs at least one layer index.")
    bad = [i for i in keep if not 0 <= i < n_teacher]
    if bad:
        raise UserError(
            f"--keep {','.join(map(str, keep))}: layer {bad[0]} does not exist; "
            f"the teacher has layers 0..{n_teacher - 1}."
        )
    if list(keep) != sorted(set(keep)):
        raise UserError(f"--keep {','.join(map(str, keep))} must list distinct layers in order.")
    return keep


def count_layers(config: Any) -> int:
    for key in LAYER_COUNT_KEYS:
        if isinstance(getattr(config, key, None), int):
            return int(getattr(config, key))
    raise UserError(f"cannot find the layer count ({' or '.join(LAYER_COUNT_KEYS)}) in the config.")


def load_teacher(teacher: HFModel) -> Any:
    """The teacher in eval mode with gradients off: it is only ever a target."""
    import transformers

    cls = getattr(transformers, encoder.AUTO_CLASSES[teacher.task])
    model = cls.from_pretrained(str(teacher.path), dtype="float32")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def build_student(teacher_model: Any, keep: tuple[int, ...]) -> Any:
    """A new model with the teacher's config minus the dropped layers, and the teacher's weights.

    The state dict is renamed (``…layer.{keep[i]}.…`` -> ``…layer.{i}.…``) and loaded strictly,
    so any key this renaming misses is an error rather than a silently random weight.
    """
    import copy

    config = copy.deepcopy(teacher_model.config)
    for key in LAYER_COUNT_KEYS:
        if isinstance(getattr(config, key, None), int):
            setattr(config, key, len(keep))
    position = {old: new for new, old in enumerate(keep)}
    state = {}
    for name, tensor in teacher_model.state_dict().items():
        match = LAYER_KEY.search(name)
        if match is None:
            state[name] = tensor.clone()
        elif int(match.group(2)) in position:
            new = f"{match.group(1)}layer.{position[int(match.group(2))]}."
            state[name[: match.start()] + new + name[match.end() :]] = tensor.clone()
    student = type(teacher_model)(config)
    student.load_state_dict(state, strict=True)
    return student


def load_student_folder(folder: Path, task: str) -> Any:
    """A ready-made student (e.g. a pruned model): ``load_pruned`` if it says the
    folder is pruned, otherwise ``from_pretrained`` with the teacher task's auto class."""
    import transformers

    if not (folder / "config.json").is_file():
        raise UserError(f"--student {folder} is not a model folder: it has no config.json.")
    if is_pruned(folder):
        model = load_pruned(folder)
        # A pruned sentence-transformers folder loads as a SentenceTransformer; training works on
        # the transformer inside it (pooling and normalisation are applied by the objective).
        return model[0].auto_model if hasattr(model, "_first_module") else model
    cls = getattr(transformers, encoder.AUTO_CLASSES[task])
    return cls.from_pretrained(str(folder), dtype="float32")


def layer_map(keep: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """(student, teacher) ``hidden_states`` indices: embeddings ↔ embeddings, then each student
    layer's output ↔ the output of the teacher layer it was copied from."""
    return ((0, 0), *((i + 1, t + 1) for i, t in enumerate(keep)))


def hidden_width(model: Any) -> int | None:
    value = getattr(model.config, "hidden_size", None) or getattr(model.config, "dim", None)
    return int(value) if value else None


def save_student(
    student: Any, teacher_dir: Path, out_dir: Path, student_dir: Path | None = None
) -> None:
    """A normal HF model folder: weights + config, the teacher's tokenizer, and for
    sentence-transformers teachers their module files, so ``edgepack.load.model`` detects it as one.
    Files only a ready-made student folder has (e.g. pruning metadata) are carried over too."""
    out_dir.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(str(out_dir), safe_serialization=True)
    for name in (*TOKENIZER_FILES, *ST_FILES):
        if (teacher_dir / name).is_file():
            shutil.copy2(teacher_dir / name, out_dir / name)
    for sub in sorted(module_dirs(teacher_dir)):
        if (teacher_dir / sub).is_dir():
            shutil.copytree(teacher_dir / sub, out_dir / sub, dirs_exist_ok=True)
    if student_dir is not None:
        for path in sorted(student_dir.iterdir()):
            skip = path.suffix in (".safetensors", ".bin") or path.name == "checkpoints"
            if path.is_file() and not skip and not (out_dir / path.name).exists():
                shutil.copy2(path, out_dir / path.name)
