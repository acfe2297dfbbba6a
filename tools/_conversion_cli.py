"""Lets `python tools/convert_*.py` run from a checkout without installing the package (puts the repo
root on sys.path). The command lines themselves: maspo_megatron/checkpoint/convert_cli.py."""
from __future__ import annotations

import os
import sys

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)
