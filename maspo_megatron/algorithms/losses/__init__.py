"""Built-in policy losses, one module per family; importing this package registers every module in it,
so a new loss is one new file here (plus its test)."""
import importlib
import pkgutil


def _import_all() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


_import_all()
