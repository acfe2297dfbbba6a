"""SGLang 0.5.23's own code as the judge of what the trainer sends (no typed-by-hand field lists).

SGLang cannot run on a CPU machine, but its Python source installs there (`tools/install_sglang_src.sh`:
`pip install --no-deps --target .sglang-src sglang==0.5.23 msgspec`). From that source this module takes:
- `generate_contract()`: `sglang/api/v1/api_types.py`, the generated `/generate` contract decoder
  (`GenerateRequest.from_json_value` raises `JsonContractError`, which the server answers with 400);
  it needs only msgspec and is loaded by file path (importing `sglang` itself needs CUDA packages).
- `request_fields()`: the request structs of `sglang/srt/managers/io_struct.py`, read with `ast`:
  every field (own and inherited) and the required ones. Those endpoints IGNORE unknown keys, so a
  misspelt field is dropped silently on the real server; the stand-in refuses it instead.
- `routes()`: `sglang/srt/entrypoints/http_server.py` read with `ast`: path -> (methods, request struct).
- `tensor_bucket()`: `sglang/srt/weight_sync/tensor_bucket.py` (`FlattenedTensorBucket`, imports
  standalone with torch), registered under its real module name so payloads unpickle into its class.
- `weights_by_name_architectures()`: the model classes whose SGLang implementation has `get_weights_by_name`.

Where the source is: `$MASPO_SGLANG_SRC` (a directory holding `sglang/`), else `<repo>/.sglang-src`,
else an installed `sglang` package (found without importing it). `sglang_root()` is None when absent;
`require_sglang()` skips the calling test with the reason.
"""
from __future__ import annotations

import ast
import functools
import importlib.util
import os
import sys
import threading
import types
from pathlib import Path
from typing import Optional

SGLANG_VERSION = "0.5.23"
_REPO_ROOT = Path(__file__).resolve().parents[2]
MISSING_REASON = (f"sglang {SGLANG_VERSION} source not found: run tools/install_sglang_src.sh "
                  "(or set MASPO_SGLANG_SRC to a directory holding sglang/)")


@functools.lru_cache(maxsize=1)
def sglang_root() -> Optional[Path]:
    """The directory that holds the `sglang/` package of 0.5.23, or None."""
    candidates = []
    if os.environ.get("MASPO_SGLANG_SRC"):
        candidates.append(Path(os.environ["MASPO_SGLANG_SRC"]))
    candidates.append(_REPO_ROOT / ".sglang-src")
    spec = importlib.util.find_spec("sglang")  # a top-level find_spec does not execute the package
    if spec is not None and spec.submodule_search_locations:
        candidates.append(Path(list(spec.submodule_search_locations)[0]).parent)
    for root in candidates:
        if (root / "sglang" / "srt" / "managers" / "io_struct.py").is_file():
            return root
    return None


def require_sglang() -> Path:
    """The source root; skips the calling test when it is absent."""
    import pytest

    root = sglang_root()
    if root is None:
        pytest.skip(MISSING_REASON)
    return root


def _source(relative: str) -> Path:
    root = sglang_root()
    if root is None:
        raise FileNotFoundError(MISSING_REASON)
    return root / "sglang" / relative


def _load_by_path(module_name: str, path: Path):
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def _import_msgspec() -> None:
    """msgspec from the venv, or from the source root (install_sglang_src.sh puts it there)."""
    try:
        import msgspec  # noqa: F401
        return
    except ImportError:
        pass
    root = str(sglang_root())
    sys.path.insert(0, root)
    try:
        import msgspec  # noqa: F401
    finally:
        sys.path.remove(root)


@functools.lru_cache(maxsize=1)
def generate_contract():
    """SGLang's generated API module (`GenerateRequest`, `JsonContractError`, ...), or None without msgspec."""
    try:
        _import_msgspec()
    except ImportError:
        return None
    return _load_by_path("maspo_sglang_api_types", _source("api/v1/api_types.py"))


def generate_contract_error(body) -> Optional[str]:
    """SGLang's verdict on a parsed `/generate` body: None when accepted, else the 400 message
    (http_server.py `generate_request` calls the same decoder before serving)."""
    contract = generate_contract()
    if contract is None:
        raise ImportError("msgspec is needed for SGLang's /generate contract decoder: " + MISSING_REASON)
    try:
        contract.GenerateRequest.from_json_value(body)
    except contract.JsonContractError as exc:
        return str(exc)
    return None


def _class_fields(tree: ast.Module) -> dict[str, tuple[list[str], dict[str, bool]]]:
    """class name -> (base names, {field: required}) for every class of a module."""
    classes = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = {}
        for item in node.body:
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                annotation = ast.unparse(item.annotation)
                if annotation.startswith("ClassVar"):
                    continue
                fields[item.target.id] = item.value is None
        bases = [ast.unparse(base) for base in node.bases]
        classes[node.name] = (bases, fields)
    return classes


