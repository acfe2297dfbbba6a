"""The CPU shim: CUDA placements become cpu, CUDA type names are reported, RNG maps to CPU.

Runs in a child process: the shim patches torch process-wide, and the pytest process is shared
with other test modules.
"""
import torch

from tests.helpers.multiproc import run_distributed


def _shim_checks():
    from maspo_megatron.parallel.cpu import cpu_shim_enabled, enable_cpu_shim

    assert not cpu_shim_enabled()
    assert enable_cpu_shim() is True
    assert enable_cpu_shim() is True
    # device redirection
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.empty(3, device=0).device.type == "cpu"
    assert torch.tensor([1.0], device=torch.device("cuda", 0)).device.type == "cpu"
    assert torch.ones(2).cuda().device.type == "cpu"
    assert torch.ones(2).to("cuda").device.type == "cpu"
    assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.current_stream().wait_stream(torch.cuda.Stream())
    # type names (clip_grads / optimizer checks) while conversions keep working
    assert torch.ones(1).type() == "torch.cuda.FloatTensor"
    assert torch.ones(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.ones(2).type(torch.float64).dtype == torch.float64
    # CUDA RNG == CPU generator; torch.manual_seed must not recurse through cuda.manual_seed_all
    torch.cuda.manual_seed(7)
    state = torch.cuda.get_rng_state()
    first = torch.rand(3)
    torch.cuda.set_rng_state(state)
    assert torch.equal(first, torch.rand(3))
    torch.manual_seed(7)
    assert torch.equal(first, torch.rand(3))
    # torch norm with sequence parallel: built, and its params marked for the TP all-reduce
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, normalization="RMSNorm",
                               tensor_model_parallel_size=2, sequence_parallel=True)
    norm = WrappedTorchNorm(config, 8)
    assert isinstance(norm, torch.nn.RMSNorm)
    assert all(getattr(p, "sequence_parallel", False) for p in norm.parameters())
    return "ok"


def test_cpu_shim_patches():
    assert run_distributed(_shim_checks, 1, timeout_s=120) == ["ok"]
