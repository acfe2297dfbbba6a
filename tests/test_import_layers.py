"""The package's rooms and floors: a room (top-level package or module of maspo_megatron) imports
only rooms on lower floors, never one on its own floor or above, so there are no cycles between
rooms and a newcomer can read the house bottom-up. Every import counts, also those inside
functions (lazy imports are still dependencies). Adding a room means adding it to FLOORS."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "maspo_megatron"

FLOORS = {
    # 0: pure math (the losses declare their hyperparameters here, with option())
    "__init__": 0, "algorithms": 0,
    # 1: plain data: the typed config (its algorithm.<loss> sections are the losses' declarations)
    "config": 1,
    # 2: collectives, model definition, rewards
    "parallel": 2, "models": 2, "rewards": 2,
    # 3: checkpoint I/O (models + parallel), prompt data
    "checkpoint": 3, "data": 3,
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