@functools.lru_cache(maxsize=1)
def request_fields() -> dict[str, dict[str, bool]]:
    """io_struct.py struct name -> {field: required}, inherited fields included (e.g. BaseReq's rid)."""
    classes = _class_fields(ast.parse(_source("srt/managers/io_struct.py").read_text()))

    def resolve(name: str) -> dict[str, bool]:
        bases, own = classes[name]
        merged: dict[str, bool] = {}
        for base in bases:
            if base in classes:
                merged.update(resolve(base))
        merged.update(own)
        return merged

    return {name: resolve(name) for name in classes}


def _route_of(decorator: ast.expr) -> Optional[tuple[str, tuple[str, ...]]]:
    """`@app.post("/x")`, `@app.get("/x")` or `@app.api_route("/x", methods=[...])` -> (path, methods)."""
    if not (isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Attribute)
            and isinstance(decorator.func.value, ast.Name) and decorator.func.value.id == "app"):
        return None
    kind = decorator.func.attr
    if not decorator.args or not isinstance(decorator.args[0], ast.Constant):
        return None  # a path read from an environment variable: not a fixed route
    path = decorator.args[0].value
    if kind in ("get", "post", "put", "delete"):
        return path, (kind.upper(),)
    if kind == "api_route":
        for keyword in decorator.keywords:
            if keyword.arg == "methods":
                return path, tuple(ast.literal_eval(keyword.value))
        return path, ("GET",)
    return None


def _request_struct(function: ast.AST) -> Optional[str]:
    """The io_struct class of a handler's `obj` parameter (`obj: X` or `obj: Annotated[X, Body()]`)."""
    for arg in function.args.args:
        if arg.arg != "obj" or arg.annotation is None:
            continue
        text = ast.unparse(arg.annotation)
        for prefix in ("Annotated[Optional[", "Annotated[", "Optional["):
            if text.startswith(prefix):
                text = text[len(prefix):]
        return text.split(",")[0].split("]")[0].strip()
    return None


@functools.lru_cache(maxsize=1)
def routes() -> dict[str, tuple[frozenset, Optional[str]]]:
    """http_server.py route path -> (HTTP methods, request struct name or None)."""
    tree = ast.parse(_source("srt/entrypoints/http_server.py").read_text())
    out: dict[str, tuple[frozenset, Optional[str]]] = {}
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for decorator in node.decorator_list:
            route = _route_of(decorator)
            if route is None:
                continue
            path, methods = route
            previous = out.get(path, (frozenset(), None))
            out[path] = (previous[0] | frozenset(methods), _request_struct(node) or previous[1])
    return out


_TENSOR_BUCKET_LOCK = threading.Lock()


def tensor_bucket():
    """`sglang.srt.weight_sync.tensor_bucket` (FlattenedTensorBucket, FlattenedTensorMetadata), loaded
    under its real name so pickles that name its metadata class resolve to it. Locked: two stand-in
    servers of one process must not see the module half-executed (it is in sys.modules from the start)."""
    with _TENSOR_BUCKET_LOCK:
        return _load_tensor_bucket()


def _load_tensor_bucket():
    name = "sglang.srt.weight_sync.tensor_bucket"
    if name in sys.modules:
        return sys.modules[name]
    # pickle imports the parents of a class's module: empty stand-ins (no submodules: importing anything
    # else of sglang still fails with ImportError, as without the source)
    parts = name.split(".")
    for depth in range(1, len(parts)):
        parent = ".".join(parts[:depth])
        if parent not in sys.modules:
            stub = types.ModuleType(parent)
            stub.__path__ = []
            sys.modules[parent] = stub
    return _load_by_path(name, _source("srt/weight_sync/tensor_bucket.py"))


def _has_method(classes: dict, name: str, method: str, seen: frozenset = frozenset()) -> bool:
    """Class `name` of one module (`classes`: name -> ClassDef) defines `method`, itself or via a base there."""
    node = classes.get(name)
    if node is None or name in seen:
        return False
    if any(isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name == method for item in node.body):
        return True
    return any(_has_method(classes, ast.unparse(base), method, seen | {name}) for base in node.bases)


@functools.lru_cache(maxsize=1)
def weights_by_name_architectures() -> frozenset:
    """HF architecture names (a model file's `EntryClass`) whose SGLang model class defines
    `get_weights_by_name`, directly or through a base class of the same file."""
    found = set()
    for path in sorted(_source("srt/models").glob("*.py")):
        tree = ast.parse(path.read_text())
        classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}

        for node in tree.body:
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "EntryClass" for t in node.targets):
                value = node.value
                names = [ast.unparse(e) for e in value.elts] if isinstance(value, (ast.List, ast.Tuple)) else [ast.unparse(value)]
                found.update(name for name in names if _has_method(classes, name, "get_weights_by_name"))
    return frozenset(found)
