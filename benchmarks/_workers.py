"""Start a benchmark's gloo ranks as fresh processes and collect their JSON results (shared by the
multi-rank CPU benchmarks: each re-runs its own script with `--worker SHAPE_JSON OUT_PATH`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from maspo_megatron.utils.ports import free_port

_REPO = Path(__file__).resolve().parents[1]


def launch_workers(script: str, name: str, world: int, shape: dict, workdir: str) -> list[dict]:
    """Runs `script --worker <shape> <out>` on `world` local ranks; returns each rank's JSON result.

    A rank that fails raises RuntimeError with the tail of its log, naming the benchmark `name`.
    """
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(_REPO), os.environ.get("PYTHONPATH")])))
        out = os.path.join(workdir, f"rank{rank}.json")
        with open(out + ".log", "w") as log:
            procs.append(subprocess.Popen([sys.executable, script, "--worker", json.dumps(shape), out], env=env,
                                          stdout=subprocess.DEVNULL, stderr=log))
    codes = [p.wait() for p in procs]
    if any(codes):
        bad = codes.index(next(c for c in codes if c))
        tail = Path(workdir, f"rank{bad}.json.log").read_text()[-3000:]
        raise RuntimeError(f"{name} benchmark: rank {bad} exited with {codes[bad]}:\n{tail}")
    return [json.loads(Path(workdir, f"rank{r}.json").read_text()) for r in range(world)]
