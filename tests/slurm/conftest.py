"""The real single-node Slurm the `slurm` tests submit to (munge, MariaDB, slurmdbd, slurmctld, slurmd).

`slurm_cluster` (session scope) runs tests/slurm/start_slurm.sh: it installs the Debian packages
with apt-get when they are missing, starts the daemons and waits for an idle node and a working
`sacct`. It FAILS (never skips) with the script's one-line reason when that is impossible, so a
CI machine without Slurm shows up red. When a cluster is already up (CI may call
`tests/slurm/start_slurm.sh start` itself), it is reused and left running.
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
START_SCRIPT = HERE / "start_slurm.sh"


def _run_script(action: str, timeout_s: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(START_SCRIPT), action], capture_output=True, text=True, timeout=timeout_s)


@pytest.fixture(scope="session")
def slurm_cluster():
    """Yields a dict with `startup_s` (0 when reused) and `state_dir`; stops what it started."""
    already_up = _run_script("status", 30).returncode == 0
    started = time.monotonic()
    if not already_up:
        try:
            result = _run_script("start", 300)
        except subprocess.TimeoutExpired:
            pytest.fail("tests/slurm/start_slurm.sh start: no idle Slurm node after 300 s", pytrace=False)
        if result.returncode != 0:
            reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.fail(f"cannot start the test Slurm: {reason}", pytrace=False)
    info = {"startup_s": 0.0 if already_up else time.monotonic() - started,
            "state_dir": os.environ.get("MASPO_SLURM_STATE", "/tmp/maspo_slurm")}
    yield info
    if not already_up:
        _run_script("stop", 60)

