"""The stand-in as a subprocess in its own session (so `os.killpg` takes it down whole): start it,
wait until `/health_generate` answers, kill it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

PACKAGE_DIR = str(Path(__file__).resolve().parent)  # `python <dir>` runs __main__.py


def spawn(port: int, *args: str) -> subprocess.Popen:
    """`python tests/helpers/sglang_standin --port PORT *args`, output discarded."""
    return subprocess.Popen([sys.executable, PACKAGE_DIR, "--port", str(port), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def wait_healthy(url: str, process: subprocess.Popen, deadline_s: float = 60.0) -> None:
    """Returns once `url` answers /health_generate with 200; RuntimeError if `process` exits first
    or the deadline passes."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"stand-in at {url} exited during startup (code {process.returncode})")
        try:
            if requests.get(url + "/health_generate", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            time.sleep(0.1)
    raise RuntimeError(f"stand-in at {url} not healthy within {deadline_s:g} s")


def kill(process: subprocess.Popen) -> None:
    """SIGKILLs the stand-in's process group (if still running) and reaps it."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
