"""ParallelDims answers layout questions consistently with Megatron; the launcher reports failures."""
import pytest
import torch

from maspo_megatron.config.parallel import ParallelConfig
from maspo_megatron.parallel import check_layout
from tests.helpers.multiproc import DistributedTestError, run_distributed


def _layout_case(tp, pp, cp):
    import torch.distributed as dist

    from maspo_megatron.parallel import destroy_distributed, get_parallel_dims, init_distributed

    dims = init_distributed(ParallelConfig(tp=tp, pp=pp, cp=cp), seed=5)
    assert get_parallel_dims() is dims
    assert init_distributed(ParallelConfig(tp=tp, pp=pp, cp=cp), seed=5) is dims  # idempotent
    # group sizes agree with the dims, and collectives over each group see the right members
    out = {"rank": dims.rank, "tp_rank": dims.tp_rank, "pp_rank": dims.pp_rank, "cp_rank": dims.cp_rank,
           "dp_rank": dims.dp_rank, "dp": dims.dp, "first": dims.is_first_stage, "last": dims.is_last_stage,
           "pp_last": dims.pp_last_global_rank}
    for name in ("tp", "pp", "cp", "dp"):
        group = getattr(dims, f"{name}_group")
        assert dist.get_world_size(group) == getattr(dims, name), name
        members = torch.tensor([float(dims.rank)])
        dist.all_reduce(members, group=group)
        out[f"{name}_sum"] = float(members)
    assert dist.get_world_size(dims.dp_cp_group) == dims.dp * dims.cp
    dist.barrier()
    destroy_distributed()
    destroy_distributed()  # safe twice
    return out


def test_parallel_dims_tp2_pp2_and_dp_derived():
    results = run_distributed(_layout_case, 4, 2, 2, 1, timeout_s=120)
    # Megatron's order tp-cp-ep-dp-pp: TP ranks adjacent, PP outermost.
    assert [r["tp_rank"] for r in results] == [0, 1, 0, 1]
    assert [r["pp_rank"] for r in results] == [0, 0, 1, 1]
    assert [r["dp"] for r in results] == [1, 1, 1, 1]
    assert [r["first"] for r in results] == [True, True, False, False]
    assert [r["last"] for r in results] == [False, False, True, True]
    assert [r["pp_last"] for r in results] == [2, 3, 2, 3]
    assert [r["tp_sum"] for r in results] == [1, 1, 5, 5]
    assert [r["pp_sum"] for r in results] == [2, 4, 2, 4]


def test_parallel_dims_cp2_dp2():
    results = run_distributed(_layout_case, 4, 1, 1, 2, timeout_s=120)
    assert [r["cp_rank"] for r in results] == [0, 1, 0, 1]
    assert [r["dp_rank"] for r in results] == [0, 0, 1, 1]
    assert [r["dp"] for r in results] == [2, 2, 2, 2]
    assert [r["cp_sum"] for r in results] == [1, 1, 5, 5]
    assert [r["dp_sum"] for r in results] == [2, 4, 2, 4]


def test_bad_layout_names_the_keys():
    with pytest.raises(ValueError, match=r"parallel: world size 6 is not divisible by tp\*pp\*cp"):
        check_layout(ParallelConfig(tp=4), 6)
    with pytest.raises(ValueError, match="sequence_parallel"):
        check_layout(ParallelConfig(sequence_parallel=True), 2)
    assert check_layout(ParallelConfig(tp=2, pp=2), 8) == 2


def _fail_on_rank_one(marker):
    import os
    import time

    if os.environ["RANK"] == "1":
        raise KeyError(marker)
    time.sleep(60)  # would hang: the launcher must kill it after the grace period


def _sleep_forever():
    import time

    time.sleep(600)


def test_launcher_reraises_with_the_ranks_traceback():
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_fail_on_rank_one, 2, "marker-xyz", timeout_s=60, grace_s=0.5)
    message = str(info.value)
    assert "rank 1 raised" in message and "KeyError: 'marker-xyz'" in message and "_fail_on_rank_one" in message


def test_launcher_times_out_and_names_ranks():
    with pytest.raises(DistributedTestError, match=r"timed out after 3 s; ranks still running: \[0, 1\]"):
        run_distributed(_sleep_forever, 2, timeout_s=3)


def test_launcher_refuses_local_functions():
    def local():
        return 1

    with pytest.raises(ValueError, match="module-level"):
        run_distributed(local, 1)
