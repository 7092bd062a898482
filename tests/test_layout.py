"""The package's dependency rules (CONTRIBUTING.md), read from the source with ``ast``.

Every import counts, including the ones inside functions: a loop through a lazy import is still a
loop a reader has to untangle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "edgepack"
# The floor: records, errors, settings, profile loading, texts and metrics, model families.
FLOOR = {
    "artifacts",
    "cache",
    "calibration",
    "config",
    "errors",
    "evaldata",
    "evaluate",
    "families",
    "folders",
    "jsontext",
    "memory",
    "metrics",
    "profiles",
    "progress",
}
STAGES = {"load", "export", "quantize", "prune", "distill", "bundle"}
# Orchestration above the stages: the build, what finishes it, and the commands.
TOP = {
    "pipeline",
    "decoder_build",
    "decoder_before_export",
    "decoder_manifest",
    "decoder_eval",
    "decoder_report",
    "report",
    "summary",
    "rebuild",
    "evaluable",
    "device",
    "cli",
}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of edgepack except the standalone harness."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[1:2] == ["harness"]:
            continue
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """edgepack modules imported anywhere in ``path`` (``from pkg import name`` may name a module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "edgepack"}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if node.module.split(".")[0] != "edgepack":
                continue
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names} & set(MODULES)
    return out & set(MODULES)


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def _room(module: str) -> str:
    """The top-level part of edgepack a module belongs to: ``edgepack.prune.obs`` -> ``prune``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _edges_without_package_inits() -> dict[str, set[str]]:
    """A package's ``__init__`` only re-exports its own modules; it is not a step of a loop."""
    packages = {name for name, path in MODULES.items() if path.name == "__init__.py"}
    return {m: {d for d in deps if d not in packages and d != m} for m, deps in GRAPH.items()}


def test_every_module_is_in_a_known_room() -> None:
    rooms = {_room(m) for m in MODULES} - {""}
    assert rooms <= FLOOR | STAGES | TOP, rooms - (FLOOR | STAGES | TOP)


def test_no_import_loops_between_modules() -> None:
    assert _cycle(_edges_without_package_inits()) is None


def test_no_import_loops_between_rooms() -> None:
    rooms: dict[str, set[str]] = {}
    for module, deps in GRAPH.items():
        rooms.setdefault(_room(module), set()).update(_room(d) for d in deps if d != "edgepack")
    for room, deps in rooms.items():
        deps.discard(room)
    assert _cycle(rooms) is None


def test_only_the_cli_imports_click() -> None:
    users = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(n.split(".")[0] == "click" for n in names) and _room(name) != "cli":
                users.append(name)
    assert users == []


def test_commands_never_import_each_other_or_the_group() -> None:
    bad = [
        (m, d)
        for m, deps in GRAPH.items()
        if m.startswith("edgepack.cli.") and m != "edgepack.cli.__main__"
        for d in deps
        if _room(d) == "cli" and d != "edgepack.cli.types"
    ]
    assert bad == []


def test_the_floor_imports_only_the_floor() -> None:
    bad = [
        (m, d)
        for m, deps in GRAPH.items()
        if _room(m) in FLOOR
        for d in deps
        if d != "edgepack" and _room(d) not in FLOOR
    ]
    assert bad == []


def test_stages_use_each_other_only_through_the_package() -> None:
    """Another stage's ``edgepack.<stage>.<module>`` is its private business."""
    bad = [
        (m, d)
        for m, deps in GRAPH.items()
        for d in deps
        if _room(d) in STAGES and _room(d) != _room(m) and d != f"edgepack.{_room(d)}"
    ]
    assert bad == []


def test_stages_never_import_the_orchestration_or_device_tools() -> None:
    bad = [
        (m, d)
        for m, deps in GRAPH.items()
        if _room(m) in STAGES | FLOOR
        for d in deps
        if _room(d) in TOP
    ]
    assert bad == []


def test_helpers_inside_a_stage_never_import_its_stage_module() -> None:
    bad = [
        (m, d)
        for m, deps in GRAPH.items()
        for d in deps
        if d.endswith(".stage") and _room(d) == _room(m) and m != f"edgepack.{_room(m)}"
    ]
    assert bad == []


def test_only_families_name_the_encoder_tasks() -> None:
    """Family knowledge has one home: a stage asks the family instead of spelling tasks out."""
    offenders = [
        name
        for name, path in MODULES.items()
        if _room(name) not in ("families", "cli", "")
        and '"token-classification"' in path.read_text(encoding="utf-8")
    ]
    assert offenders == []


def test_modules_stay_small() -> None:
    long = {
        name: n
        for name, path in MODULES.items()
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}


def test_functions_stay_short_or_say_why() -> None:
    """A longer function must give its reason in the docstring ("Long because ...")."""
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            size = node.end_lineno - node.lineno + 1
            doc = ast.get_docstring(node) or ""
            if size > MAX_FUNCTION_LINES and "Long because" not in doc:
                long.append(f"{name}.{node.name} ({size} lines)")
    assert long == []


def test_every_package_folder_ships_in_the_wheel() -> None:
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")}
    assert folders <= listed, folders - listed


@pytest.mark.parametrize("path", sorted((PACKAGE / "harness").glob("*.py")), ids=lambda p: p.name)
def test_the_harness_imports_nothing_of_edgepack(path: Path) -> None:
    assert not any(
        d.split(".")[0] == "edgepack"
        for d in (
            [
                a.name
                for n in ast.walk(ast.parse(path.read_text()))
                if isinstance(n, ast.Import)
                for a in n.names
            ]
            + [
                n.module or ""
                for n in ast.walk(ast.parse(path.read_text()))
                if isinstance(n, ast.ImportFrom)
            ]
        )
    )
