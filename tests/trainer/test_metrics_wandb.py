"""The W&B sink of MetricsLogger in offline mode: a few steps logged, read back from the offline run's
`.wandb` file (the run config, every step's metrics as numbers, NaN included). Skipped without the
`wandb` package (the dev extras)."""
from __future__ import annotations

import io
import json
import math
import struct
from pathlib import Path

import pytest
import torch

from maspo_megatron.trainer.metrics import MetricsLogger

wandb = pytest.importorskip("wandb")

_MAGIC = b":W&B\xe1\xbe\x00"  # W&B's transaction log: this header, then LevelDB-log-format records
_BLOCK_BYTES = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _read_records(path: Path) -> list:
    """The protobuf Records of a `.wandb` file: 32 KiB blocks of (crc32c u32, length u16, kind u8)
    headed fragments (the CRC is not checked here)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:len(_MAGIC)] == _MAGIC, data[:8]
    pos, parts, records = len(_MAGIC), [], []
    while pos + 7 <= len(data):
        if _BLOCK_BYTES - pos % _BLOCK_BYTES < 7:  # a block's zero-padded tail
            pos += _BLOCK_BYTES - pos % _BLOCK_BYTES
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        parts.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(b"".join(parts))
            records.append(record)
            parts = []
        elif kind not in (_FIRST, _MIDDLE):
            parts = []  # zero padding
    return records


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(tmp_path / "cfg"),
                        "WANDB_CACHE_DIR": str(tmp_path / "cache"), "WANDB_DATA_DIR": str(tmp_path / "data")}.items():
        monkeypatch.setenv(name, value)
    yield
    wandb.teardown()  # the wandb-core service process, also when a test failed


def _history(run_file: Path) -> dict:
    """{step: {metric: value}} of the history records in one run file (W&B's own `_` keys left out)."""
    history = {}
    for record in _read_records(run_file):
        if record.WhichOneof("record_type") == "history":
            values = {_key(i): json.loads(i.value_json) for i in record.history.item if not _key(i).startswith("_")}
            history[record.history.step.num] = values
    return history


def _run_ids(out: Path) -> list[str]:
    """The run id each run file under `out` records (one file per process that logged)."""
    return sorted(r.run.run_id for f in (out / "wandb").glob("offline-run-*/run-*.wandb") for r in _read_records(f)
                  if r.WhichOneof("record_type") == "run")


def test_offline_run_holds_config_and_every_step(tmp_path, offline):
    out = tmp_path / "run"
    logger = MetricsLogger(out, 3, tensorboard=False, wandb_project="maspo-test", stream=io.StringIO(),
                           run_config={"algorithm": {"loss": "maspo", "maspo": {"alpha": 0.5}}})
    try:
        logger.log(1, {"rollout/reward_mean": 0.25, "train/grad_norm": torch.tensor(1.5), "train/skipped": 0})
        logger.log(2, {"rollout/reward_mean": 0.5, "train/grad_norm": float("nan"), "train/skipped": 1})
        logger.log(3, {"rollout/reward_mean": 0.75, "train/grad_norm": torch.tensor(0.125), "train/skipped": 0})
    finally:
        logger.close()
        wandb.teardown()  # waits for wandb-core to write the run file out
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    records = _read_records(run_file)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["algorithm"] == {"loss": "maspo", "maspo": {"alpha": 0.5}}
    history = _history(run_file)
    assert sorted(history) == [1, 2, 3]
    assert history[1] == {"rollout/reward_mean": 0.25, "train/grad_norm": 1.5, "train/skipped": 0}
    assert history[3] == {"rollout/reward_mean": 0.75, "train/grad_norm": 0.125, "train/skipped": 0}
    assert history[2]["rollout/reward_mean"] == 0.5 and history[2]["train/skipped"] == 1
    assert isinstance(history[2]["train/grad_norm"], float) and math.isnan(history[2]["train/grad_norm"])


def test_resumed_run_continues_the_same_wandb_run(tmp_path, offline):
    """Steps 1-2, a resume from step 2 logging step 3: one W&B run id (kept in the output dir);
    a fresh start in another dir gets another id."""
    out = tmp_path / "run"
    for resume_step, steps in ((0, (1, 2)), (2, (3,))):
        logger = MetricsLogger(out, 3, tensorboard=False, wandb_project="maspo-test", stream=io.StringIO(),
                               resume_step=resume_step)
        for step in steps:
            logger.log(step, {"rollout/reward_mean": step / 4})
        logger.close()
        wandb.teardown()  # as at the process exit between a run and its resume: the run file written out
    ids = _run_ids(out)
    assert len(ids) == 2 and ids[0] == ids[1], ids
    files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert sorted(_history(files[0])) + sorted(_history(files[1])) in ([1, 2, 3], [3, 1, 2])
    other = tmp_path / "other"
    MetricsLogger(other, 1, tensorboard=False, wandb_project="maspo-test", stream=io.StringIO()).close()
    assert _run_ids(other) != ids[:1]
