"""No private name crosses a module boundary (AST scan of maspo_megatron/, tests/ and benchmarks/).

A leading underscore says "only this module uses it". Importing `_name` from another module, or
reading `module._name`, couples the two through a name that may change without notice: such a
name is made public (it is a real interface) or the caller goes through the public one. A
package's private helper module (`tests/checkpoint/_cases.py`) may be imported inside that
package only; tools/ keeps its underscored helper modules beside the scripts that run them (their
private NAMES stay private all the same). Benchmarks import nothing from tests/.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("maspo_megatron", "tests", "benchmarks")
# tools/ scripts run with tools/ on sys.path: their modules are imported by bare name
TOOL_MODULES = {path.stem for path in (REPO / "tools").glob("*.py")}
# Known crossings still to be removed, each with what is to be done (empty now). An entry that no
# longer matches anything fails the test, so the list only shrinks.
PENDING: dict[str, str] = {}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _own(module: str) -> bool:
    return module.split(".")[0] in SCANNED or module.split(".")[0] in TOOL_MODULES


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _is_module(dotted: str) -> bool:
    parts = dotted.split(".")
    base = REPO / "tools" if parts[0] in TOOL_MODULES else REPO
    target = base.joinpath(*parts)
    return target.with_suffix(".py").is_file() or (target / "__init__.py").is_file()


def _package_of(path: Path) -> str:
    return _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]


def _inside(importer_package: str, package: str) -> bool:
    return importer_package == package or importer_package.startswith(package + ".")


def _private_module_reached(module: str, importer_package: str) -> str | None:
    """The first private module on the dotted path that lies outside the importer's package, if any."""
    parts = module.split(".")
    for index, part in enumerate(parts):
        if index == 0 and part in TOOL_MODULES:
            continue  # a tools/ helper module, imported by bare name (see the module docstring)
        if _private(part) and not _inside(importer_package, ".".join(parts[:index])):
            return ".".join(parts[: index + 1])
    return None


def private_imports(path: Path) -> list[str]:
    """`file:line: what` for each private name this file takes from another module."""
    tree = ast.parse(path.read_text(), str(path))
    here, package = _module_name(path), _package_of(path)
    where = f"{path.relative_to(REPO)}"
    found, module_aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if not _own(alias.name):
                    continue
                reached = _private_module_reached(alias.name, package)
                if reached:
                    found.append(f"{where}:{node.lineno}: import {reached}")
                module_aliases[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else ""
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level and _own(node.module):
            reached = _private_module_reached(node.module, package)
            if reached:
                found.append(f"{where}:{node.lineno}: from {reached}")
            for alias in node.names:
                dotted = f"{node.module}.{alias.name}"
                if _is_module(dotted):
                    module_aliases[alias.asname or alias.name] = dotted
                    if _private(alias.name) and not _inside(package, node.module):
                        found.append(f"{where}:{node.lineno}: module {dotted}")
                elif _private(alias.name) and node.module != here:
                    found.append(f"{where}:{node.lineno}: {dotted}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name):
            if node.value.id in module_aliases and module_aliases[node.value.id]:
                found.append(f"{where}:{node.lineno}: {module_aliases[node.value.id]}.{node.attr}")
    return found


def _scanned_files():
    for top in SCANNED:
        yield from sorted((REPO / top).rglob("*.py"))


def _without_line(found: str) -> str:
    """`file:line: what` -> `file: what` (the PENDING key)."""
    location, what = found.split(": ", 1)
    return f"{location.rpartition(':')[0]}: {what}"


def test_no_private_name_is_imported_from_another_module():
    found = [line for path in _scanned_files() for line in private_imports(path)]
    new = [line for line in found if _without_line(line) not in PENDING]
    assert new == [], "make the name public or use the public interface:\n" + "\n".join(new)
    stale = sorted(PENDING.keys() - {_without_line(line) for line in found})
    assert stale == [], "fixed: remove these from PENDING"


def test_benchmarks_import_nothing_from_tests():
    found = []
    for path in sorted((REPO / "benchmarks").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.relative_to(REPO)}:{node.lineno}: {name}" for name in names
                      if name.split(".")[0] == "tests"]
    assert found == []


def test_the_scan_sees_each_kind_of_crossing(tmp_path):
    """The scanner itself: each way of reaching a private name is reported, the allowed ones are not."""
    probe = REPO / "tests" / "trainer" / "_private_names_probe.py"
    probe.write_text(
        "from maspo_megatron.trainer import train_step\n"
        "from maspo_megatron.trainer.checkpoint import _prune\n"        # a private function
        "from tests.parallel import _logprob_reference\n"               # another package's private module
        "from tests.parallel._logprob_reference import rel_err\n"       # the same, by its path
        "from tests.trainer import _rewards\n"                          # this package's helper: allowed
        "from maspo_megatron.trainer.train_step import pack_mini_batches\n"  # public: allowed
        "train_step._run\n"                                             # attribute of a module
        "object()._hidden\n")                                           # not a module: not ours to judge
    try:
        found = [line.split(": ", 1)[1] for line in private_imports(probe)]
    finally:
        probe.unlink()
    assert found == ["maspo_megatron.trainer.checkpoint._prune", "module tests.parallel._logprob_reference",
                     "from tests.parallel._logprob_reference", "maspo_megatron.trainer.train_step._run"]
