"""parallel/pipeline.py: the interleaved schedule's p2p mode and micro-batch count, and that the
trainer's packing and model config follow them (the gradients themselves are checked at
pp2 x vpp2 in test_layout_invariance.py)."""
import pytest
import torch

from maspo_megatron.parallel.pipeline import (
    apply_pipeline_comm_settings,
    check_pipeline_comm,
    interleaved_micro_batches,
    pipeline_comm_settings,
)


def _config(pp, vpp, **kwargs):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(num_layers=4, hidden_size=32, num_attention_heads=4, pipeline_model_parallel_size=pp,
                             virtual_pipeline_model_parallel_size=vpp, pipeline_dtype=torch.float32, **kwargs)


def test_interleaved_schedule_gets_unbatched_p2p():
    assert pipeline_comm_settings(2, 2) == {"overlap_p2p_comm": True, "batch_p2p_comm": False}
    assert pipeline_comm_settings(2, None) == {} and pipeline_comm_settings(1, None) == {}
    config = _config(2, 2)
    assert config.batch_p2p_comm  # Megatron's default: the mode that breaks gradients at pp = 2
    with pytest.raises(ValueError, match=r"parallel\.vpp: .*batch_p2p_comm=False"):
        check_pipeline_comm(config)
    apply_pipeline_comm_settings(config, 2, 2)
    assert not config.batch_p2p_comm and config.overlap_p2p_comm
    check_pipeline_comm(config)
    check_pipeline_comm(_config(2, None))  # plain 1F1B: the default is fine


@pytest.mark.parametrize(("count", "pp", "vpp", "expected"), [
    (1, 2, 2, 2), (3, 2, 2, 4), (4, 2, 2, 4), (5, 4, 5, 8), (3, 2, None, 3), (1, 1, None, 1)])
def test_interleaved_micro_batch_count(count, pp, vpp, expected):
    assert interleaved_micro_batches(count, pp, vpp) == expected


def test_trainer_packs_a_multiple_of_pp_micro_batches_with_vpp():
    from maspo_megatron.config import load_config
    from maspo_megatron.parallel.state import ParallelDims
    from maspo_megatron.trainer.batch import TrainSample
    from maspo_megatron.trainer.train_step import pack_mini_batches

    cfg = load_config(None, ["trainer.micro_batch_tokens=16", "parallel.pp=2", "parallel.vpp=2",
                             "algorithm.mini_batches=2"])
    samples = [TrainSample([1, 2, 3], list(range(4, 4 + n)), 1.0) for n in (9, 3, 10, 2, 11, 7)]
    # Rows (first fit at 16 tokens): mini-batch 1 lengths 12, 6, 13 -> 3 rows; 2: 5, 14, 10 -> 2 rows.
    for vpp, pp, expected in ((None, 2, [3, 2]), (2, 2, [4, 2]), (3, 3, [3, 3])):
        dims = ParallelDims(world_size=pp, rank=0, tp=1, pp=pp, cp=1, dp=1, vpp=vpp, tp_rank=0, pp_rank=0,
                            cp_rank=0, dp_rank=0, sequence_parallel=False)
        minis = pack_mini_batches(samples, cfg, dims, "dense")
        assert [len(mini) for mini in minis] == expected, (vpp, pp)
        # the added micro-batches are padding only: every response token is still there once
        assert sum(int(mb.loss_mask.sum()) for mini in minis for mb in mini) == sum(len(s.response_ids) for s in samples)
