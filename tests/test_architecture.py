"""The import graph of maspo_megatron, read from the source (AST, nothing imported).

Floors: a package ("room") may import its own modules and rooms on LOWER floors only, so there are
no cycles between rooms and nothing reaches upward. `data/` holds no RL logic (it imports neither
`rewards` nor `algorithms`); `algorithms/` is pure tensor math (no torch.distributed, no Megatron).
The private-name rule (no `_name` imported from another module) is in test_private_names.py.
"""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "maspo_megatron"

# room -> floor. A new package gets a floor here (the lowest one that holds everything it imports).
FLOORS = {
    "utils": 0, "algorithms": 0,
    "config": 1,
    "parallel": 2, "models": 2, "rewards": 2, "data": 2,
    "rollout": 3, "checkpoint": 3,
    "trainer": 4, "launch": 4,
    "train": 5,
    "__main__": 6, "__init__": 6,
}


def _room(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else parts[0].removesuffix(".py")


def _imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every absolute import, function-level and TYPE_CHECKING ones included."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                found.append((node.lineno, "<relative import>"))
            elif node.module:
                found.append((node.lineno, node.module))
    return found


def _room_edges() -> list[tuple[str, str, str]]:
    """(importing room, imported room, "file:line") for every import between two rooms."""
    edges = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _room(path)
        for line, module in _imported_modules(ast.parse(path.read_text(), str(path))):
            parts = module.split(".")
            if module == "<relative import>":
                edges.append((source, module, f"{path.relative_to(REPO)}:{line}"))
            elif parts[0] == "maspo_megatron" and len(parts) > 1 and parts[1] != source:
                edges.append((source, parts[1], f"{path.relative_to(REPO)}:{line}"))
    return edges


def test_every_room_has_a_floor():
    rooms = {_room(path) for path in PACKAGE.rglob("*.py")}
    assert rooms - FLOORS.keys() == set(), "give the new package a floor in FLOORS"


def test_rooms_import_only_lower_floors():
    upward = [f"{where}: {source} (floor {FLOORS.get(source)}) imports {target} (floor {FLOORS.get(target)})"
              for source, target, where in _room_edges()
              if target not in FLOORS or FLOORS[target] >= FLOORS.get(source, -1)]
    assert upward == []


def test_data_holds_no_rl_logic():
    rl = [f"{where}: data imports {target}" for source, target, where in _room_edges()
          if source == "data" and target in ("rewards", "algorithms")]
    assert rl == []


def test_algorithms_are_pure_tensor_math():
    offenders = []
    for path in sorted((PACKAGE / "algorithms").rglob("*.py")):
        for line, module in _imported_modules(ast.parse(path.read_text())):
            if module.startswith(("torch.distributed", "megatron")):
                offenders.append(f"{path.relative_to(REPO)}:{line}: {module}")
    assert offenders == []


def _type_checking_names(module_path: Path) -> dict:
    """The names a module imports under `if TYPE_CHECKING:`, imported for real."""
    namespace: dict = {}
    for node in ast.parse(module_path.read_text()).body:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            exec(compile(ast.Module(body=node.body, type_ignores=[]), str(module_path), "exec"), namespace)
    return namespace


@pytest.mark.parametrize("name", ["DriverContext", "Group"])
def test_the_driver_context_is_typed(name):
    import typing

    from maspo_megatron.trainer import rollout_phase

    cls = getattr(rollout_phase, name)
    hints = typing.get_type_hints(cls, globalns=vars(rollout_phase),
                                  localns=_type_checking_names(Path(rollout_phase.__file__)))
    untyped = [f.name for f in dataclasses.fields(cls) if hints[f.name] in (typing.Any, object, list, dict)
               or "Any" in str(hints[f.name])]
    assert untyped == []
