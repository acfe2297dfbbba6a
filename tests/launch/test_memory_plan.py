"""`python -m maspo_megatron plan`: two cases against hand computations, and plans it must refuse."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from maspo_megatron.__main__ import main
from maspo_megatron.config import load_config
from maspo_megatron.launch.memory import ClusterShape, PlanError, plan_memory
from maspo_megatron.models.meta import model_meta

REPO = Path(__file__).resolve().parents[2]
QWEN7B = REPO / "examples" / "hf_configs" / "qwen2.5-7b-instruct.json"
LLAMA70B = REPO / "examples" / "hf_configs" / "llama-3.3-70b-instruct.json"


def test_small_model_tp2_pp2_by_hand(tmp_path):
    """hidden 64, 4 layers, 4 heads (head_dim 16), 2 KV heads, ffn 128, vocab 1000, untied, qwen2 (qkv bias)."""
    hf = {"model_type": "qwen2", "hidden_act": "silu", "hidden_size": 64, "num_hidden_layers": 4,
          "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 1000,
          "tie_word_embeddings": False}
    cfg = load_config(None, ["parallel.tp=2", "parallel.pp=2", "model.dtype=bf16", "trainer.micro_batch_tokens=1024"])
    meta = model_meta(hf, tp=2)
    plan = plan_memory(meta, cfg, ClusterShape(nodes=1, gpus_per_node=8))
    # vocab padded to a multiple of 128 x TP = 256: 1024 rows.
    # layer: qkv 64 x (4+2+2) x 16 = 8192, o 64 x 64 = 4096, qkv bias 128, MLP 3 x 64 x 128 = 24576, norms 128 -> 37120
    # total: 4 x 37120 + 2 x 1024 x 64 (embedding + output) + 64 (final norm) = 279616
    assert plan.total_params == 279_616
    # heaviest stage, one TP rank: 2 layers x ((37120 - 128) / 2 + 128) + 1024 x 64 / 2 + 64 = 70080
    assert plan.params_per_gpu == 70_080
    assert plan.dp == 2  # 8 GPUs / (TP 2 x PP 2)
    assert plan.weights == 70_080 * 2  # bf16
    assert plan.grads == 70_080 * 4  # fp32 main grads
    assert plan.optimizer == 70_080 * 12 // 2  # fp32 master + 2 moments, sharded over DP 2
    # activations per token and layer: 2 bytes x (4 x 64 + (128 qkv + 64 attn out + 3 x 128 SwiGLU) / 2) = 1088;
    # first stage holds PP = 2 micro-batches of 1024 tokens x 2 layers: 2 x 1024 x 2 x 1088 = 4456448
    # (the last stage: 1024 x 2 x 1088 + fp32 logits 1024 x 512 x 4 = 4325376 is smaller)
    assert plan.activations == 4_456_448
    assert plan.mode == "local" and plan.kv_cache == 0 and plan.rollout_phase == 0
    assert plan.train_phase == 140_160 + 280_320 + 420_480 + 4_456_448


def test_qwen25_7b_colocated_tp2_by_hand():
    cfg = load_config(None, ["parallel.tp=2", "model.dtype=bf16", "rollout.engine=sglang", "rollout.sglang.tp_size=2",
                             "rollout.sglang.mem_fraction_static=0.5", "rollout.sglang.enable_memory_saver=true"])
    plan = plan_memory(model_meta(QWEN7B, tp=2), cfg, ClusterShape(nodes=1, gpus_per_node=8, gpu_mem_gib=80))
    # Qwen2.5-7B: layer = 3584 x 4608 (qkv) + 3584 x 3584 (o) + 4608 (bias) + 3 x 3584 x 18944 + 2 x 3584
    #           = 233,057,792; total = 28 x layer + 2 x 152064 x 3584 + 3584 = 7,615,616,512
    assert plan.total_params == 7_615_616_512
    # per TP rank: 28 x ((233,057,792 - 7168) / 2 + 7168) + 152064 x 3584 (embedding/2 + output/2) + 3584
    assert plan.params_per_gpu == 3_807_910_400
    assert (plan.weights, plan.grads) == (7_615_820_800, 15_231_641_600)
    assert plan.optimizer == 11_423_731_200  # x 12 / DP 4
    # SGLang TP 2: bf16 weights / 2; it claims 0.5 x 80 GiB = 42,949,672,960 bytes, the rest is KV pool
    assert plan.rollout_weights == 7_615_616_512
    assert plan.kv_cache == 42_949_672_960 - 7_615_616_512
    # K+V bytes per token: 2 x 28 layers x 4 KV heads x 128 x 2 bytes = 57,344, split over SGLang TP 2
    assert plan.kv_tokens_per_server == (42_949_672_960 - 7_615_616_512) * 2 // 57_344 == 1_232_354
    assert plan.rollout_phase == 7_615_820_800 + 15_231_641_600 + 11_423_731_200 + 42_949_672_960
    assert plan.fits


def test_impossible_plan_is_refused_with_a_clear_message(tmp_path):
    config = tmp_path / "llama70b_one_node.yaml"
    config.write_text(f"model:\n  hf_config: {LLAMA70B}\n  dtype: bf16\nparallel:\n  tp: 8\n  distributed_optimizer: false\n")
    result = subprocess.run([sys.executable, "-m", "maspo_megatron", "plan", "--config", str(config), "--nodes", "1",
                             "--gpus-per-node", "8", "--gpu-mem-gib", "80"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 1
    err = [line for line in result.stderr.splitlines() if line.startswith("maspo plan:")]
    assert len(err) == 1 and "refused" in err[0] and "GiB per GPU" in err[0], result.stderr
    assert "distributed_optimizer=true" in err[0]  # says what to change
    assert "DOES NOT FIT" in result.stdout


@pytest.mark.parametrize("overrides, nodes, message", [
    (["parallel.tp=8"], 1, "parallel.tp: 8 must divide num_attention_heads (28) and num_key_value_heads (4)"),
    (["parallel.pp=3"], 1, "tp*pp*cp = 3 does not divide the 8 training GPUs"),
    (["parallel.tp=16"], 2, "parallel.tp: 16 spans nodes"),
    (["parallel.pp=8", "parallel.tp=1"], 1, "parallel.pp: 8 must divide num_hidden_layers (28)"),
])
def test_layouts_that_cannot_run_are_refused(overrides, nodes, message):
    cfg = load_config(None, overrides)
    with pytest.raises(PlanError) as info:
        plan_memory(model_meta(QWEN7B, tp=cfg.parallel.tp), cfg, ClusterShape(nodes=nodes, gpus_per_node=8))
    assert message in str(info.value)


def test_kv_pool_smaller_than_one_sequence_is_refused():
    cfg = load_config(None, ["model.dtype=bf16", "rollout.engine=sglang", "rollout.sglang.mem_fraction_static=0.1",
                             "rollout.max_new_tokens=32768"])
    with pytest.raises(PlanError, match="^rollout.sglang.mem_fraction_static"):
        plan_memory(model_meta(QWEN7B), cfg, ClusterShape(nodes=1, gpus_per_node=8, gpu_mem_gib=80))


def test_cli_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    assert main(["plan", "--config", str(tmp_path / "missing.yaml"), "--nodes", "1", "--gpus-per-node", "8"]) == 2
    assert capsys.readouterr().err.strip().endswith("missing.yaml: config file not found")
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  hf_config: /nowhere/Unknown-Model-9B\n")
    assert main(["plan", "--config", str(config), "--nodes", "1", "--gpus-per-node", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("maspo plan: model.hf_config: /nowhere/Unknown-Model-9B does not exist") and "\n" not in err
    assert main(["plan", "--config", str(config), "--nodes", "0", "--gpus-per-node", "8"]) == 2
    assert main(["nonsense"]) == 2
    capsys.readouterr()
    # the plan asks the engine's registered traits: an unregistered engine is a one-line error, not a traceback
    config.write_text("rollout:\n  engine: vllm\n")
    assert main(["plan", "--config", str(config), "--nodes", "1", "--gpus-per-node", "8"]) == 2
    assert capsys.readouterr().err.strip() == "maspo plan: rollout.engine: 'vllm' is not one of ['local', 'sglang']"


def test_hf_config_flag_and_tiny_model(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  hf_config: /nowhere/x\n  dtype: bf16\n")
    shape = tmp_path / "config.json"
    shape.write_text(json.dumps(json.loads(QWEN7B.read_text())))
    assert main(["plan", "--config", str(config), "--nodes", "1", "--gpus-per-node", "8", "--hf-config", str(shape)]) == 0
    assert "7.62 B params" in capsys.readouterr().out
    assert main(["plan", "--config", str(REPO / "examples" / "cpu_tiny.yaml"), "--nodes", "1", "--gpus-per-node", "1"]) == 0
    assert "built-in tiny policy" in capsys.readouterr().out
