"""FP8 recipe checks: a recipe passes through to Megatron only where it can actually run.

Transformer Engine's own capability probes are used when they exist (they know the GPU and TE
build); otherwise the compute-capability floor below is applied. Every refusal is one line
naming `model.fp8` and the reason.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch

FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
# minimum CUDA compute capability per recipe (Ada/Hopper for per-tensor, Hopper for 1x128
# blocks, Blackwell for MX block scaling)
_MIN_CAPABILITY = {"delayed": (8, 9), "tensorwise": (8, 9), "blockwise": (9, 0), "mxfp8": (10, 0)}
# TE probe function per recipe (transformer_engine.pytorch.fp8); each returns (ok, reason)
_TE_PROBES = {
    "delayed": "check_fp8_support",
    "tensorwise": "check_fp8_support",
    "blockwise": "check_fp8_block_scaling_support",
    "mxfp8": "check_mxfp8_support",
}


def transformer_engine_usable() -> bool:
    """True when CUDA is present and `transformer_engine.pytorch` imports (it can raise non-ImportErrors)."""
    if not torch.cuda.is_available():
        return False
    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception:
        return False
    return True


def validate_fp8(recipe: Optional[str]) -> None:
    """Raises ValueError (one line, naming model.fp8) when `recipe` cannot run here; None is always fine."""
    if recipe is None:
        return
    if recipe not in FP8_RECIPES:
        raise ValueError(f"model.fp8: {recipe!r} is not one of {list(FP8_RECIPES)}")
    if not torch.cuda.is_available():
        raise ValueError(f"model.fp8: recipe {recipe!r} needs a CUDA GPU with Transformer Engine; none is available")
    if not transformer_engine_usable():
        raise ValueError(f"model.fp8: recipe {recipe!r} needs Transformer Engine, which is not importable here")
    fp8_module = importlib.import_module("transformer_engine.pytorch.fp8")
    probe = getattr(fp8_module, _TE_PROBES[recipe], None)
    if probe is not None:
        ok, reason = probe()
        if not ok:
            raise ValueError(f"model.fp8: recipe {recipe!r} is not supported on this GPU / TE build: {reason}")
        return
    if recipe in ("blockwise", "mxfp8"):
        raise ValueError(f"model.fp8: recipe {recipe!r} needs a newer Transformer Engine (no {_TE_PROBES[recipe]})")
    capability = torch.cuda.get_device_capability()
    if capability < _MIN_CAPABILITY[recipe]:
        raise ValueError(
            f"model.fp8: recipe {recipe!r} needs compute capability >= {_MIN_CAPABILITY[recipe]}, this GPU has {capability}"
        )
