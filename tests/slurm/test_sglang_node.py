"""slurm/sglang_node.sh (one rollout node of train_disaggregated.sbatch) with the protocol-faithful
SGLang stand-in (tests/helpers/sglang_standin/, zero-latency) in place of sglang.launch_server:
servers on consecutive ports and GPU offsets, all healthy; one dies -> the node script exits and
takes the others down (a half fleet must not keep the job waiting)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from maspo_megatron.utils.ports import free_port_block
from tests.helpers.sglang_standin.process import PACKAGE_DIR as STANDIN

REPO = Path(__file__).resolve().parents[2]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health_generate", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def test_node_script_starts_servers_and_stops_them_together(tmp_path):
    base = free_port_block(2)
    env = {**os.environ, "MASPO_MODEL_DIR": str(tmp_path), "MASPO_SGLANG_TP": "2", "MASPO_SERVERS_PER_NODE": "2",
           "MASPO_SGLANG_PORT": str(base), "MASPO_SGLANG_CMD": f"{sys.executable} {STANDIN} --zero-latency",
           "SLURMD_NODENAME": "127.0.0.1", "PYTHONPATH": str(REPO)}
    node = subprocess.Popen(["bash", str(REPO / "slurm" / "sglang_node.sh")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        urls = [f"http://127.0.0.1:{base + i}" for i in range(2)]
        deadline = time.monotonic() + 120
        while not all(_healthy(u) for u in urls):
            assert node.poll() is None, node.stdout.read()
            assert time.monotonic() < deadline, "stand-in servers not healthy"
            time.sleep(0.3)
        children = subprocess.run(["pgrep", "-P", str(node.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) == 2
        os.kill(int(children[0]), signal.SIGKILL)  # one server dies
        node.wait(timeout=30)
        output = node.stdout.read()
        assert node.returncode != 0
        assert "GPUs 0..1 port" in output and "GPUs 2..3 port" in output  # --base-gpu-id 0 and 2 for TP 2
        assert "stopping the others" in output
        deadline = time.monotonic() + 15
        while any(_healthy(u) for u in urls):  # the surviving server went down with the node script
            assert time.monotonic() < deadline, "a server outlived its node script"
            time.sleep(0.3)
    finally:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
