"""The package's rooms and floors: a room (top-level package or module of maspo_megatron) imports
only rooms on lower floors, never one on its own floor or above, so there are no cycles between
rooms and a newcomer can read the house bottom-up. Every import counts, also those inside
functions (lazy imports are still dependencies). Adding a room means adding it to FLOORS.

Rules beyond the floors: `data/` holds no RL logic (imports neither `rewards` nor `algorithms`:
dynamic sampling lives beside the rollout phase in trainer/); `algorithms/` is pure tensor math
(no torch.distributed, no Megatron); the driver's context is typed (no `Any` fields)."""
from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "maspo_megatron"

FLOORS = {
    # 0: pure math (the losses declare their hyperparameters here, with option()), small helpers
    "__init__": 0, "algorithms": 0, "utils": 0,
    # 1: plain data: the typed config (its algorithm.<loss> sections are the losses' declarations)
    "config": 1,
    # 2: collectives, model definition, rewards, prompt data
    "parallel": 2, "models": 2, "rewards": 2, "data": 2,
    # 3: checkpoint I/O (models + parallel)
    "checkpoint": 3,
    # 4: rollout engines and weight transports
    "rollout": 4,
    # 5: the RL loop, launchers
    "trainer": 5, "launch": 5,
    # 6, 7: entry points (`python -m maspo_megatron` dispatches to `maspo_megatron.train`)
    "train": 6, "__main__": 7,
}


def _room_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    return parts[0][: -len(".py")] if len(parts) == 1 else parts[0]


def _imported_rooms(path: Path) -> set[tuple[str, int]]:
    """(room, line) for every absolute `maspo_megatron.<room>...` import in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] if node.module != "maspo_megatron" else [f"maspo_megatron.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "maspo_megatron" and len(parts) > 1:
                found.add((parts[1], node.lineno))
    return found


def test_every_room_has_a_floor():
    rooms = {_room_of(path) for path in PACKAGE.rglob("*.py")}
    assert rooms == set(FLOORS), f"rooms without a floor: {sorted(rooms - set(FLOORS))}; " \
                                 f"floors without a room: {sorted(set(FLOORS) - rooms)}"


def test_rooms_import_only_lower_floors():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        room = _room_of(path)
        for target, line in sorted(_imported_rooms(path)):
            if target != room and FLOORS.get(target, 99) >= FLOORS[room]:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {room} (floor {FLOORS[room]}) imports "
                              f"{target} (floor {FLOORS.get(target, '?')})")
    assert not upward, "imports that do not go down a floor:\n" + "\n".join(upward)



def _imports_of(room: str) -> list[tuple[Path, str, int]]:
    """(file, imported module, line) of every absolute import in the room's files."""
    found = []
    for path in sorted((PACKAGE / room).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                found += [(path, alias.name, node.lineno) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.append((path, node.module, node.lineno))
    return found


def test_data_holds_no_rl_logic():
    rl = [f"{path.relative_to(PACKAGE.parent)}:{line}: {module}" for path, module, line in _imports_of("data")
          if module.startswith(("maspo_megatron.rewards", "maspo_megatron.algorithms"))]
    assert rl == []


def test_algorithms_are_pure_tensor_math():
    found = [f"{path.relative_to(PACKAGE.parent)}:{line}: {module}" for path, module, line in _imports_of("algorithms")
             if module.startswith(("torch.distributed", "megatron"))]
    assert found == []


def _type_checking_names(module_path: Path) -> dict:
    """The names a module imports under `if TYPE_CHECKING:`, imported for real."""
    namespace: dict = {}
    for node in ast.parse(module_path.read_text()).body:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            exec(compile(ast.Module(body=node.body, type_ignores=[]), str(module_path), "exec"), namespace)
    return namespace


@pytest.mark.parametrize("name", ["DriverContext", "Group"])
def test_the_driver_context_is_typed(name):
    from maspo_megatron.trainer import rollout_phase

    cls = getattr(rollout_phase, name)
    hints = typing.get_type_hints(cls, globalns=vars(rollout_phase),
                                  localns=_type_checking_names(Path(rollout_phase.__file__)))
    untyped = [field.name for field in dataclasses.fields(cls)
               if hints[field.name] in (typing.Any, object, list, dict) or "Any" in str(hints[field.name])]
    assert untyped == []
