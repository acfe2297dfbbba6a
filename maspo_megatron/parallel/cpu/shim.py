"""Let Megatron-Core run on CPU over gloo when CUDA is absent.

`enable_cpu_shim()` is idempotent and does nothing when CUDA is available. It must run before
Megatron code that touches CUDA (parallel_state init, model build, schedules, optimizer); calling
it at the top of a rank's entry point is enough. `state.init_distributed` calls it.

Each patch and why (Megatron-Core 0.16.1, checked again against 0.19 where noted):

1. `torch.cuda.current_device()` -> torch.device("cpu"). Megatron passes it as `device=` in ~50
   places (p2p, grad buffers, distributed optimizer, and the backward of the sequence-parallel
   linear layers). Returning the cpu device itself (not an index for patch 5 to rewrite) matters
   for the backward passes: autograd runs custom Function backwards without the
   TorchFunctionMode of patch 5, so only a real cpu device works there.
2. CUDA RNG: `torch.cuda.get_rng_state/set_rng_state/manual_seed/manual_seed_all` and
   Megatron's own `_get_cuda_rng_state/_set_cuda_rng_state` (tensor_parallel/random.py) map to
   the CPU default generator. `model_parallel_cuda_manual_seed` and the RNG tracker's `fork()`
   then swap CPU generator states, which is what CPU-side dropout/init actually draw from.
3. `synchronize`, `empty_cache`, `current_stream`, `default_stream`, `Stream`, `stream`,
   `Event`: no-ops / inert stand-ins (p2p synchronises after batched isend/irecv; 0.19's
   schedules ask for the current stream; the grad buffers wait on streams).
4. `WrappedTorchNorm` asserts `not config.sequence_parallel`. With sequence parallel the norm
   sees a sequence shard, so its weight gradient is partial: we build the same torch norm and
   mark its parameters `sequence_parallel = True`, exactly what apex/TE norms do, so
   `finalize_model_grads` all-reduces those grads over TP.
5. A `TorchFunctionMode` (entered once, stays on the mode stack of the thread that enabled it):
   - any `device=` that means CUDA ("cuda", "cuda:N", torch.device("cuda"), an int) -> cpu
     (schedules: `torch.zeros(..., device="cuda")`, clip_grads, optimizer scalars);
   - `Tensor.cuda()` -> the tensor itself; `Tensor.to("cuda"...)` -> cpu;
   - `Tensor.type()` with no argument reports the CUDA type name ('torch.cuda.FloatTensor'):
     `clip_grads` asserts it and the (distributed) optimizer only accepts CUDA type names when
     sorting params into fp32 / fp16 groups.
   The mode costs roughly 20% of a tiny model's step time on CPU; it is never installed on GPU.
6. `DistributedOptimizer.load_state_dict` runs under `torch.no_grad()`: with fp32 params on
   CPU the main params are the model params themselves (leaf tensors requiring grad), and the
   state load copies into them in place, which autograd refuses outside no_grad.

Limits: the mode is thread-local (enable the shim in each thread that runs Megatron code;
autograd's backward on CPU runs in the calling thread). `torch.cuda.is_available()` stays
False, so code that branches on it keeps taking its CPU path.
"""
from __future__ import annotations

import contextlib
import functools
import threading

import torch
from torch.overrides import TorchFunctionMode

_LOCK = threading.Lock()
_ENABLED = False
_MODE: TorchFunctionMode | None = None

_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


def _is_cuda_device(device) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placements to cpu and reports CUDA type names (patch 5)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            tensor = args[0]
            if tensor.device.type == "cpu" and tensor.dtype in _CUDA_TYPE_NAMES:
                return _CUDA_TYPE_NAMES[tensor.dtype]
        if func is torch.Tensor.cuda:
            return args[0]
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _NullStream:
    """Inert stand-in for torch.cuda.Stream / Event (patch 3)."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        return None

    def wait_event(self, *args, **kwargs):
        return None

    def record_event(self, *args, **kwargs):
        return _NullStream()

    def record(self, *args, **kwargs):
        return None

    def synchronize(self):
        return None

    def query(self):
        return True


def _cpu_rng_get(device="cuda", *args, **kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_rng_set(new_state, device=-1, *args, **kwargs) -> None:
    torch.set_rng_state(new_state)


def _patch_cuda_module() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: torch.device("cpu")
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda *a, **k: None
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.Stream = _NullStream
    cuda.Event = _NullStream
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.get_rng_state = _cpu_rng_get
    cuda.set_rng_state = _cpu_rng_set
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly
    # here (never through torch.manual_seed, which would recurse) and make *_all a no-op.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None
    cuda.random.get_rng_state = _cpu_rng_get
    cuda.random.set_rng_state = _cpu_rng_set


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = _cpu_rng_get
    mcore_random._set_cuda_rng_state = _cpu_rng_set


def _patch_torch_norm() -> None:
    from megatron.core.transformer import torch_norm

    def norm_new(cls, config, hidden_size, eps=1e-5, persist_layer_norm=False,
                 zero_centered_gamma=False, normalization="LayerNorm"):
        if config.layernorm_zero_centered_gamma:
            raise ValueError("layernorm_zero_centered_gamma: not supported by torch norms")
        norm_cls = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}.get(config.normalization)
        if norm_cls is None:
            raise ValueError(f"normalization: {config.normalization!r} is not LayerNorm or RMSNorm")
        norm = norm_cls(normalized_shape=hidden_size, eps=eps)
        if config.sequence_parallel:
            for param in norm.parameters():
                param.sequence_parallel = True
        return norm

    torch_norm.WrappedTorchNorm.__new__ = norm_new


def _patch_distrib_optimizer_load() -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer.load_state_dict
    if getattr(original, "_maspo_no_grad", False):
        return

    @functools.wraps(original)
    def load_state_dict(self, *args, **kwargs):
        with torch.no_grad():
            return original(self, *args, **kwargs)

    load_state_dict._maspo_no_grad = True
    DistributedOptimizer.load_state_dict = load_state_dict


def enable_cpu_shim() -> bool:
    """Installs every patch above once per process (the mode: once per calling thread).

    Returns True when the shim is active, False when CUDA is available (nothing is patched).
    """
    global _ENABLED, _MODE
    if torch.cuda.is_available():
        return False
    with _LOCK:
        if not _ENABLED:
            _patch_cuda_module()
            _patch_megatron_rng()
            _patch_torch_norm()
            _patch_distrib_optimizer_load()
            _MODE = _CudaToCpuMode()
            _ENABLED = True
        if not _mode_active():
            _MODE.__enter__()
    return True


def _mode_active() -> bool:
    from torch.overrides import _get_current_function_mode_stack

    return any(mode is _MODE for mode in _get_current_function_mode_stack())


def cpu_shim_enabled() -> bool:
    return _ENABLED
