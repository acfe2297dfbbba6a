"""`verify_weights`: checksums of what was sent vs what the engine holds afterwards.

A checksum is a hash of the fp32 bytes of a tensor's first `rows` rows (all rows when rows is None):
SGLang's `/get_weights_by_name` returns the first `truncate_size` rows as floats, the CPU engine
exposes whole tensors, and the fp32 image of a bf16 value is exact in both. The engine must store
the dtype the trainer sent (bf16 -> bf16, fp32 -> fp32), otherwise its rounding shows as a mismatch.
FP8-quantized tensors are checked as their raw e4m3 values and scales.
"""
from __future__ import annotations

import hashlib
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import torch

from maspo_megatron.rollout.weight_sync.transports.base import WeightSyncError


def checksum(tensor: torch.Tensor, rows: Optional[int] = None) -> str:
    """blake2b of the fp32 bytes of tensor[:rows] (shape included, so a transposed copy differs)."""
    part = tensor.detach()
    if rows is not None and part.dim() > 0:
        part = part[:rows]
    data = part.to(device="cpu", dtype=torch.float32).contiguous()
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr(tuple(data.shape)).encode())
    digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def engine_checksums(engine, names: Iterable[str], rows: Optional[int]) -> Dict[str, str]:
    """Checksums of the named tensors as the engine holds them now."""
    names = list(names)
    if hasattr(engine, "named_hf_tensors"):  # the in-process engine: read its tensors directly
        held = dict(engine.named_hf_tensors())
        return {n: checksum(held[n], rows) for n in names if n in held}
    out = {}
    for name in names:
        bodies = engine.get_weights_by_name(name, truncate_size=rows or 1 << 62)
        for url, body in bodies.items():
            values = torch.tensor(body, dtype=torch.float32)
            out.setdefault(name, checksum(values))
            if checksum(values) != out[name]:
                raise WeightSyncError(f"verify_weights: servers disagree on {name!r} ({url} differs)")
    return out


def compare(sent: Mapping[str, str], held: Mapping[str, str]) -> List[str]:
    """Names whose engine checksum differs from the sent one (or that the engine lacks)."""
    return sorted(name for name, digest in sent.items() if held.get(name) != digest)


def raise_on_mismatch(bad: List[str], version: int) -> None:
    if bad:
        shown = ", ".join(bad[:20]) + (f" (+{len(bad) - 20} more)" if len(bad) > 20 else "")
        raise WeightSyncError(f"verify_weights: after sync of version {version} the engine holds different values "
                              f"for {len(bad)} tensor(s): {shown}")


def sent_checksums(bucket: Iterable[Tuple[str, torch.Tensor]], rows: Optional[int]) -> Dict[str, str]:
    return {name: checksum(tensor, rows) for name, tensor in bucket}
