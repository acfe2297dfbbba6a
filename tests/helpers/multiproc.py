"""ONE launcher for multi-process (gloo) tests.

    from tests.helpers.multiproc import run_distributed

    def _case(scale):                      # module level: the child imports it by file path
        dims = init_distributed(ParallelConfig(tp=2), seed=1)
        ...
        return {"loss": 1.0 * scale}       # anything picklable (tensors included)

    def test_something():
        results = run_distributed(_case, 2, 3.0, timeout_s=120)   # one result per rank
        assert results[0]["loss"] == 3.0

What it guarantees:
- Each rank is a fresh Python process (`python multiproc.py <spec>`), started in its OWN
  session/process group, so everything it spawns (dist_checkpointing's Manager, dataloader
  workers) is killed with it. Every group is killed when the case ends, fails or times out.
- Environment per rank: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1, a free MASTER_PORT,
  OMP_NUM_THREADS=1, HF_HUB_OFFLINE=1, plus `env` overrides.
- Device: `device="cpu"` (the default) hides every GPU from the ranks (CUDA_VISIBLE_DEVICES=""),
  so they run the CPU path over gloo even on a GPU machine (where NCCL would refuse several
  ranks on one GPU); `device="cuda"` leaves the GPUs visible (GPU tests, one rank per GPU). `fn` itself decides how to
  initialise torch.distributed (usually `maspo_megatron.parallel.init_distributed`).
- If any rank raises, the others are killed after `grace_s` and `DistributedTestError` is raised
  with that rank's traceback (the first failing rank, plus every other rank's error that made it
  to disk). A rank that dies without a traceback (signal, os._exit) reports its exit code and
  the tail of its output. On timeout: `DistributedTestError` naming the ranks still running,
  with each one's current Python stack (faulthandler on SIGUSR1) in its output tail.
- `fn` must be a module-level function of an importable file; args/kwargs/results are pickled.
"""
from __future__ import annotations

import faulthandler
import importlib.util
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

from maspo_megatron.utils.ports import free_port

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class DistributedTestError(AssertionError):
    """A rank failed, died or timed out; the message carries its traceback / output tail."""


def _fn_location(fn: Callable) -> tuple[str, str, str]:
    module = sys.modules.get(fn.__module__)
    path = getattr(module, "__file__", None)
    if path is None or "<locals>" in fn.__qualname__:
        raise ValueError(f"run_distributed: {fn!r} must be a module-level function of an importable file")
    return fn.__module__, os.path.abspath(path), fn.__qualname__


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: str, chars: int = 4000) -> str:
    try:
        with open(path, errors="replace") as handle:
            return handle.read()[-chars:]
    except OSError:
        return ""


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout_s: float = 180.0, grace_s: float = 3.0,
                    env: dict | None = None, device: str = "cpu", **kwargs: Any) -> list:
    """Runs fn(*args, **kwargs) on `world_size` fresh processes; returns [result of rank 0, 1, ...]."""
    if world_size < 1:
        raise ValueError(f"world_size: {world_size} must be >= 1")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device: {device!r} must be 'cpu' or 'cuda'")
    module_name, module_path, qualname = _fn_location(fn)
    workdir = tempfile.mkdtemp(prefix="maspo_mp_")
    spec_path = os.path.join(workdir, "spec.pkl")
    with open(spec_path, "wb") as handle:
        pickle.dump({"module": module_name, "path": module_path, "qualname": qualname,
                     "args": args, "kwargs": kwargs}, handle)
    port = free_port()
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        for rank in range(world_size):
            child_env = dict(os.environ)
            child_env.update({
                "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "PYTHONPATH": os.pathsep.join(filter(None, [_REPO_ROOT, child_env.get("PYTHONPATH")])),
            })
            if device == "cpu":
                child_env["CUDA_VISIBLE_DEVICES"] = ""
            child_env.update(env or {})
            log_path = os.path.join(workdir, f"rank{rank}.log")
            logs.append(log_path)
            with open(log_path, "wb") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__), spec_path, os.path.join(workdir, f"rank{rank}.out")],
                    env=child_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=_REPO_ROOT))
        _wait_all(procs, logs, timeout_s, grace_s)
        results = []
        for rank in range(world_size):
            with open(os.path.join(workdir, f"rank{rank}.out"), "rb") as handle:
                results.append(pickle.load(handle)["result"])
        return results
    finally:
        for proc in procs:
            _kill_group(proc)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_all(procs: list, logs: list, timeout_s: float, grace_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    first_failure_at = None
    while True:
        codes = [proc.poll() for proc in procs]
        if all(code == 0 for code in codes):
            return
        failed = [rank for rank, code in enumerate(codes) if code not in (None, 0)]
        now = time.monotonic()
        if failed and first_failure_at is None:
            first_failure_at = now
        if failed and (all(code is not None for code in codes) or now - first_failure_at > grace_s):
            raise DistributedTestError(_failure_report(procs, logs, codes, failed))
        if now > deadline:
            running = [rank for rank, code in enumerate(codes) if code is None]
            for rank in running:  # ask for a Python stack dump (faulthandler) before the kill
                try:
                    procs[rank].send_signal(signal.SIGUSR1)
                except ProcessLookupError:
                    pass
            time.sleep(1.0)
            tails = "\n".join(f"--- rank {r} output tail ---\n{_tail(logs[r], 3000)}" for r in running)
            raise DistributedTestError(f"timed out after {timeout_s:.0f} s; ranks still running: {running}\n{tails}")
        time.sleep(0.05)


def _failure_report(procs, logs, codes, failed) -> str:
    parts = []
    for rank in failed:
        out_path = logs[rank].replace(".log", ".out")
        error = None
        if os.path.exists(out_path):
            with open(out_path, "rb") as handle:
                error = pickle.load(handle).get("error")
        if error:
            parts.append(f"--- rank {rank} raised ---\n{error}")
        else:
            parts.append(f"--- rank {rank} died with exit code {codes[rank]} ---\n{_tail(logs[rank])}")
    return "\n".join(parts)


def _child_main(spec_path: str, out_path: str) -> int:
    faulthandler.register(signal.SIGUSR1, all_threads=False)
    with open(spec_path, "rb") as handle:
        spec = pickle.load(handle)
    try:
        module = sys.modules.get(spec["module"])
        if module is None:
            sys.path.insert(0, os.path.dirname(spec["path"]))
            module_spec = importlib.util.spec_from_file_location(spec["module"], spec["path"])
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[spec["module"]] = module
            module_spec.loader.exec_module(module)
        fn = module
        for part in spec["qualname"].split("."):
            fn = getattr(fn, part)
        result = fn(*spec["args"], **spec["kwargs"])
        payload = {"result": result}
        code = 0
    except BaseException:
        payload = {"error": f"[rank {os.environ.get('RANK')}] " + traceback.format_exc()}
        code = 1
    with open(out_path + ".tmp", "wb") as handle:
        pickle.dump(payload, handle)
    os.replace(out_path + ".tmp", out_path)
    sys.stdout.flush()
    sys.stderr.flush()
    # os._exit: skip interpreter teardown (gloo / Megatron atexit hooks can hang on a dead peer).
    os._exit(code)


if __name__ == "__main__":
    _child_main(sys.argv[1], sys.argv[2])
