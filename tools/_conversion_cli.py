"""Shared CLI plumbing for the converters: one-line errors instead of tracebacks, exit codes."""
from __future__ import annotations

import os
import sys
import warnings
from typing import Callable

# Megatron warns on import that TE/apex are missing; expected on CPU and noise for a converter
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

# runnable as `python tools/convert_*.py` from a checkout without installing the package
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)


def run_cli(main: Callable[[], object]) -> int:
    """Runs main(); expected failures (bad files, configs, shapes) print one line and return 2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        main()
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as exc:
        message = exc.args[0] if exc.args else str(exc)
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (no output written)", file=sys.stderr)
        return 130
    return 0
