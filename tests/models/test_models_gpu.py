"""GPU checks of the Transformer Engine path (skipped without CUDA; without TE they skip too)."""
from __future__ import annotations

import pytest
import torch

from tests.helpers.multiproc import run_distributed

pytestmark = pytest.mark.gpu


def _te_parity_case(hf_dir: str, ckpt: str, ids: torch.Tensor) -> dict:
    from maspo_megatron.checkpoint.dist_load import load_model_weights
    from maspo_megatron.config import ModelConfig, ParallelConfig
    from maspo_megatron.models.config_builder import build_model_config
    from maspo_megatron.models.fp8 import transformer_engine_usable
    from maspo_megatron.models.provider import gpt_model_provider
    from maspo_megatron.parallel.state import init_distributed

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    init_distributed(ParallelConfig(), seed=1)
    config, meta = build_model_config(hf_dir, ModelConfig(), ParallelConfig())
    model = gpt_model_provider(config, meta).cuda().eval()
    spec_is_te = "transformer_engine" in type(model.decoder.layers[0].self_attention.linear_qkv).__module__
    load_model_weights([model], ckpt)  # the converted checkpoint, with TE's names and extra state
    with torch.no_grad():
        ids = ids.cuda()
        positions = torch.arange(ids.shape[1], device="cuda").unsqueeze(0).expand_as(ids)
        logits = model(ids, positions, None)[..., : meta.vocab_size].float().cpu()
    return {"te_usable": transformer_engine_usable(), "spec_is_te": spec_is_te, "logits": logits}


def test_te_spec_loads_converted_checkpoint_and_matches_transformers(tmp_path):
    from maspo_megatron.checkpoint.convert import hf_to_megatron
    from maspo_megatron.models.fp8 import transformer_engine_usable
    from tests.helpers.hf_models import hf_logits, save_hf_model

    if not transformer_engine_usable():
        pytest.skip("Transformer Engine not importable")
    model = save_hf_model("qwen3", tmp_path / "hf")
    hf_to_megatron(tmp_path / "hf", tmp_path / "meg", tp=1, pp=1, progress=False)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    (result,) = run_distributed(_te_parity_case, 1, str(tmp_path / "hf"), str(tmp_path / "meg"), ids, timeout_s=600, device="cuda")
    assert result["spec_is_te"]
    ref = hf_logits(model, ids)
    rel = ((result["logits"] - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-3, rel


def test_fp8_recipes_follow_the_gpu():
    from maspo_megatron.models.fp8 import transformer_engine_usable, validate_fp8

    if not transformer_engine_usable():
        with pytest.raises(ValueError, match="needs Transformer Engine"):
            validate_fp8("delayed")
        return
    capability = torch.cuda.get_device_capability()
    if capability >= (8, 9):
        validate_fp8("delayed")
        validate_fp8("tensorwise")
    else:
        with pytest.raises(ValueError, match="model.fp8"):
            validate_fp8("delayed")
    if capability < (10, 0):
        with pytest.raises(ValueError, match="model.fp8: recipe 'mxfp8'"):
            validate_fp8("mxfp8")
