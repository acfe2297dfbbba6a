"""slurm/convert_to_megatron.sbatch then slurm/convert_to_hf.sbatch on the real test Slurm: a tiny
HF Qwen2 model goes to a TP-2 Megatron checkpoint and back, bit for bit."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.slurm.slurm_jobs import REPO, sacct_state, submit, wait_job

pytestmark = pytest.mark.slurm


def _tiny_hf_model(path):
    import transformers

    config = transformers.Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False, hidden_act="silu")
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(path, safe_serialization=True)


def _tensors(directory) -> dict:
    out = {}
    for shard in sorted(directory.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def test_hf_to_megatron_tp2_and_back_through_sbatch(slurm_cluster, tmp_path):
    hf_dir, meg_dir, back_dir = tmp_path / "hf", tmp_path / "megatron", tmp_path / "hf_back"
    _tiny_hf_model(hf_dir)
    common = {"MASPO_REPO": str(REPO), "MASPO_LOG_DIR": str(tmp_path / "logs"), "OMP_NUM_THREADS": "1"}
    job = submit(REPO / "slurm" / "convert_to_megatron.sbatch", "--time=10", f"--output={tmp_path}/%x-%j.out",
                 env={**common, "MASPO_HF_DIR": str(hf_dir), "MASPO_OUT_DIR": str(meg_dir), "MASPO_TP": "2"})
    assert wait_job(job, 300) == "COMPLETED", (sacct_state(job), [p.read_text() for p in tmp_path.glob("**/*.log")])
    assert (meg_dir / "metadata.json").is_file()
    job = submit(REPO / "slurm" / "convert_to_hf.sbatch", "--time=10", f"--output={tmp_path}/%x-%j.out",
                 env={**common, "MASPO_MEGATRON_DIR": str(meg_dir), "MASPO_OUT_DIR": str(back_dir)})
    assert wait_job(job, 300) == "COMPLETED", (sacct_state(job), [p.read_text() for p in tmp_path.glob("**/*.log")])
    original, restored = _tensors(hf_dir), _tensors(back_dir)
    assert sorted(original) == sorted(restored)
    for name, tensor in original.items():
        assert torch.equal(tensor, restored[name]), name
    # one log per job step
    assert len(list((tmp_path / "logs").glob("*-convert.log"))) == 2
