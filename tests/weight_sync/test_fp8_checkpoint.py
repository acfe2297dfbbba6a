"""The block-FP8 start checkpoint of FP8 rollouts (tools/write_fp8_checkpoint.py): it round-trips to the
BF16 weights within e4m3's rounding, keeps what HF FP8 checkpoints keep, and refuses a TP size whose
shards would split 128-blocks (checked on real model shapes)."""
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from maspo_megatron.rollout.weight_sync.fp8_checkpoint import check_tp_blocks

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "write_fp8_checkpoint.py"


def _bf16_model_dir(path: Path) -> dict:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    with torch.no_grad():
        for param in model.parameters():  # a wide dynamic range inside blocks
            param.mul_(torch.logspace(-3, 1, param.shape[-1], dtype=torch.float32).to(param.dtype))
    model.save_pretrained(path, safe_serialization=True)
    (path / "tokenizer_config.json").write_text("{}")
    return {k: v.clone() for k, v in model.state_dict().items()}


def _run(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, timeout=300)


def test_fp8_checkpoint_round_trips_to_bf16_within_e4m3_error(tmp_path):
    original = _bf16_model_dir(tmp_path / "bf16")
    result = _run("--hf-dir", tmp_path / "bf16", "--out-dir", tmp_path / "fp8", "--tp-size", "2")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "fp8"
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                             "weight_block_size": [128, 128]}
    assert (out / "tokenizer_config.json").exists()
    saved = {}
    for shard in out.glob("*.safetensors"):
        saved.update(load_file(str(shard)))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(saved)
    linear = [n for n in original if n.endswith("proj.weight")]
    assert len(linear) == 14
    for name, want in original.items():
        if name not in linear:  # embeddings, lm_head, norms: bit for bit
            assert saved[name].dtype == want.dtype and torch.equal(saved[name], want), name
            continue
        w_fp8, scale = saved[name], saved[name[: -len("weight")] + "weight_scale_inv"]
        assert w_fp8.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
        rows, cols = want.shape
        assert scale.shape == (-(-rows // 128), -(-cols // 128))
        # an independent float64 dequantization and e4m3's bound: 2^-4 relative (3 mantissa bits, round to
        # nearest), 2^-10 x scale absolute below the smallest normal
        full_scale = scale.double().repeat_interleave(128, 0).repeat_interleave(128, 1)[:rows, :cols]
        restored = w_fp8.double() * full_scale
        exact = want.double()
        assert ((restored - exact).abs() <= exact.abs() * 2.0 ** -4 + full_scale * 2.0 ** -10).all(), name
        assert (restored - exact).abs().max() > 0  # it really is quantized


def test_tp_sizes_that_split_blocks_are_refused(tmp_path):
    _bf16_model_dir(tmp_path / "bf16")
    result = _run("--hf-dir", tmp_path / "bf16", "--out-dir", tmp_path / "fp8", "--tp-size", "4")
    assert result.returncode == 2 and "splits FP8 blocks" in result.stderr and "tp_size 4" in result.stderr
    assert not (tmp_path / "fp8").exists()
    assert _run("--hf-dir", tmp_path / "nope", "--out-dir", tmp_path / "x").returncode == 2


def _shapes(hidden, heads, kv_heads, head_dim, ffn):
    prefix = "model.layers.0."
    return {prefix + "self_attn.q_proj.weight": [heads * head_dim, hidden],
            prefix + "self_attn.k_proj.weight": [kv_heads * head_dim, hidden],
            prefix + "self_attn.o_proj.weight": [hidden, heads * head_dim],
            prefix + "mlp.up_proj.weight": [ffn, hidden], prefix + "mlp.down_proj.weight": [hidden, ffn]}


def test_block_check_on_real_shapes():
    llama_70b = _shapes(8192, 64, 8, 128, 28672)
    assert check_tp_blocks(llama_70b, 8) == []  # the 70B FP8 example's TP8
    qwen_7b = _shapes(3584, 28, 4, 128, 18944)
    assert check_tp_blocks(qwen_7b, 4) == []
    # TP8 on Qwen2.5-7B: 3584 / 8 = 448 rows of q (3.5 blocks), 512 / 8 = 64 of k, 18944 / 8 = 2368 of up
    problems = check_tp_blocks(qwen_7b, 8)
    assert sorted(p.split(".")[-2] for p in problems) == ["down_proj", "k_proj", "o_proj", "q_proj", "up_proj"]
    assert any("up_proj" in p and "18944 rows" in p for p in problems)
    assert any("down_proj" in p and "18944 columns" in p for p in problems)
