"""The family tables, layouts and config building (single process, no checkpoints on disk)."""
from __future__ import annotations

import pytest
import torch
import transformers

from maspo_megatron.config import ModelConfig, ParallelConfig
from maspo_megatron.models import FAMILIES, WeightMap, get_family, layouts, model_meta
from tests.helpers.hf_models import VARIANTS, build_hf_model, hf_config


def test_qkv_layout_is_interleaved_per_query_group():
    # 4 query heads, 2 groups, head_dim 1: rows are labelled so the expected order is explicit
    q = torch.tensor([[10.0], [11.0], [12.0], [13.0]])
    k = torch.tensor([[20.0], [21.0]])
    v = torch.tensor([[30.0], [31.0]])
    fused = layouts.merge_qkv(q, k, v, num_heads=4, num_groups=2)
    assert fused.flatten().tolist() == [10, 11, 20, 30, 12, 13, 21, 31]
    back = layouts.split_qkv(fused, num_heads=4, num_groups=2)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v), strict=True))


def test_glu_tp_shards_hold_gate_and_up_halves():
    gate = torch.arange(4.0).reshape(4, 1)
    up = 100 + torch.arange(4.0).reshape(4, 1)
    full = layouts.merge_gate_up(gate, up)
    shards = [layouts.shard_tp(full, 0, True, 2, r) for r in range(2)]
    assert shards[0].flatten().tolist() == [0, 1, 100, 101]
    assert shards[1].flatten().tolist() == [2, 3, 102, 103]
    assert torch.equal(layouts.gather_tp(shards, 0, True), full)
    row = torch.arange(12.0).reshape(3, 4)
    parts = [layouts.shard_tp(row, 1, False, 2, r) for r in range(2)]
    assert torch.equal(layouts.gather_tp(parts, 1, False), row)


def test_vocab_padding_rule():
    assert layouts.pad_vocab_size(300, 1) == 384
    assert layouts.pad_vocab_size(300, 2) == 512
    assert layouts.pad_vocab_size(256, 2) == 256
    assert layouts.pad_vocab_size(151936, 8) == 152576
    padded = layouts.pad_rows(torch.ones(3, 2), 5)
    assert padded[3:].abs().sum() == 0 and torch.equal(layouts.unpad_rows(padded, 3), torch.ones(3, 2))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_weight_map_covers_every_hf_tensor_and_round_trips(name):
    model = build_hf_model(name)
    state = model.state_dict()
    wmap = WeightMap.from_hf_config(model.config, tp=2 if not name.endswith("gqa1") else 1)
    names = wmap.hf_tensor_names()
    expected = set(state) - ({"lm_head.weight"} if model.config.tie_word_embeddings else set())
    assert sorted(names) == sorted(expected)
    rebuilt = {}
    for mt in wmap.megatron_tensors():
        full = wmap.hf_to_megatron(mt.name, state.__getitem__)
        assert tuple(full.shape) == mt.shape
        hf_parts = wmap.megatron_to_hf(mt.name, full)
        assert [n for n, _ in hf_parts] == wmap.hf_names(mt.name)
        rebuilt.update(hf_parts)
    assert all(torch.equal(rebuilt[n], state[n]) for n in names)


def test_weight_map_accepts_model_parameter_names():
    wmap = WeightMap.from_hf_config(hf_config("qwen3"), tp=2)
    # local-spec norm name, DDP/Float16Module prefixes, a PP stage whose first layer is global layer 2
    assert wmap.hf_names("module.module.decoder.layers.1.input_layernorm.weight", layer_offset=2) == [
        "model.layers.3.input_layernorm.weight"]
    assert wmap.hf_names("decoder.layers.0.pre_mlp_layernorm.weight") == ["model.layers.0.post_attention_layernorm.weight"]
    assert wmap.hf_names("decoder.layers.0.self_attention.q_layernorm.weight") == ["model.layers.0.self_attn.q_norm.weight"]
    assert wmap.tp_split("decoder.layers.0.mlp.linear_fc1.weight") == (0, True)
    assert wmap.tp_split("decoder.layers.0.self_attention.linear_proj.weight") == (1, False)
    assert wmap.tp_split("decoder.final_layernorm.weight") == (None, False)
    with pytest.raises(KeyError, match=r"decoder\.layers\.9\.mlp\.linear_fc2\.weight: layer 9 out of range"):
        wmap.hf_names("decoder.layers.9.mlp.linear_fc2.weight")
    with pytest.raises(KeyError, match="no qwen3 mapping rule"):
        wmap.hf_names("decoder.layers.0.self_attention.linear_qkv.bias")  # Qwen3 has no qkv bias
    with pytest.raises(KeyError, match="no qwen3 mapping rule"):
        wmap.hf_names("output_layer.weight")  # tied


def test_megatron_to_hf_checks_shapes():
    wmap = WeightMap.from_hf_config(hf_config("qwen2"))
    with pytest.raises(ValueError, match=r"linear_fc2\.weight: shape \(64, 95\), expected \(64, 96\)"):
        wmap.megatron_to_hf("decoder.layers.0.mlp.linear_fc2.weight", torch.zeros(64, 95))


def test_family_lookup_and_features():
    assert set(FAMILIES) == {"llama", "mistral", "qwen2", "qwen3"}
    assert get_family({"model_type": "qwen3"}).name == "qwen3"
    with pytest.raises(ValueError, match=r"model_type: 'gemma' is not a supported family"):
        get_family({"model_type": "gemma"})
    with pytest.raises(ValueError, match="mlp_bias: true is not supported for the llama family"):
        model_meta({**hf_config("llama").to_dict(), "mlp_bias": True})
    meta = model_meta(hf_config("qwen2"), tp=2)
    assert (meta.qkv_bias, meta.qk_norm, meta.padded_vocab_size, meta.tied_embeddings) == (True, False, 512, False)
    meta = model_meta(hf_config("qwen3"))
    assert (meta.qkv_bias, meta.qk_norm, meta.head_dim) == (False, True, 24)


def test_rope_settings_are_read_or_refused():
    llama = hf_config("llama").to_dict()
    meta = model_meta(llama)
    assert (meta.rope_theta, meta.rope_scaling_factor) == (500000.0, 8.0)
    legacy = {k: v for k, v in llama.items() if k != "rope_parameters"}
    legacy.update(rope_theta=1e6, rope_scaling=None)
    assert (model_meta(legacy).rope_theta, model_meta(legacy).rope_scaling_factor) == (1e6, None)
    bad = dict(llama, rope_parameters={**llama["rope_parameters"], "high_freq_factor": 2.0})
    with pytest.raises(ValueError, match=r"rope_scaling\.high_freq_factor: 2\.0 is not supported"):
        model_meta(bad)
    yarn = dict(llama, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})
    with pytest.raises(ValueError, match=r"rope_scaling\.rope_type: 'yarn' is not supported"):
        model_meta(yarn)


def test_build_model_config_from_hf_and_tiny():
    from maspo_megatron.models import build_model_config, tiny_hf_config

    config, meta = build_model_config(hf_config("qwen3"), ModelConfig(), ParallelConfig(tp=2, pp=2))
    assert (config.num_layers, config.kv_channels, config.num_query_groups, config.ffn_hidden_size) == (4, 24, 2, 96)
    assert config.qk_layernorm and not config.add_qkv_bias and config.gated_linear_unit
    assert config.normalization == "RMSNorm" and config.layernorm_epsilon == hf_config("qwen3").rms_norm_eps
    assert (config.tensor_model_parallel_size, config.pipeline_model_parallel_size) == (2, 2)
    assert meta.padded_vocab_size == 512
    with pytest.raises(ValueError, match=r"parallel\.tp: 2 does not divide num_key_value_heads \(1\)"):
        build_model_config(hf_config("qwen2_gqa1"), ModelConfig(), ParallelConfig(tp=2))
    with pytest.raises(ValueError, match=r"parallel\.pp: num_hidden_layers \(4\) is not divisible by pp x vpp \(3 x 1\)"):
        build_model_config(hf_config("qwen2"), ModelConfig(), ParallelConfig(pp=3))
    with pytest.raises(ValueError, match="'tiny' needs vocab_size"):
        build_model_config("tiny", ModelConfig(), ParallelConfig())
    cfg = ModelConfig(tiny_layers=3, tiny_hidden=48, tiny_heads=6, tiny_kv_heads=3, tiny_ffn=80)
    tiny = tiny_hf_config(cfg, vocab_size=97)
    assert isinstance(tiny, transformers.Qwen2Config)
    assert (tiny.vocab_size, tiny.num_hidden_layers, tiny.hidden_size, tiny.num_key_value_heads) == (97, 3, 48, 3)
    config, meta = build_model_config("tiny", cfg, ParallelConfig(), vocab_size=97)
    assert meta.family == "qwen2" and meta.padded_vocab_size == 128 and config.add_qkv_bias


def test_fp8_recipes_are_refused_without_gpu():
    from maspo_megatron.models import build_model_config, validate_fp8

    validate_fp8(None)
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    for recipe in ("delayed", "tensorwise", "blockwise", "mxfp8"):
        with pytest.raises(ValueError, match=f"model.fp8: recipe '{recipe}' needs a CUDA GPU"):
            validate_fp8(recipe)
    with pytest.raises(ValueError, match="model.fp8: 'e5m2' is not one of"):
        validate_fp8("e5m2")
    with pytest.raises(ValueError, match="model.fp8"):
        build_model_config(hf_config("qwen2"), ModelConfig(fp8="mxfp8"), ParallelConfig())


def test_local_layer_spec_on_cpu():
    from megatron.core.tensor_parallel import ColumnParallelLinear

    from maspo_megatron.models import layer_spec

    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    spec = layer_spec(model_meta(hf_config("qwen3")))
    attention = spec.submodules.self_attention.submodules
    assert attention.linear_qkv is ColumnParallelLinear
    assert attention.q_layernorm is not None and "Identity" not in str(attention.q_layernorm)
